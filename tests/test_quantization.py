"""QuantizationModifier: the int8 grids, exact zeros, hooks that rename nothing, schedule,
exact resume, one-shot calibration, recipe fields (SparseML's names) and errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseml.errors import RecipeError
from sparseml.kernels import quant as qk
from sparseml.modifiers.quantization import QuantizationModifier, quant_bits_by_layer
from sparseml.pytorch.optim import ScheduledModifierManager
from toy import builder

pytestmark = pytest.mark.usefixtures("one_thread")

QAT = """
modifiers:
  - !ConstantPruningModifier
    params: __ALL_PRUNABLE__
    start_epoch: 0
  - !QuantizationModifier
    start_epoch: {start}
    disable_quantization_observer_epoch: {observer}
    freeze_bn_stats_epoch: {observer}
"""


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)
    )


def prune_half(model: nn.Module) -> dict[str, torch.Tensor]:
    """Zero the smaller half of every Linear/Conv weight; return the keep-masks."""
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                w = module.weight
                keep = w.abs() > w.abs().flatten().median()
                w.mul_(keep)
                masks[f"{name}.weight"] = keep
    return masks


def assert_on_grid(w_fq: torch.Tensor, scale: torch.Tensor, bits: int) -> None:
    """``w_fq`` is integers in the signed ``bits``-bit range times its channel's ``scale``."""
    q = w_fq.detach() / scale.view(-1, *[1] * (w_fq.dim() - 1))
    assert torch.allclose(q, q.round(), rtol=0, atol=1e-4)
    assert q.round().min() >= -(2 ** (bits - 1)) and q.round().max() <= 2 ** (bits - 1) - 1


# ----- the grid math ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_weights_lie_on_the_per_channel_grid_and_zeros_stay_exact(bits: int) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 3, 3, generator=gen) * torch.logspace(-3, 1, 6).view(6, 1, 1, 1)
    w[torch.rand(w.shape, generator=gen) < 0.5] = 0.0  # half pruned
    w[2] = 0.0  # a fully pruned channel: scale floor, no 0 * inf
    scale = qk.symmetric_scale(qk.channel_absmax(w), qk.weight_range(bits)[1])
    out = qk.fake_quant_weight(w, scale, bits)
    assert torch.isfinite(out).all()
    assert torch.equal(out[w == 0], torch.zeros(int((w == 0).sum())))  # exact zeros
    assert_on_grid(out, scale, bits)  # integers times the channel's scale
    q = (out / scale.view(-1, 1, 1, 1)).round()
    qmax = qk.weight_range(bits)[1]
    assert torch.equal(q.flatten(1).abs().amax(1)[[0, 1, 3, 4, 5]], torch.full((5,), float(qmax)))
    assert (out - w).abs().max() <= scale.max() / 2 + 1e-6  # rounding error <= half a step


@pytest.mark.parametrize("symmetric", [False, True])
def test_activation_grid_represents_zero_exactly(symmetric: bool) -> None:
    x = torch.tensor([-0.3, 0.0, 0.1234, 2.5, 0.0])
    qmin, qmax = qk.activation_range(8, symmetric, reduce_range=False)
    scale, zero = qk.affine_qparams(torch.tensor(0.2), x.max(), qmin, qmax, symmetric)  # lo > 0
    out = qk.fake_quant_activation(x, scale, zero, qmin, qmax)
    assert out[1] == 0 and out[4] == 0  # 0 is on the grid although the range was [0.2, 2.5]
    q = out / scale + zero
    assert torch.allclose(q, q.round(), atol=1e-4) and q.min() >= qmin and q.max() <= qmax
    assert qk.activation_range(8, False, reduce_range=True) == (0, 127)


# ----- hooks, training, masks ---------------------------------------------------------------------


