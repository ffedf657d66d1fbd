"""The Hessian diagonal (exact and Hutchinson) against torch.autograd.functional.hessian."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sparseml.curvature import hessian_diagonal, rademacher_probes, unit_vectors
from sparseml.grad_sampler import GradSampler


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def batches(**kw):
    gen = torch.Generator().manual_seed(2)
    return [
        ([torch.randn(6, 3, generator=gen)], {}, torch.randint(0, 3, (6,), generator=gen))
        for _ in range(2)
    ]


def true_diagonal(net):
    """diag and the Hessian of the loss, averaged over both batches, in the two weights."""
    names = ["0.weight", "2.weight"]
    shapes = [net.get_parameter(n).shape for n in names]
    sizes = [s.numel() for s in shapes]
    flat = torch.cat([net.get_parameter(n).detach().reshape(-1) for n in names])

    def loss(w):
        params = {n: p.reshape(s) for n, p, s in zip(names, w.split(sizes), shapes)}
        return sum(
            F.cross_entropy(functional_call(net, params, tuple(args)), t)
            for args, _, t in batches()
        ) / len(batches())

    H = torch.autograd.functional.hessian(loss, flat)
    return torch.diagonal(H), H


def estimate(net, vectors, num):
    params = [net[0].weight, net[2].weight]
    sampler = GradSampler(batches, F.cross_entropy)
    pairs = sampler.iter_hessian_products(net, params, num, vectors)
    return torch.cat(hessian_diagonal(pairs, [p.numel() for p in params], num))


def test_exact_mode_is_the_exact_diagonal(one_thread):
    net = tiny().train()
    diag, _ = true_diagonal(net)
    sizes, devices = [12, 12], [torch.device("cpu")] * 2
    got = estimate(net, unit_vectors(sizes, devices, torch.float32), 2)  # both batches
    torch.testing.assert_close(got, diag.double(), rtol=1e-5, atol=1e-7)
    assert net.training  # eval while sampling, restored


def test_hutchinson_converges_within_five_standard_errors(one_thread):
    net = tiny()
    diag, H = true_diagonal(net)
    m = 600  # probes, alternating over the two batches
    sizes, devices = [12, 12], [torch.device("cpu")] * 2
    got = estimate(net, rademacher_probes(sizes, devices, torch.float32, seed=3), m)
    # one probe's entry q has variance sum_{j != q} H_qj^2 (per batch; bounded by the mean H's
    # off-diagonal mass times a safety factor for the two batches' difference)
    off = (H.double().square().sum(1) - diag.double().square()).clamp_min(0)
    tolerance = 5 * (2 * off / m).sqrt() + 1e-6
    assert ((got - diag.double()).abs() <= tolerance).all()
    assert not torch.allclose(got, diag.double(), rtol=1e-6, atol=1e-9)  # an estimate, not exact


class Attention(nn.Module):
    """Fused scaled-dot-product attention, whose fast CPU kernel has no double backward."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return self.head(F.scaled_dot_product_attention(q, k, v).squeeze(1).mean(1))


def test_models_with_fused_attention_get_hessian_products(one_thread):
    torch.manual_seed(0)
    net = Attention()
    gen = torch.Generator().manual_seed(4)
    data = [([torch.randn(2, 5, 4, generator=gen)], {}, torch.tensor([0, 2]))]
    sampler = GradSampler(lambda **kw: data, F.cross_entropy)
    sizes = [net.qkv.weight.numel()]
    pairs = sampler.iter_hessian_products(
        net, [net.qkv.weight], 1, unit_vectors(sizes, [torch.device("cpu")], torch.float32)
    )
    got = hessian_diagonal(pairs, sizes, 1)[0]

    def loss(w):
        (args, _, t) = data[0]
        out = functional_call(net, {"qkv.weight": w.view(12, 4)}, tuple(args))
        return F.cross_entropy(out, t)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        H = torch.autograd.functional.hessian(loss, net.qkv.weight.detach().reshape(-1))
    torch.testing.assert_close(got, torch.diagonal(H).double(), rtol=1e-5, atol=1e-7)
