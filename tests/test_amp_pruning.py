"""Every pruner under mixed precision: autocast training steps, and half-precision timm models.

Training: float32 weights, float16 (with a GradScaler) or bfloat16 autocast forward passes,
gradual pruning through the manager's step wrapper. One-shot: a tiny timm ViT converted with
``.half()`` / ``.to(torch.bfloat16)`` pruned through ``manager.apply``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparseml.pruning import PruningModifier
from sparseml.pytorch.optim import ScheduledModifierManager
from sparseml.registry import modifier_classes
from toy import builder, mlp

PRUNERS = sorted(  # the built-in ones (tests may register their own)
    n
    for n, c in modifier_classes().items()
    if issubclass(c, PruningModifier)
    and c.__module__.startswith("sparseml.")
    and "final_sparsity" in c.fields
)
# Values given to every pruner that has these fields (magnitude pruners have none; full-Fisher
# pruners have no block size).
SAMPLING = {"num_grads": 8, "damp": 0.01, "fisher_block_size": 8}
LAYER_WISE = {"FastCAPruningModifier", "MagnitudePruningModifier"}


def recipe(name: str, gradual: bool) -> str:
    fields = modifier_classes()[name].fields
    extra = "\n    ".join(f"{k}: {v}" for k, v in SAMPLING.items() if k in fields)
    schedule = (
        "init_sparsity: 0.2\n    final_sparsity: 0.5\n    start_epoch: 0\n    end_epoch: 1\n"
        "    update_frequency: 0.5"
        if gradual
        else "init_sparsity: 0.5\n    final_sparsity: 0.5\n    start_epoch: 0\n    end_epoch: 0"
    )  # fmt: skip
    glob = "" if name in LAYER_WISE else "global_sparsity: true"
    return f"modifiers:\n  - !{name}\n    params: {{params}}\n    {schedule}\n    {extra}\n    {glob}\n"


def amp_sampler(dtype: torch.dtype) -> dict:
    def loss(out, target):
        return F.mse_loss(out.float(), target)

    def build(**kw):
        for args, kwargs, target in builder()(**kw):
            yield [a.to(dtype) for a in args], kwargs, target

    return {"data_loader_builder": build, "loss_fn": loss}


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", PRUNERS)
def test_autocast_training_with_every_pruner(name: str, amp: torch.dtype, one_thread) -> None:
    model = mlp()
    manager = ScheduledModifierManager.from_yaml(
        recipe(name, gradual=True).replace("{params}", '["re:.*weight"]')
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    wrapped = manager.modify(model, opt, steps_per_epoch=2, grad_sampler=amp_sampler(torch.float32))
    scaler = torch.amp.GradScaler("cpu", enabled=amp == torch.float16)
    batches, zeros = builder()(), None
    for _ in range(4):
        (x,), _, target = next(batches)
        with torch.autocast("cpu", dtype=amp):
            loss = F.mse_loss(model(x).float(), target)
        scaler.scale(loss).backward()
        scaler.step(wrapped)
        scaler.update()
        wrapped.zero_grad()
        now = [w == 0 for w in (model[0].weight, model[2].weight)]
        if zeros is not None:
            assert all(bool(n[z].all()) for n, z in zip(now, zeros))  # never reopen
        zeros = now
    manager.finalize(model)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    counts = [int(z.sum()) for z in zeros]
    if name in LAYER_WISE:
        assert counts == [32, 16]
    else:
        assert sum(counts) == 48


# FastCAP with this project's options (row-aligned Fisher, scaled rows, global allocation)
FAST_CAP_ROWS = "FastCAPruningModifier+rows"
ROWS_FIELDS = "fisher_layout: rows\n    row_scaling: true\n    global_sparsity: true\n"
# ... with the layers' sparsities from the sweeps' loss curves
FAST_CAP_CURVES = "FastCAPruningModifier+curves"
CURVES_FIELDS = ROWS_FIELDS + "    global_allocation: losses\n"
# ... and one Fisher per 5 output rows (groups with a padded last one), each with its own
# curve, each group reaching its target in 3 sweeps
FAST_CAP_GROUPS = "FastCAPruningModifier+groups"
GROUPS_FIELDS = CURVES_FIELDS + "    fisher_rows: 5\n    sweeps: 3\n"
OURS = {FAST_CAP_ROWS: ROWS_FIELDS, FAST_CAP_CURVES: CURVES_FIELDS, FAST_CAP_GROUPS: GROUPS_FIELDS}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=["fp16", "bf16", "fp64"])  # fmt: skip
@pytest.mark.parametrize("name", ["OBSPruningModifier", "CAPruningModifier",
                                  "FastCAPruningModifier", FAST_CAP_ROWS, FAST_CAP_CURVES,
                                  FAST_CAP_GROUPS, "MFACPruningModifier"])  # fmt: skip
def test_half_precision_timm_model_one_shot(name: str, dtype: torch.dtype, research) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=16, patch_size=8,
        embed_dim=16, depth=1, num_heads=2,
    ).to(dtype)  # fmt: skip
    params = '["re:.*(qkv|fc1|fc2).weight"]'
    text = recipe(name.split("+")[0], gradual=False).replace("{params}", params)
    if name in OURS:
        text += "    " + OURS[name]
    manager = ScheduledModifierManager.from_yaml(text)

    def build(**kw):
        gen = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(4, 3, 16, 16, generator=gen).to(dtype)
            yield [x], {}, torch.randint(0, 4, (4,), generator=gen)

    def loss(out, target):
        return F.cross_entropy(out.float(), target)

    manager.apply(model, grad_sampler={"data_loader_builder": build, "loss_fn": loss})
    weights = [p for n, p in model.named_parameters() if n.endswith(("qkv.weight", "fc1.weight",
                                                                      "fc2.weight"))]  # fmt: skip
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    total = sum(p.numel() for p in weights)
    zeros = sum(int((p == 0).sum()) for p in weights)
    if name in LAYER_WISE:
        assert zeros == sum(round(0.5 * p.numel()) for p in weights)
    else:  # FastCAP's global allocations: per-layer (per-group) targets, each met within a weight
        units = (
            sum(-(-p.shape[0] // 5) for p in weights) if name == FAST_CAP_GROUPS else len(weights)
        )
        slack = units if name in OURS else 0
        assert abs(zeros - round(0.5 * total)) <= slack


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, torch.bfloat16), ("bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_amp_dtype_on_cpu_is_the_one_asked_for(given, expected, research) -> None:
    """--amp-dtype float16 on CPU used to run bfloat16 silently (with float16 recorded in
    args.yaml); now it is what runs, loss-scaled, and the default is said in args.yaml."""
    import argparse

    from utils.training import setup_amp

    args = argparse.Namespace(amp=True, amp_dtype=given)
    autocast, scaler = setup_amp(args, torch.device("cpu"))
    with autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == expected
    assert (scaler is not None) == (expected == torch.float16)
    assert args.amp_dtype == str(expected).removeprefix("torch.")