def test_forward_is_the_fake_quantized_model_and_names_do_not_change() -> None:
    model = convnet()
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    manager = ScheduledModifierManager.from_yaml(QAT.format(start=0, observer=-1))
    manager.modify(model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=4)
    assert list(model.state_dict()) == keys and dict(model.named_parameters()) == params
    x = torch.randn(5, 2, 5, 5)
    model.eval()
    out = model(x)
    # Oracle: the same layers computed by hand from the modifier's ranges.
    state = manager.quantization_modifiers[0].qstate
    conv, bn, lin = model[0], model[1], model[4]

    def fq_in(name: str, t: torch.Tensor) -> torch.Tensor:
        scale, zero = state.input_qparams(name)
        return torch.fake_quantize_per_tensor_affine(t, float(scale), int(zero), 0, 255)

    def fq_w(w: torch.Tensor) -> torch.Tensor:
        scale = w.detach().flatten(1).abs().amax(1) / 127
        zero = torch.zeros(len(scale), dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)

    h = F.relu(bn(F.conv2d(fq_in("0", x), fq_w(conv.weight), conv.bias))).flatten(1)
    expected = F.linear(fq_in("4", h), fq_w(lin.weight), lin.bias)
    assert torch.allclose(out, expected, atol=1e-6)
    assert isinstance(model[0].weight, nn.Parameter)  # the parameter is back after the call
    with pytest.raises(RuntimeError):
        model(torch.randn(5, 3, 5, 5))  # a forward that raises puts the parameter back too
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert dict(model.named_parameters()) == params
    plain = convnet(1)
    plain.load_state_dict(model.state_dict())  # a checkpoint loads into a plain model
    assert quant_bits_by_layer(manager) == {
        "0": {"weight_bits": 8, "activation_bits": 8},
        "4": {"weight_bits": 8, "activation_bits": 8},
    }
    manager.quantization_modifiers[0].remove_quantization()
    assert torch.allclose(model(x), plain.eval()(x))  # float again


def test_qat_keeps_masks_and_zeros_through_training_and_schedule() -> None:
    model = convnet()
    masks = prune_half(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    manager = ScheduledModifierManager.from_yaml(QAT.format(start=1, observer=2))
    wrapped = manager.modify(model, opt, steps_per_epoch=3)
    quant = manager.quantization_modifiers[0]
    assert not quant.qstate.attached and quant_bits_by_layer(manager.state_dict()) == {}
    gen = torch.Generator().manual_seed(0)
    seen = []
    for step in range(12):
        x = torch.randn(8, 2, 5, 5, generator=gen)
        model.train()
        loss = model(x).logsumexp(1).mean()
        loss.backward()
        wrapped.step()
        wrapped.zero_grad()
        seen.append((quant.qstate.attached, quant.qstate.observing, quant.qstate.bn_frozen))
        if step == 6:
            frozen = copy.deepcopy(quant.qstate.act_stats)
            bn_stats = model[1].running_mean.clone()
    # step k runs at epoch k/3: QAT from step 3, observers and BN frozen from step 6
    assert seen[2] == (False, True, False) and seen[3] == (True, True, False)
    assert seen[6] == (True, False, True) and seen[11] == (True, False, True)
    assert all(torch.equal(frozen[k], v) for k, v in quant.qstate.act_stats.items())
    assert torch.equal(model[1].running_mean, bn_stats)  # BatchNorm statistics frozen
    for name, keep in masks.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        assert torch.all(module.weight[~keep] == 0), name
        fq = quant.qstate.fake_weight(name.removesuffix(".weight"), module.weight)
        assert torch.all(fq[~keep] == 0), name
        assert_on_grid(fq, quant.qstate.weight_scales[name.removesuffix(".weight")], 8)


def qat_setup():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, ScheduledModifierManager.from_yaml(QAT.format(start=0.5, observer=2.5))


def run(model, wrapped, batches, steps: int) -> None:
    for _ in range(steps):
        (x,), _, target = next(batches)
        F.mse_loss(model(x), target).backward()
        wrapped.step()
        wrapped.zero_grad()


@pytest.mark.parametrize("load_before_modify", [True, False])
def test_resume_mid_qat_equals_uninterrupted_run(load_before_modify: bool) -> None:
    torch.manual_seed(3)
    init = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).state_dict()

    model, opt, manager = qat_setup()
    model.load_state_dict(init)
    wrapped = manager.modify(model, opt, steps_per_epoch=4)
    run(model, wrapped, builder()(), 16)
    full, full_manager = copy.deepcopy(model.state_dict()), manager.state_dict()

    model, opt, manager = qat_setup()
    model.load_state_dict(init)
    wrapped = manager.modify(model, opt, steps_per_epoch=4)
    batches = builder()()
    run(model, wrapped, batches, 8)  # stop at epoch 2: QAT on, observers still running
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "manager": manager.state_dict()}
    )
    del model, opt, manager, wrapped

    model, opt, manager = qat_setup()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    if load_before_modify:
        manager.load_state_dict(saved["manager"])
    wrapped = manager.modify(model, opt, steps_per_epoch=4, epoch=2)
    if not load_before_modify:  # as sparse_training.py does
        manager.load_state_dict(saved["manager"])
    run(model, wrapped, batches, 8)
    for key, value in full.items():
        assert torch.equal(model.state_dict()[key], value), key
    key = next(k for k in full_manager if k.startswith("QuantizationModifier"))
    resumed = manager.state_dict()[key]
    for part in ("weight_scales", "act_stats"):
        assert full_manager[key][part].keys() == resumed[part].keys()
        for name, value in full_manager[key][part].items():
            assert torch.equal(resumed[part][name], value), (part, name)


