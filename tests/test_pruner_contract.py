"""Contract of every registered pruning modifier.

For each pruner x {float32, float16, bfloat16, float64} x {one-shot apply, gradual steps}:
the target sparsity is reached exactly, the masks equal those of float32 math on the same
weights and gradients, pruned weights stay zero, masks never reopen, and the parameters keep
their dtype. For each pruner: a gradual run resumed from ``state_dict`` after its first step
ends exactly like the uninterrupted run, and a one-shot run on 2 ranks equals 1 process.
Gradients come from a fixed table (`FixedGrads`), so that every dtype sees the same samples
and any difference in the masks comes from the pruning math alone. The per-modifier test files
hold only what is specific to each method.
"""

from __future__ import annotations

import copy
import datetime
import weakref

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from sparseml.pruning import PruningModifier
from sparseml.pytorch.optim import ScheduledModifierManager
from sparseml.registry import modifier_classes
from table_grads import TableGrads

PRUNERS = sorted(  # the built-in ones (tests may register their own)
    n
    for n, c in modifier_classes().items()
    if issubclass(c, PruningModifier)
    and c.__module__.startswith("sparseml.")
    and "final_sparsity" in c.fields  # not the constant pruner, which keeps masks as they are
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Values given to every pruner that has these fields (a pruner may need more: EXTRA).
SAMPLING = {"num_grads": 16, "damp": 0.01, "fisher_block_size": 8}
EXTRA: dict[str, str] = {}
LAYER_WISE = {"FastCAPruningModifier", "MagnitudePruningModifier"}


def extra_fields(name: str) -> str:
    fields = modifier_classes()[name].fields
    given = [f"{k}: {v}" for k, v in SAMPLING.items() if k in fields]
    return "\n    ".join(given + ([EXTRA[name]] if name in EXTRA else []))


class FixedGrads(TableGrads):
    """A grad sampler whose i-th sample is row i of a fixed float32 table, resumable.

    The same table feeds the pruners that need more than gradients, so that every dtype sees
    the same curvature: K-FAC's per-layer (input, output-gradient) batches are fixed float32
    tensors drawn from a seeded generator (the i-th batch from seed i), and the Hessian of
    every batch is the fixed matrix T^T T / len(T) of the table T (products in float64)."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), "row": self.row}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.row = state["row"]

    def _layer_stats(self, module, layers, dtype):
        gen, self.row = torch.Generator().manual_seed(self.row), self.row + 1
        return [
            (
                torch.randn(4, layer.in_features, generator=gen).to(dtype),
                0.05 * torch.randn(4, layer.out_features, generator=gen).to(dtype),
            )
            for layer in layers
        ]

    def _hessian_products(self, module, params, vectors, dtype):
        T = self.table.double()
        sizes = [p.numel() for p in params]
        for v in vectors:
            hv = T.T @ (T @ torch.cat([x.double() for x in v])) / len(T)
            yield v, [h.to(dtype) for h in hv.split(sizes)]


def model32() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    with torch.no_grad():  # trained-size weights: OBS scores ~1e-9 underflow in float16
        for p in model.parameters():
            p.mul_(0.02)
    return model


def grad_table() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return 0.05 * torch.randn(64, 8 * 16 + 16 * 8, generator=gen)


def recipe(name: str, gradual: bool) -> str:
    schedule = (
        "init_sparsity: 0.2\n    final_sparsity: 0.6\n    start_epoch: 0\n    end_epoch: 1\n"
        "    update_frequency: 0.5"
        if gradual
        else "init_sparsity: 0.6\n    final_sparsity: 0.6\n    start_epoch: 0\n    end_epoch: 0"
    )
    extra = extra_fields(name)
    glob = "" if name in LAYER_WISE else "global_sparsity: true"
    return f"""
modifiers:
  - !{name}
    params: ["re:.*weight"]
    {schedule}
    {extra}
    {glob}
"""


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [model[0].weight, model[2].weight]


def run(name: str, model: nn.Module, gradual: bool, round_to: torch.dtype | None) -> list:
    """Prune ``model``; returns the zero patterns after each pruning step.

    ``round_to``: after each step, round the weights through this dtype (to replay, in
    float32, exactly what a half-precision model stores)."""
    manager = ScheduledModifierManager.from_yaml(recipe(name, gradual))
    sampler = FixedGrads(grad_table())
    if not gradual:
        manager.apply(model, grad_sampler=sampler)
        return [[w == 0 for w in weights(model)]]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    wrapped = manager.modify(model, opt, steps_per_epoch=2, grad_sampler=sampler)
    history = []
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    for _ in range(3):  # epochs 0, 0.5, 1: three pruning steps
        model(x.to(model[0].weight.dtype)).float().square().mean().backward()
        wrapped.step()
        wrapped.zero_grad()
        if round_to is not None:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(round_to).to(p.dtype))
        history.append([w == 0 for w in weights(model)])
    manager.finalize(model)
    return history


@pytest.mark.parametrize("gradual", [False, True], ids=["one_shot", "gradual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", PRUNERS)
def test_pruner_contract(name: str, dtype: torch.dtype, gradual: bool, one_thread) -> None:
    base = model32().to(dtype)  # the weights every run starts from (rounded to dtype)
    reference = copy.deepcopy(base).float()  # the same values, float32 math
    half = dtype in (torch.float16, torch.bfloat16)
    expected = run(name, reference, gradual, dtype if half else None)
    got = run(name, base, gradual, None)

    for p in base.parameters():
        assert p.dtype == dtype
    total = sum(w.numel() for w in weights(base))
    zeros = [int((w == 0).sum()) for w in weights(base)]
    if name in LAYER_WISE:
        assert zeros == [round(0.6 * w.numel()) for w in weights(base)]
    else:
        assert sum(zeros) == round(0.6 * total)
    for step, (mine, ref) in enumerate(zip(got, expected)):
        for a, b in zip(mine, ref):
            assert torch.equal(a, b), (
                f"{name} {dtype}: masks differ from float32 math at step {step}"
            )
    for before, after in zip(got, got[1:]):  # masks never reopen
        assert all(bool(a[b].all()) for a, b in zip(after, before))
    if half:  # the kept weights are float32 math rounded once to the model's dtype
        for a, b in zip(weights(base), weights(reference)):
            assert torch.equal(a, b.to(dtype))


def gradual_steps(model, manager, steps, sampler):
    """The first ``steps`` training steps (2 per epoch) of a gradual run."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = manager.modify(model, opt, steps_per_epoch=2, grad_sampler=sampler)
    for i in range(steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 + i))
        model(x).square().mean().backward()
        wrapped.step()
        wrapped.zero_grad()
    return opt


