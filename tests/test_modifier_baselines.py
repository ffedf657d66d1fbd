"""The baseline pruners (diagonal Fisher, Hessian diagonal, K-FAC, GWProd) against their
formulas, their field checks, and CAP's GWProd recipe loaded and run unchanged."""

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from sparseml.errors import RecipeError
from sparseml.grad_sampler import GradSampler
from sparseml.masks import MaskSpec, create_masks
from sparseml.pytorch.optim import ScheduledModifierManager
from toy import mlp as toy_mlp
from toy import sampler as toy_sampler

CAP_GW = Path(__file__).parent / "fixtures" / "gw_vit_sp=0.50_Ng=4096.yaml"


class Table(GradSampler):
    """Sample i is row i of a fixed table; K-FAC batches are fixed per-layer tensors."""

    def __init__(self, table, layer_batches=None):
        super().__init__(lambda **kw: iter(()), lambda out, target: out.sum())
        self.table, self.layer_batches, self.row = table, layer_batches, 0

    def _one_gradient(self, module, params, dtype):
        sample, self.row = self.table[self.row % len(self.table)], self.row + 1
        return [s.to(dtype) for s in sample.split([p.numel() for p in params])]

    def _layer_stats(self, module, layers, dtype):
        batch, self.row = self.layer_batches[self.row], self.row + 1
        return batch


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))


def recipe(tag, extra="", sparsity=0.5, params='["re:.*weight"]'):
    return f"""
modifiers:
  - !{tag}
    params: {params}
    init_sparsity: {sparsity}
    final_sparsity: {sparsity}
    start_epoch: 0
    end_epoch: 0
    {extra}
"""


def prune(model, text, sampler):
    ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler)
    return [model[0].weight.detach().clone(), model[2].weight.detach().clone()]


def expected_masks(scores, sparsity=0.5, spec=None, glob=True):
    return create_masks(scores, [sparsity] * len(scores), spec or MaskSpec(), glob)


def grads(m=16, d=96):
    return 0.1 * torch.randn(m, d, generator=torch.Generator().manual_seed(1))


def test_diag_fisher_scores_are_half_damped_fisher_times_w_squared(one_thread):
    net, table = mlp(), grads()
    w = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    fisher = table.square().mean(0).split([64, 32])
    scores = [0.5 * (f.view_as(x) + 0.01) * x.square() for f, x in zip(fisher, w)]
    got = prune(
        net, recipe("DiagFisherPruningModifier", "num_grads: 16\n    damp: 0.01"), Table(table)
    )
    for g, x, keep in zip(got, w, expected_masks(scores)):
        assert torch.equal(g, x * keep)  # score only: kept weights unchanged


@pytest.mark.parametrize("mask", ["unstructured", "block4", "2:4"])
@pytest.mark.parametrize("score", ["movement", "abs"])
def test_gwprod_scores_sum_w_times_gradients(mask, score, one_thread):
    net, table = mlp(), grads()
    w = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    if score == "movement":
        sums = table.sum(0).split([64, 32])
        scores = [-x * s.view_as(x) for x, s in zip(w, sums)]
    else:
        sums = table.abs().sum(0).split([64, 32])
        scores = [x.abs() * s.view_as(x) for x, s in zip(w, sums)]
    spec = {"unstructured": MaskSpec(), "block4": MaskSpec("block", 4), "2:4": MaskSpec("nm", 4, 2)}
    extra = f"num_grads: 16\n    score: {score}\n    mask_type: '{mask}'\n    global_sparsity: true"
    got = prune(net, recipe("GWProdPruningModifier", extra), Table(table))
    for g, x, keep in zip(got, w, expected_masks(scores, spec=spec[mask])):
        assert torch.equal(g, x * keep)


def test_hessian_diag_exact_scores_use_the_clamped_true_diagonal(one_thread):
    net = mlp()
    gen = torch.Generator().manual_seed(3)
    data = [([torch.randn(5, 8, generator=gen)], {}, torch.randint(0, 4, (5,), generator=gen))]
    w = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    names = ["0.weight", "2.weight"]

    def loss(flat):
        params = {n: p.view_as(x) for n, p, x in zip(names, flat.split([64, 32]), w)}
        (args, _, t) = data[0]
        return F.cross_entropy(torch.func.functional_call(net, params, tuple(args)), t)

    H = torch.diagonal(
        torch.autograd.functional.hessian(loss, torch.cat([x.reshape(-1) for x in w]))
    )
    assert (H < 0).any()  # the clamp matters here
    scores = [
        0.5 * (h.view_as(x).clamp_min(0) + 1e-3) * x.square() for h, x in zip(H.split([64, 32]), w)
    ]
    sampler = {"data_loader_builder": lambda **kw: data, "loss_fn": F.cross_entropy}
    extra = "num_grads: 1\n    damp: 1.0e-3\n    hessian_method: exact"
    got = prune(net, recipe("HessianDiagPruningModifier", extra), sampler)
    for g, x, keep in zip(got, w, expected_masks(scores)):
        assert torch.equal(g, x * keep)