# ----- one-shot calibration -----------------------------------------------------------------------


def test_apply_calibrates_then_freezes() -> None:
    recipe = "!QuantizationModifier\n  start_epoch: 0\n  num_calibration_steps: 2\n"
    model = convnet()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 2, 5, 5, generator=gen), None) for _ in range(5)]
    batches[3] = (batches[3][0] * 100, None)  # beyond num_calibration_steps: never seen
    ScheduledModifierManager.from_yaml(recipe).apply(model, calib_loader=batches)
    quant_state = None
    for hook in model[0]._forward_pre_hooks.values():  # still fake-quantized after finalize
        quant_state = hook.__closure__[1].cell_contents
    assert quant_state is not None and not quant_state.observing
    lo, hi = quant_state.act_stats["0"]
    seen = torch.cat([b[0] for b in batches[:2]])
    assert (float(lo), float(hi)) == (float(seen.min()), float(seen.max()))
    before = copy.deepcopy(quant_state.act_stats)
    model.train()
    model(batches[3][0])
    assert all(torch.equal(before[k], v) for k, v in quant_state.act_stats.items())

    with pytest.raises(ValueError, match="calib_loader"):
        ScheduledModifierManager.from_yaml(recipe).apply(convnet())
    endless = "!QuantizationModifier\n  start_epoch: 0\n"
    with pytest.raises(ValueError, match="num_calibration_steps"):
        ScheduledModifierManager.from_yaml(endless).apply(convnet(), calib_loader=iter(batches))


# ----- recipe fields ------------------------------------------------------------------------------