class ChunkWatch(FixedGrads):
    """Fails when a gradient is drawn while an earlier chunk of samples is still alive: the
    pruners must hold one chunk at a time (at DeiT size one is 1.4 GB). Chunks kept on purpose
    (the m-space form with m < B) are not exercised: here m = 16 >= B = 8. A consumer that
    asks for reused buffers (``reuse=True``) gets every chunk in the first one's storage: then
    nothing else may be alive."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__(table)
        self.yielded: list[weakref.ref] = []
        self.buffers: set[int] = set()  # the reused storages, if any

    def iter_chunks(self, *args, **kwargs):
        reuse, self.buffers = kwargs.get("reuse", False), set()
        for chunk in super().iter_chunks(*args, **kwargs):
            if reuse and not self.buffers:
                self.buffers = {t.untyped_storage().data_ptr() for t in chunk}
            self.yielded += [weakref.ref(t) for t in chunk]
            yield chunk
            chunk = None

    def _one_gradient(self, module, params, dtype):
        alive = [t for t in (ref() for ref in self.yielded) if t is not None]
        extra = [t for t in alive if t.untyped_storage().data_ptr() not in self.buffers]
        assert not extra, f"{len(extra)} tensors of an earlier gradient chunk are still alive"
        return super()._one_gradient(module, params, dtype)


@pytest.mark.parametrize("name", PRUNERS)
def test_one_gradient_chunk_alive_at_a_time(name: str, monkeypatch, one_thread) -> None:
    monkeypatch.setattr(PruningModifier, "GRAD_CHUNK", 4)  # 16 samples: 4 chunks
    sampler = ChunkWatch(grad_table())
    ScheduledModifierManager.from_yaml(recipe(name, False)).apply(model32(), grad_sampler=sampler)


@pytest.mark.parametrize("name", PRUNERS)
def test_state_dict_resume_equals_the_uninterrupted_run(name: str, one_thread) -> None:
    text = recipe(name, gradual=True)
    whole = model32()
    manager = ScheduledModifierManager.from_yaml(text)
    gradual_steps(whole, manager, 3, FixedGrads(grad_table()))

    first = model32()
    manager = ScheduledModifierManager.from_yaml(text)
    opt = gradual_steps(first, manager, 1, FixedGrads(grad_table()))
    state = copy.deepcopy(manager.state_dict())
    model_state, opt_state = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())

    resumed = model32()
    resumed.load_state_dict(model_state)
    manager = ScheduledModifierManager.from_yaml(text)
    manager.load_state_dict(state)
    # the steps of the second half: epoch 0.5 on (the resumed sampler must continue its stream)
    opt = torch.optim.SGD(resumed.parameters(), lr=0.1)
    opt.load_state_dict(opt_state)
    wrapped = manager.modify(
        resumed, opt, steps_per_epoch=2, grad_sampler=FixedGrads(grad_table()), epoch=0.5
    )
    for i in range(1, 3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 + i))
        resumed(x).square().mean().backward()
        wrapped.step()
        wrapped.zero_grad()
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name}: the resumed run differs from the uninterrupted one"


def _two_rank_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    tdist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),  # a missed collective fails, never hangs
    )  # fmt: skip
    try:
        torch.set_num_threads(1)
        result = {}
        for name in PRUNERS:
            model = model32()
            manager = ScheduledModifierManager.from_yaml(recipe(name, gradual=False))
            manager.apply(model, grad_sampler=FixedGrads(grad_table()))
            result[name] = [p.detach().clone() for p in model.parameters()]
        torch.save(result, f"{out_file}.{rank}")
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_equal_one_process(tmp_path, one_thread) -> None:
    # every rank draws the same fixed samples, so the averaged gradients equal one process's;
    # the curvature is split over the ranks and gathered back
    out = str(tmp_path / "weights")
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "init"), out), nprocs=2)
    saved = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    for name in PRUNERS:
        model = model32()
        manager = ScheduledModifierManager.from_yaml(recipe(name, gradual=False))
        manager.apply(model, grad_sampler=FixedGrads(grad_table()))
        for rank in range(2):
            for a, b in zip(saved[rank][name], model.parameters()):
                assert torch.equal(a == 0, b == 0), f"{name}: rank {rank} masks differ"
                torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6, msg=name)
