"""K-FAC factors, inverse diagonal and matvec against explicit Kronecker products; the grad
sampler's layer statistics against autograd."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseml.curvature import damped_inverses, kfac_factors, kfac_inverse_diag, kfac_matvec
from sparseml.grad_sampler import GradSampler


def explicit_factors(layer, batches):
    """A, G by explicit loops over examples and positions (no unfold for the patches)."""
    A = G = 0
    for x, d in batches:
        x, d = x.double(), d.double()
        b = x.shape[0]
        if isinstance(layer, nn.Conv2d):
            (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
            xp = F.pad(x, (pw, pw, ph, ph))
            oh, ow = d.shape[2], d.shape[3]
            rows, grads = [], []
            for n in range(b):
                for i in range(oh):
                    for j in range(ow):
                        patch = xp[n, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
                        rows.append(patch.reshape(-1))  # (c, kh, kw) order = weight's
                        grads.append(d[n, :, i, j])
            a, g, S = torch.stack(rows), torch.stack(grads), oh * ow
        else:
            a, g, S = (
                x.reshape(-1, x.shape[-1]),
                d.reshape(-1, d.shape[-1]),
                x[0].numel() // x.shape[-1],
            )
        A = A + (a / S).T @ (a / S) / b
        G = G + (b * S * g).T @ (b * S * g) / b  # WoodFisher: sums over rows / examples
    return A / len(batches), G / len(batches)


def dense_inverse(A, G, damp):
    pi = (torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0])
    Ad = A + math.sqrt(damp * pi) * torch.eye(A.shape[0], dtype=A.dtype)
    Gd = G + math.sqrt(damp / pi) * torch.eye(G.shape[0], dtype=G.dtype)
    return torch.linalg.inv(torch.kron(Gd, Ad))  # row-major (out, in) order: G outer


CASES = {
    "linear": (nn.Linear(5, 3), lambda gen: torch.randn(4, 5, generator=gen), (4, 3)),
    "linear_tokens": (nn.Linear(4, 3), lambda gen: torch.randn(2, 3, 4, generator=gen), (2, 3, 3)),
    "conv": (
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        lambda gen: torch.randn(2, 2, 5, 5, generator=gen),
        (2, 3, 3, 3),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_factors_diag_and_matvec_match_the_dense_kronecker_inverse(case):
    layer, make_x, out_shape = CASES[case]
    gen = torch.Generator().manual_seed(0)
    batches = [(make_x(gen), torch.randn(*out_shape, generator=gen)) for _ in range(3)]
    [(A, G)] = kfac_factors([[b] for b in batches], [layer])
    A_ref, G_ref = explicit_factors(layer, batches)
    torch.testing.assert_close(A, A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12)

    damp = 0.3
    inv = damped_inverses(A, G, damp)
    dense = dense_inverse(A_ref, G_ref, damp)
    d = layer.weight.numel()
    assert dense.shape == (d, d)
    torch.testing.assert_close(kfac_inverse_diag(inv), torch.diagonal(dense), rtol=1e-9, atol=0)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(kfac_matvec(inv, v), dense @ v, rtol=1e-9, atol=1e-12)


def test_pi_damping_balances_the_factors():
    A, G = 4.0 * torch.eye(2, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    inv = damped_inverses(A, G, 0.16)  # pi = 4: A + sqrt(0.64) I, G + sqrt(0.04) I
    torch.testing.assert_close(torch.diagonal(inv.A_inv), torch.full((2,), 1 / 4.8).double())
    torch.testing.assert_close(torch.diagonal(inv.G_inv), torch.full((3,), 1 / 1.2).double())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def loader(**kw):
    gen = torch.Generator().manual_seed(1)
    return [([torch.randn(5, 1, 4, 4, generator=gen)], {}, torch.tensor([0, 1, 2, 0, 1]))] * 2


def test_layer_stats_are_the_inputs_and_output_gradients_of_the_batch_loss():
    torch.manual_seed(0)
    net = Net().train()
    net.fc.weight.grad = torch.ones_like(net.fc.weight)  # a training step's gradient
    sampler = GradSampler(loader, F.cross_entropy)
    [stats] = list(sampler.iter_layer_stats(net, [net.conv, net.fc], 1))
    assert net.training and torch.equal(net.fc.weight.grad, torch.ones_like(net.fc.weight))
    assert net.conv.weight.grad is None  # .grad untouched, set aside and restored

    (x, d_conv), (h, d_fc) = stats
    (args, _, target), _ = loader()
    net.eval()
    net.zero_grad()
    F.cross_entropy(net(*args), target).backward()
    torch.testing.assert_close(x, args[0])
    # the weight gradient of the batch-mean loss is sum_n d_n a_n^T (conv: over positions)
    torch.testing.assert_close(d_fc.T @ h, net.fc.weight.grad)
    patches = F.unfold(x, 3, padding=1)  # (b, c*9, S)
    conv_grad = torch.einsum("bos,bis->oi", d_conv.flatten(2), patches)
    torch.testing.assert_close(conv_grad, net.conv.weight.grad.reshape(2, -1))


def test_a_layer_that_the_forward_does_not_call_is_a_clear_error():
    from sparseml.errors import GradSamplerError

    net = Net()
    sampler = GradSampler(loader, F.cross_entropy)
    with pytest.raises(GradSamplerError, match="layer 1 .*not called"):
        list(sampler.iter_layer_stats(net, [net.fc, nn.Linear(2, 2)], 1))


def test_nan_layer_statistics_and_hessian_products_stop_with_a_numerical_error():
    from sparseml.curvature import unit_vectors
    from sparseml.errors import NumericalError

    net = Net()
    x = torch.randn(2, 1, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    poisoned = [([x], {}, torch.tensor([0, 1]))]
    # a finite loss (the loss check passes) whose statistics and derivatives are not finite
    sampler = GradSampler(lambda **kw: poisoned, lambda out, t: (out.nan_to_num() ** 3).sum())
    with pytest.raises(NumericalError, match="layer statistics"):
        list(sampler.iter_layer_stats(net, [net.conv, net.fc], 1))
    vectors = unit_vectors([net.fc.weight.numel()], [torch.device("cpu")], torch.float32)
    with pytest.raises(NumericalError, match="Hessian-vector products"):
        list(sampler.iter_hessian_products(net, [net.fc.weight], 1, vectors))
