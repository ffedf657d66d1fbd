"""Dynamic Fisher blocks (blocks of B consecutive unpruned weights): they equal
static blocks restricted to the active weights, and their memory scales with the density."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseml.layouts import CompactLayout
from sparseml.pruning.methods import OBSPruningModifier, WoodTaylorPruningModifier
from table_grads import TableGrads, one_shot

B, M = 8, 16


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 4, bias=False))


def grads() -> torch.Tensor:
    return 0.2 * torch.randn(2 * M, 96, generator=torch.Generator().manual_seed(3))


def test_compact_layout_take_and_gather() -> None:
    masks = [torch.rand(5, 7, generator=torch.Generator().manual_seed(i)) > 0.4 for i in (0, 1)]
    layout = CompactLayout(masks, 4)
    full = [torch.arange(35.0).view(1, -1) + 100 * i for i in (0, 1)]
    pieces = layout.take(full)
    for i, m in enumerate(masks):
        mine = torch.cat([x for p, x in zip(layout.parts, pieces) if p.index == i], dim=-1)
        assert torch.equal(mine[0], full[i][0][m.reshape(-1)])
    back = layout.gather([x[0] for x in pieces], torch.device("cpu"))
    for i, m in enumerate(masks):
        assert torch.equal(back[i], full[i][0] * m.reshape(-1))
    counts = [int(m.sum()) for m in masks]
    assert [p.c1 - p.c0 for p in layout.parts] == [counts[0], counts[1]]
    assert layout.compact.total == sum(-(-n // 4) for n in counts)


@pytest.mark.parametrize("tag", ["OBSPruningModifier", "WoodTaylorPruningModifier"])
def test_dynamic_blocks_equal_static_blocks_on_the_active_weights(tag, monkeypatch, one_thread):
    # two recomputations: 25% (every weight active: both layouts agree), then 50%, where the
    # dynamic blocks are blocks of 8 consecutive *surviving* weights
    cls = OBSPruningModifier if tag == "OBSPruningModifier" else WoodTaylorPruningModifier
    seen = []
    step = cls.prune_once

    def record(self, module, targets, timings):
        seen.append([m.detach().clone() for m in (module[0].weight, module[2].weight)])
        step(self, module, targets, timings)

    monkeypatch.setattr(cls, "prune_once", record)
    fields = {
        "params": '["re:.*weight"]',
        "init_sparsity": 0.5,
        "final_sparsity": 0.5,
        "num_grads": M,
        "damp": 0.01,
        "fisher_block_size": B,
        "global_sparsity": "true",
        "num_recomputations": 2,
    }
    dynamic = model()
    one_shot(dynamic, tag, {**fields, "dynamic_blocks": "true"}, TableGrads(grads()))
    before = seen[1]  # the weights entering the second step (24 of 96 pruned)
    kept = [w != 0 for w in before]
    assert sum(int((~k).sum()) for k in kept) == 24

    # the compacted problem: one parameter per layer holding its active weights, samples
    # 16..31 restricted to them, static blocks of 8, 24 more of the 72 removed
    compact = nn.Sequential(
        *[nn.Linear(int(k.sum()), 1, bias=False) for k in kept]
    )  # fmt: skip
    with torch.no_grad():
        for layer, w, k in zip(compact, before, kept):
            layer.weight.copy_(w[k].view(1, -1))
    columns = torch.cat([k.reshape(-1) for k in kept])
    monkeypatch.setattr(cls, "prune_once", step)
    s = 24 / 72
    one_shot(
        compact,
        tag,
        {**fields, "init_sparsity": s, "final_sparsity": s, "num_recomputations": 1},
        TableGrads(grads()[M:, columns]),
    )
    for w, k, layer in zip((dynamic[0].weight, dynamic[2].weight), kept, compact):
        assert (w[~k] == 0).all()
        torch.testing.assert_close(w[k], layer.weight.reshape(-1), rtol=1e-5, atol=1e-7)

    static = model()
    one_shot(static, tag, fields, TableGrads(grads()))
    assert not torch.equal(static[0].weight, dynamic[0].weight)  # the layouts do differ


def test_dynamic_blocks_memory_scales_with_density(one_thread) -> None:
    fields = {
        "params": '["re:.*weight"]',
        "init_sparsity": 0.75,
        "final_sparsity": 0.75,
        "num_grads": 2 * B,  # m >= B: float64 B x B blocks
        "damp": 0.01,
        "fisher_block_size": B,
        "dynamic_blocks": "true",
    }
    mod = one_shot(model(), "OBSPruningModifier", fields, TableGrads(grads()))

    def fisher_bytes() -> int:
        items, _ = mod.estimator().memory(mod, B, 2 * B)
        return next(i.nbytes for i in items if i.what.startswith("Fisher"))

    # 96 weights at 75% sparsity: the 24 active ones fill ceil(n_l / 8) blocks per layer (3
    # or 4, one partly padded block per layer at most) instead of 8 + 4
    active = [int(m.sum()) for m in mod.masks]
    assert sum(active) == 24
    tri = B * (B + 1) // 2 * 8  # a block as float64 lower triangle
    assert fisher_bytes() == sum(-(-n // B) for n in active) * tri <= 4 * tri
    mod.dynamic_blocks = False
    assert fisher_bytes() == 12 * tri


DIST_CASES = {
    "obs-dynamic": ("OBSPruningModifier", {"dynamic_blocks": "true", "num_recomputations": 2}),
    "woodtaylor-dynamic-normalized": (
        "WoodTaylorPruningModifier",
        {"dynamic_blocks": "true", "num_recomputations": 2, "normalize_hgp": "true"},
    ),
    "woodtaylor-full": ("WoodTaylorPruningModifier", {"fisher_block_size": "null"}),
    "woodfisher-flops": ("WoodFisherPruningModifier", {"flops_power": 0.5}),
}


def _dist_run(case: str) -> list[torch.Tensor]:
    tag, extra = DIST_CASES[case]
    fields = {
        "params": '["re:.*weight"]',
        "init_sparsity": 0.5,
        "final_sparsity": 0.5,
        "num_grads": M,
        "damp": 0.01,
        "fisher_block_size": B,
        "global_sparsity": "true",
    }
    if tag == "WoodFisherPruningModifier":
        del fields["fisher_block_size"]
    net = model()
    batch = ([torch.randn(2, 8)], {}, None)
    one_shot(net, tag, {**fields, **extra}, TableGrads(grads(), batch))
    return [p.detach().clone() for p in net.parameters()]


def _worker(rank: int, init_file: str, out: str) -> None:
    import datetime

    import torch.distributed as tdist

    tdist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        torch.set_num_threads(1)
        torch.save({c: _dist_run(c) for c in DIST_CASES}, f"{out}.{rank}")
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_equal_one_process(tmp_path, one_thread) -> None:
    # blocks (compacted ones too) are split over the ranks; the global norm of H g_bar and
    # the full inverse's results are shared, so both ranks end where one process does
    import torch.multiprocessing as mp

    out = str(tmp_path / "weights")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=2)
    for rank in range(2):
        saved = torch.load(f"{out}.{rank}", weights_only=True)
        for case in DIST_CASES:
            for a, b in zip(saved[case], _dist_run(case)):
                assert torch.equal(a == 0, b == 0), f"{case}: rank {rank} masks differ"
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=case)