CAP_QAT_RECIPE = """
# CAP's quantization-aware fine-tuning of a pruned DeiT (reconstructed): 50 epochs, masks held
# by ConstantPruningModifier, int8 weights and activations from epoch 0.
num_epochs: 50.0
init_lr: 0.0001
final_lr: 0.0
qat_start_epoch: 0.0
observer_epoch: 45.0
bn_freeze_epoch: 45.0

training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)

  - !LearningRateFunctionModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
    lr_func: cosine
    init_lr: eval(init_lr)
    final_lr: eval(final_lr)

pruning_modifiers:
  - !ConstantPruningModifier
    start_epoch: 0.0
    params: __ALL_PRUNABLE__

quantization_modifiers:
  - !QuantizationModifier
    start_epoch: eval(qat_start_epoch)
    submodules: ['model']
    model_fuse_fn_name: no_fuse
    weight_bits: 8
    activation_bits: 8
    disable_quantization_observer_epoch: eval(observer_epoch)
    freeze_bn_stats_epoch: eval(bn_freeze_epoch)
    quantize_embeddings: True
    quantize_linear_activations: True
    reduce_range: False
    tensorrt: False
    num_calibration_steps: null
    exclude_module_types: ['LayerNorm', 'Softmax', 'GELU']
    activation_qconfig_kwargs: {}
    weight_qconfig_kwargs: {}
"""


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = convnet()
        self.extra = nn.Linear(2, 2)


def test_cap_qat_recipe_loads_unchanged_and_selects_its_submodule() -> None:
    manager = ScheduledModifierManager.from_yaml(CAP_QAT_RECIPE)
    assert manager.max_epochs == 50
    (quant,) = manager.quantization_modifiers
    assert (quant.weight_bits, quant.activation_bits, quant.submodules) == (8, 8, ["model"])
    assert quant.disable_quantization_observer_epoch == 45.0
    model = Wrapped()
    manager.modify(model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=2)
    assert list(quant_bits_by_layer(manager)) == ["model.0", "model.4"]  # not `extra`
    assert ScheduledModifierManager.from_yaml(str(manager)).modifiers[-1] == quant  # round trip


@pytest.mark.parametrize(
    "line, message",
    [
        ("scheme: {}", "unknown field 'scheme'"),
        ("weight_bits: 16", "'weight_bits' = 16 must be an integer in [2, 8]"),
        ("activation_qconfig_kwargs: {observer: minmax}", "is not supported"),
        ("custom_quantizable_module_types: [MyLayer]", "is not supported"),
        ("start_epoch: 0\n  end_epoch: 0", "'end_epoch' = 0.0 must be > start_epoch"),
        ("num_calibration_steps: 0", "must be an integer >= 1"),
        ("freeze_bn_stats_epoch: -0.5", "must be a number >= 0.0"),
        ("start_epoch: 2\n  disable_quantization_observer_epoch: 1", "must be >= start_epoch (2)"),
        ("activation_bits: 2\n  reduce_range: true", "'reduce_range' = True needs activation_bits"),
    ],
)
def test_bad_fields_are_one_clear_error(line: str, message: str) -> None:
    with pytest.raises(RecipeError, match="QuantizationModifier") as err:
        ScheduledModifierManager.from_yaml(f"!QuantizationModifier\n  {line}\n")
    assert message in str(err.value)


def test_missing_submodule_names_the_choices() -> None:
    manager = ScheduledModifierManager.from_yaml(
        "!QuantizationModifier\n  start_epoch: 0\n  submodules: [model]\n"
    )
    with pytest.raises(RecipeError, match=r"'submodules' entry 'model' .* 0, 1, 2, 3, 4"):
        manager.modify(convnet(), torch.optim.SGD(convnet().parameters(), lr=0.1), 1)
    excluded = ScheduledModifierManager.from_yaml(
        "!QuantizationModifier\n  exclude_module_types: [Linear, Conv2d]\n"
    )
    with pytest.raises(RecipeError, match="no Linear or Conv layer"):
        excluded.apply(convnet())


def test_resume_with_another_selection_is_refused() -> None:
    model = convnet()
    manager = ScheduledModifierManager.from_yaml("!QuantizationModifier\n  start_epoch: 0\n")
    manager.modify(model, torch.optim.SGD(model.parameters(), lr=0.1), 1)
    state = manager.state_dict()
    other = ScheduledModifierManager.from_yaml("!QuantizationModifier\n  start_epoch: 0\n")
    key = next(iter(state))
    state[key]["bits"]["0"] = [4, 8]
    other.modify(convnet(), torch.optim.SGD(model.parameters(), lr=0.1), 1)
    with pytest.raises(RecipeError, match="saved quantization state"):
        other.load_state_dict(state)
    assert isinstance(other.modifiers[0], QuantizationModifier)