def test_kfac_scores_and_update_match_obs_with_the_dense_kronecker_fisher(one_thread):
    net = mlp()
    gen = torch.Generator().manual_seed(4)
    batches = [
        [
            (torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)),
            (torch.randn(6, 8, generator=gen), torch.randn(6, 4, generator=gen)),
        ]
        for _ in range(3)
    ]
    w = [net[0].weight.detach().double(), net[2].weight.detach().double()]
    damp, Hs = 0.05, []
    for i in range(len(w)):
        a = torch.cat([b[i][0] for b in batches]).double()
        d = torch.cat([b[i][1] for b in batches]).double() * 6  # b * delta
        A, G = a.T @ a / len(a), d.T @ d / len(d)
        pi = (A.trace() / A.shape[0]) / (G.trace() / G.shape[0])
        F_ = torch.kron(
            G + (damp / pi) ** 0.5 * torch.eye(len(G)), A + (damp * pi) ** 0.5 * torch.eye(len(A))
        )
        Hs.append(torch.linalg.inv(F_))
    scores = [x.reshape(-1).square() / (2 * H.diagonal()) for x, H in zip(w, Hs)]
    keeps = expected_masks([s.float() for s in scores])
    extra = "num_grads: 3\n    damp: 0.05"
    got = prune(net, recipe("KFACPruningModifier", extra), Table(None, batches))
    for g, x, H, keep in zip(got, w, Hs, keeps):
        flat, k = x.reshape(-1), keep.reshape(-1)
        new = flat * ~k / H.diagonal()
        want = ((flat - H @ new) * k).view_as(x)
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-7)
        assert torch.equal(g == 0, ~keep.view_as(g))


@pytest.mark.parametrize(
    "module, name",
    [(nn.LayerNorm(8), "0.weight"), (nn.Conv2d(4, 4, 1, groups=2), "0.weight")],
    ids=["layernorm", "grouped_conv"],
)
def test_kfac_names_a_parameter_it_cannot_model(module, name):
    net = nn.Sequential(module)
    sampler = Table(grads())
    with pytest.raises(RecipeError, match=f"'params'.*selects {name}, which"):
        prune_net = ScheduledModifierManager.from_yaml(recipe("KFACPruningModifier"))
        prune_net.apply(net, grad_sampler=sampler)


@pytest.mark.parametrize(
    "tag, field",
    [
        ("DiagFisherPruningModifier", "fisher_block_size: 8"),
        ("GWProdPruningModifier", "damp: 0.1"),
        ("KFACPruningModifier", "fisher_inv_device: cpu"),
        ("HessianDiagPruningModifier", "hessian_method: lanczos"),
    ],
)
def test_fields_that_do_nothing_are_refused(tag, field):
    with pytest.raises(RecipeError, match=f"{tag}: .*{field.split(':')[0]}"):
        ScheduledModifierManager.from_yaml(recipe(tag, field))


class Block(nn.Module):
    """The parameter names of a timm ViT block (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)."""

    def __init__(self, dim=8):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(3 * dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, 3)

    def forward(self, x):
        h = x + self.attn.proj(torch.tanh(self.attn.qkv(x)))
        return self.mlp.fc2(torch.relu(self.mlp.fc1(h)))


def test_caps_gwprod_recipe_loads_and_runs_unchanged(one_thread):
    text = CAP_GW.read_text()
    assert text.startswith("pruning_modifiers:") and "num_grads: 4096" in text
    manager = ScheduledModifierManager.from_yaml(str(CAP_GW))
    [gw] = manager.modifiers
    assert (gw.num_grads, gw.global_sparsity, gw.mask_type) == (4096, True, "unstructured")
    torch.manual_seed(0)
    net = Block()
    weights = [net.attn.qkv.weight, net.attn.proj.weight, net.mlp.fc1.weight, net.mlp.fc2.weight]
    sampler = Table(grads(64, sum(w.numel() for w in weights)))  # 4096 draws, cycled
    manager.apply(net, grad_sampler=sampler)
    assert sampler.row == 4096
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.5 * sum(w.numel() for w in weights))


DIST_RECIPES = [
    recipe("DiagFisherPruningModifier", "num_grads: 8\n    damp: 1.0e-4"),
    recipe("GWProdPruningModifier", "num_grads: 8"),
    recipe("HessianDiagPruningModifier", "num_grads: 4\n    damp: 1.0e-4"),
    recipe("KFACPruningModifier", "num_grads: 4\n    damp: 1.0e-3"),
    recipe("KFACPruningModifier", "num_grads: 4\n    damp: 1.0e-3\n    mask_type: '2:4'"),
]


def _dist_worker(rank, world, init_file, out_file):
    tdist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        torch.set_num_threads(1)
        result = []
        for text in DIST_RECIPES:
            model = toy_mlp()
            ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=toy_sampler())
            result.append([p.detach() for p in model.parameters()])
        torch.save(result, f"{out_file}.{rank}")
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_match_one_process(tmp_path):
    """Both ranks see the same batches (the toy loader ignores the seed), so the rank-averaged
    estimates (K-FAC factors, Hessian diagonal with shared probes) equal one process's."""
    out = tmp_path / "weights"
    mp.spawn(_dist_worker, args=(2, tmp_path / "init", str(out)), nprocs=2)
    for i, text in enumerate(DIST_RECIPES):
        model = toy_mlp()
        ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=toy_sampler())
        for rank in range(2):
            got = torch.load(f"{out}.{rank}", weights_only=True)[i]
            for a, b in zip(got, model.parameters()):
                torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
                assert torch.equal(a == 0, b == 0)
