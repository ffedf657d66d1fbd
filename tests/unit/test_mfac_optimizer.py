"""M-FAC optimizer: dense oracle for one step, convergence, sparse masks, resume."""

import io

import pytest
import torch

from sparseml.errors import RecipeError
from sparseml.optim import MFAC


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)
    ).double()


def batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randn(8, 2, generator=gen))
        for _ in range(n)
    ]


def backward(model, batch):
    x, y = batch
    loss = ((model(x) - y.double()) ** 2).mean()
    loss.backward()
    return loss


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("steps", [3, 9])  # window partly filled (3 < 5) and full (9 > 5)
def test_step_equals_dense_inverse_fisher(steps):
    lr, wd, damp, ngrads = 0.1, 0.01, 1e-2, 5
    model = tiny_model()
    opt = MFAC(model.parameters(), lr=lr, weight_decay=wd, damp=damp, ngrads=ngrads)
    seen = []
    for batch in batches(steps):
        opt.zero_grad()
        backward(model, batch)
        before = flat_params(model)
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        seen.append(grad + wd * before)
        opt.step()
    window = torch.stack(seen[-ngrads:])
    k = window.shape[0]
    fisher = damp * torch.eye(window.shape[1], dtype=torch.float64) + window.T @ window / k
    want = before - lr * torch.linalg.solve(fisher, seen[-1])
    torch.testing.assert_close(flat_params(model), want, rtol=1e-9, atol=1e-9)


def test_momentum_is_an_ema_of_preconditioned_steps():
    model, twin = tiny_model(), tiny_model()
    opt = MFAC(model.parameters(), lr=0.1, momentum=0.9, damp=1e-2, ngrads=4)
    ref = MFAC(twin.parameters(), lr=0.1, momentum=0.0, damp=1e-2, ngrads=4)
    batch = batches(1)[0]
    start = flat_params(model)
    for o, mdl in ((opt, model), (ref, twin)):
        backward(mdl, batch)
        o.step()
    # first step: buf = 0.9 * 0 + 0.1 * u, so the move is 0.1 of the plain one
    torch.testing.assert_close(flat_params(model) - start, 0.1 * (flat_params(twin) - start))


def test_decreases_least_squares_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 10, dtype=torch.float64)
    y = x @ torch.randn(10, 1, dtype=torch.float64) + 0.01 * torch.randn(
        256, 1, dtype=torch.float64
    )
    torch.manual_seed(1)
    model = torch.nn.Linear(10, 1).double()
    opt = MFAC(model.parameters(), lr=0.3, damp=1.0, ngrads=16)

    def full_loss():
        with torch.no_grad():
            return ((model(x) - y) ** 2).mean().item()

    start = full_loss()
    for _ in range(40):
        idx = torch.randint(0, 256, (32,))

        def closure(idx=idx):
            opt.zero_grad()
            loss = ((model(x[idx]) - y[idx]) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
    assert full_loss() < 0.05 * start


@pytest.mark.parametrize("explicit", [False, True])
def test_sparse_mode_keeps_pruned_entries_exactly_zero(explicit):
    model = tiny_model()
    first, second = model[0].weight, model[2].weight
    with torch.no_grad():
        first[0, :2] = 0.0
        second[1, 0] = 0.0
    masks = {}
    if explicit:
        masks[second] = torch.rand(second.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    opt = MFAC(
        model.parameters(),
        lr=0.1,
        momentum=0.5,
        weight_decay=0.1,
        ngrads=4,
        sparse=True,
        masks=masks,
    )
    pruned = {first: first == 0, second: ~masks[second] if explicit else second == 0}
    start = {p: p.detach().clone() for p in pruned}
    for batch in batches(6):
        opt.zero_grad()
        backward(model, batch)
        opt.step()
    for p, zero in pruned.items():
        assert zero.any()
        assert torch.equal(p[zero], torch.zeros_like(p[zero]))
        assert (p[~zero] != start[p][~zero]).all()  # the kept entries do move
    assert opt.state_dict()["mfac_window"]["grads"].shape[1] == sum(
        int((p != 0).sum()) for p in model.parameters()
    )


def test_state_dict_round_trip_resumes_exactly():
    data = batches(10)
    model, twin = tiny_model(), tiny_model()
    opt = MFAC(model.parameters(), lr=0.05, momentum=0.5, damp=1e-2, ngrads=4)
    for batch in data[:6]:
        opt.zero_grad()
        backward(model, batch)
        opt.step()
    twin.load_state_dict(model.state_dict())
    resumed = MFAC(twin.parameters(), lr=0.05, momentum=0.5, damp=1e-2, ngrads=4)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for batch in data[6:]:
        for o, mdl in ((opt, model), (resumed, twin)):
            o.zero_grad()
            backward(mdl, batch)
            o.step()
    torch.testing.assert_close(flat_params(twin), flat_params(model), rtol=0, atol=0)


def test_param_without_grad_does_not_move():
    model = tiny_model()
    model[2].bias.requires_grad_(False)
    bias = model[2].bias.detach().clone()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=3)
    backward(model, batches(1)[0])
    opt.step()
    assert torch.equal(model[2].bias, bias)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"damp": 0.0},
        {"damp": float("nan")},
        {"ngrads": 0},
        {"ngrads": 2.0},
        {"lr": -1.0},
        {"momentum": 1.0},
        {"weight_decay": -0.1},
        {"masks": {}},
    ],
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(RecipeError, match="MFAC"):
        MFAC(tiny_model().parameters(), **kwargs)