def test_sparseml_import_paths() -> None:
    from sparseml.pytorch.sparsification import QuantizationModifier as A
    from sparseml.pytorch.sparsification.quantization import QuantizationModifier as B

    assert A is B is QuantizationModifier


# ----- two ranks ----------------------------------------------------------------------------------


def _dist_worker(rank: int, world: int, init_file, out_file: str) -> None:
    import datetime

    import torch.distributed as tdist

    tdist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a missed collective fails instead of hanging
    )  # fmt: skip
    try:
        torch.set_num_threads(1)
        model, opt, manager = qat_setup()
        wrapped = manager.modify(model, opt, steps_per_epoch=4)
        gen = torch.Generator().manual_seed(rank)  # each rank its own data
        for _ in range(12):
            x = torch.randn(8, 8, generator=gen) * (1 + rank)
            F.mse_loss(model(x), x[:, :4]).backward()
            wrapped.step()
            wrapped.zero_grad()
        calibrated = convnet()
        batches = [torch.randn(4, 2, 5, 5, generator=gen) * (1 + rank) for _ in range(2)]
        one_shot = ScheduledModifierManager.from_yaml("!QuantizationModifier\n  start_epoch: 0\n")
        one_shot.apply(calibrated, calib_loader=batches)
        states = [m.state_dict() for m in (manager, one_shot)]
        torch.save([list(s.values())[-1]["act_stats"] for s in states], f"{out_file}.{rank}")
        # both ranks done with every collective before either tears gloo down (a rank that
        # left first once made the other abort in teardown with SIGABRT, in a clean-clone CI run)
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_share_activation_ranges(tmp_path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "stats"
    mp.spawn(_dist_worker, args=(2, tmp_path / "init", str(out)), nprocs=2)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    for rank0, rank1 in zip(*ranks):  # after training (averaged every step), after calibration
        assert rank0.keys() == rank1.keys() and rank0
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), name


def test_caps_own_qat_recipe_file_runs_unchanged() -> None:
    # tests/fixtures/50ep_vit_qat.yaml is CAP's research/recipes/quantization/50ep_vit_qat.yaml
    # byte for byte: ConstantPruningModifier on every weight + QuantizationModifier, 50 epochs
    fixture = Path(__file__).parent / "fixtures" / "50ep_vit_qat.yaml"
    manager = ScheduledModifierManager.from_yaml(str(fixture))
    assert manager.max_epochs == 50
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[:, :3] = 0.0  # a pruned model: these zeros must survive
    opt = manager.modify(model, torch.optim.AdamW(model.parameters(), lr=1e-3), steps_per_epoch=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        model(torch.randn(5, 8, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    bits = quant_bits_by_layer(manager)
    assert bits == {name: {"weight_bits": 8, "activation_bits": 8} for name in ("0", "2")}
    assert bool((model[0].weight.detach()[:, :3] == 0).all())
    assert float(model[0].weight.detach()[:, 3:].abs().min()) > 0


def test_misspelt_excluded_type_is_warned_with_the_close_names(caplog) -> None:
    """``Conv2D`` / ``linear`` match nothing: the layers they meant stay quantized, so say so."""
    manager = ScheduledModifierManager.from_yaml(
        "!QuantizationModifier\n  start_epoch: 0\n  exclude_module_types: [Conv2D, linear, ReLU]\n"
    )
    model = convnet()
    with caplog.at_level("WARNING"):
        manager.modify(model, torch.optim.SGD(model.parameters(), lr=0.1), 1)
    text = caplog.text
    assert "'Conv2D' (did you mean: Conv2d" in text and "'linear' (did you mean: Linear" in text
    assert "'ReLU'" not in text  # a class the model has: no warning even if never quantized
