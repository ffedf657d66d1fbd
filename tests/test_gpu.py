"""CUDA paths against their CPU results (marker ``gpu``; skipped without a CUDA device).

Run by ``bash research/bench/gpu_check.sh`` together with the CUDA benchmarks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparseml.kernels.fast_cap import accumulate_shared_fisher, fast_cap_losses, fast_cap_prune
from sparseml.kernels.fisher import to_blocks
from sparseml.kernels.fisher_build import block_fisher_inverse
from sparseml.kernels.mfac import MFACInverse
from sparseml.optim.mfac import MFAC
from sparseml.pytorch.optim import ScheduledModifierManager
from toy import builder, mlp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
PRUNERS = [
    "OBSPruningModifier",
    "CAPruningModifier",
    "FastCAPruningModifier",
    "MFACPruningModifier",
]


def recipe(name: str, extra: str = "") -> str:
    return f"""
modifiers:
  - !{name}
    params: ["re:.*weight"]
    init_sparsity: 0.2
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 1
    update_frequency: 0.5
    num_grads: 16
    damp: 0.01
    fisher_block_size: 8
    {extra}
"""


def sampler_on(device: str) -> dict:
    def build(**kw):
        for args, kwargs, target in builder()(**kw):
            yield [a.to(device) for a in args], kwargs, target.to(device)

    return {"data_loader_builder": build, "loss_fn": F.mse_loss}


def one_shot(name: str, device: str, extra: str = "") -> torch.nn.Module:
    model = mlp().to(device)
    text = recipe(name, extra).replace("init_sparsity: 0.2", "init_sparsity: 0.5")
    text = text.replace("end_epoch: 1", "end_epoch: 0")
    ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler_on(device))
    return model


def assert_close_pruning(got: torch.nn.Module, want: torch.nn.Module) -> None:
    for a, b in zip(got.parameters(), want.parameters()):
        a = a.detach().cpu()
        differ = ((a == 0) != (b.detach() == 0)).float().mean().item()
        assert differ <= 0.02  # only near-ties may flip between devices
        if differ == 0:
            torch.testing.assert_close(a, b.detach(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", PRUNERS)
def test_one_shot_cuda_matches_cpu(name: str) -> None:
    assert_close_pruning(one_shot(name, "cuda"), one_shot(name, "cpu"))


@pytest.mark.parametrize("name", ["OBSPruningModifier", "CAPruningModifier"])
def test_fisher_on_the_cpu_for_a_cuda_model(name: str) -> None:
    model = one_shot(name, "cuda", extra="fisher_inv_device: cpu")
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert_close_pruning(model, one_shot(name, "cpu"))


def test_mfac_available_devices_computes_on_cuda_for_a_cpu_model() -> None:
    model = one_shot("MFACPruningModifier", "cpu", extra="available_devices: ['cuda:0']")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert_close_pruning(model, one_shot("MFACPruningModifier", "cpu"))


def test_kernels_cuda_match_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(96, 640, generator=gen)
    H_cpu = block_fisher_inverse(grads, 64, 1e-3).full()
    H_gpu = block_fisher_inverse(grads.cuda(), 64, 1e-3)
    assert H_gpu.device.type == "cuda"
    torch.testing.assert_close(
        H_gpu.cpu().full(), H_cpu, rtol=1e-6, atol=1e-6 * H_cpu.abs().max().item()
    )
    for block in (None, 32, 128):
        cpu, gpu = (
            MFACInverse.build(grads, 1e-3, block),
            MFACInverse.build(grads.cuda(), 1e-3, block),
        )
        torch.testing.assert_close(gpu.diag().cpu(), cpu.diag(), rtol=1e-4, atol=1e-2)
        x = torch.randn(640, generator=gen)
        torch.testing.assert_close(gpu.mul(x.cuda()).cpu(), cpu.mul(x), rtol=1e-4, atol=1e-2)
    W = torch.randn(10, 64, generator=gen)
    outs = []
    for device in ("cpu", "cuda"):
        F_ = accumulate_shared_fisher(grads.to(device), 64)
        blocks = to_blocks(W.reshape(-1).to(device), 64)
        new, keep = fast_cap_prune(blocks, F_, 96, 0.5, damp=1e-2, block_size=64)
        outs.append((new.cpu(), keep.cpu()))
    assert ((outs[0][1] != outs[1][1]).float().mean()) <= 0.02


def grouped_fast_cap(device: str) -> tuple[torch.Tensor, ...]:
    """FastCAP with one Fisher per 4 rows (3 groups, the last one padded) on ``device``:
    the pruned rows, the mask, the groups' loss curves measured on 2 rows each and the mask of
    three sweeps."""
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(32, 12 * 64, generator=gen).to(device)
    W = torch.randn(12, 64, generator=gen, dtype=torch.float64).to(device)
    valid = torch.ones(12, 64, dtype=torch.bool, device=device)
    valid[10:] = False
    W = W * valid
    F_ = accumulate_shared_fisher(grads, 64, group_rows=4)
    new, keep = fast_cap_prune(W, F_, 32, [0.5, 0.6, 0.7], damp=1e-2, block_size=32, valid=valid)
    removed, loss = fast_cap_losses(W, F_, 32, [0.5, 0.9], block_size=32, valid=valid, max_rows=6)
    pruned = torch.zeros_like(valid)
    pruned[:, :8] = True  # three sweeps of rising sparsity from 1/8 already pruned
    _, multi = fast_cap_prune(
        W, F_, 32, [0.8, 0.9, 0.7], damp=1e-2, block_size=32, valid=valid, pruned=pruned, sweeps=3
    )
    return tuple(t.cpu() for t in (new, keep, removed, loss, multi))


def test_grouped_fast_cap_cuda_matches_cpu() -> None:
    cpu, gpu = grouped_fast_cap("cpu"), grouped_fast_cap("cuda")
    assert ((cpu[1] != gpu[1]).float().mean()) <= 0.02
    torch.testing.assert_close(gpu[2], cpu[2], rtol=0.05, atol=2.0)
    torch.testing.assert_close(gpu[3], cpu[3], rtol=1e-2, atol=1e-6)
    assert ((cpu[4] != gpu[4]).float().mean()) <= 0.02


def test_mfac_optimizer_cuda_matches_cpu() -> None:
    results = []
    for device in ("cpu", "cuda"):
        model = mlp().to(device)
        opt = MFAC(model.parameters(), lr=0.01, ngrads=4, damp=1e-4)
        batches = builder()()
        for _ in range(5):
            (x,), _, target = next(batches)
            F.mse_loss(model(x.to(device)), target.to(device)).backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", PRUNERS)
def test_amp_training_steps_on_cuda(name: str, amp: torch.dtype) -> None:
    model = mlp().cuda()
    manager = ScheduledModifierManager.from_yaml(recipe(name))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    wrapped = manager.modify(model, opt, steps_per_epoch=2, grad_sampler=sampler_on("cuda"))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    batches = builder()()
    for _ in range(4):
        (x,), _, target = next(batches)
        with torch.autocast("cuda", dtype=amp):
            loss = F.mse_loss(model(x.cuda()).float(), target.cuda())
        scaler.scale(loss).backward()
        scaler.step(wrapped)
        scaler.update()
        wrapped.zero_grad()
    manager.finalize(model)
    zeros = sum(int((m.weight == 0).sum()) for m in (model[0], model[2]))
    if name == "FastCAPruningModifier":
        assert zeros == 32 + 16
    else:
        assert zeros == 48
    assert all(torch.isfinite(p).all() for p in model.parameters())
