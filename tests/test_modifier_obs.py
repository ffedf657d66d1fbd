"""OBSPruningModifier end to end against a dense float64 OBS oracle on a tiny MLP."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

import sparseml.pruning.methods.obs as obs_module
from sparseml.errors import NumericalError, RecipeError
from sparseml.layouts import BlockLayout
from sparseml.pruning.methods import OBSPruningModifier
from sparseml.pytorch.optim import ScheduledModifierManager
from toy import builder, mlp, sampler, weights_of

EPS32 = torch.finfo(torch.float32).eps
RECIPE = """
pruning_modifiers:
  - !OBSPruningModifier
    params: ["re:.*weight"]
    init_sparsity: {s}
    final_sparsity: {s}
    start_epoch: 0
    end_epoch: 1
    update_frequency: 1
    num_grads: {m}
    damp: 0.05
    fisher_block_size: {block}
    global_sparsity: {glob}
    mask_type: {mask}
    obs_update: {update}
"""


def recipe(s=0.5, m=20, block=12, glob="true", mask="unstructured", update="joint", extra=""):
    text = RECIPE.format(s=s, m=m, block=block, glob=glob, mask=mask, update=update)
    return text + "".join(f"    {line}\n" for line in extra.splitlines() if line)


def dense_oracle(model, s, m, damp, block, glob, group=1, independent=False):
    """Spec 3.2 with dense float64 block inverses of the same gradient samples."""
    params = [model[0].weight, model[2].weight]
    batches, rows = builder()(), []
    model.eval()
    for _ in range(m):
        args, _, target = next(batches)
        model.zero_grad()
        F.mse_loss(model(*args), target).backward()
        rows.append([p.grad.reshape(-1).double() for p in params])
    out_w, out_keep, all_scores, hs = [], [], [], []
    for i, p in enumerate(params):
        g = torch.stack([r[i] for r in rows])
        n = g.shape[1]
        f = damp * torch.eye(n, dtype=torch.float64)
        for a in range(0, n, block):
            sl = slice(a, min(a + block, n))
            f[sl, sl] += g[:, sl].T @ g[:, sl] / m
        h = torch.linalg.inv(f)
        w = p.detach().reshape(-1).double()
        if group == 1:
            scores = w**2 / (2 * h.diagonal() + (EPS32 if independent else 0.0))
        else:
            scores = torch.empty(n // group, dtype=torch.float64)
            for q in range(n // group):
                sl = slice(q * group, (q + 1) * group)
                scores[q] = 0.5 * w[sl] @ torch.linalg.solve(h[sl, sl], w[sl])
        all_scores.append(scores)
        hs.append((w, f, h))
    if glob:
        cat = torch.cat(all_scores)
        drop = torch.zeros_like(cat, dtype=torch.bool)
        drop[torch.argsort(cat, stable=True)[: round(s * cat.numel())]] = True
        drops = torch.split(drop, [x.numel() for x in all_scores])
    else:
        drops = []
        for sc in all_scores:
            d = torch.zeros_like(sc, dtype=torch.bool)
            d[torch.argsort(sc, stable=True)[: round(s * sc.numel())]] = True
            drops.append(d)
    for (w, f, h), d in zip(hs, drops):
        q = d.repeat_interleave(group)
        if independent and group == 1:
            v = w - h @ torch.where(q, w / (h.diagonal() + EPS32), 0.0)
        elif independent:
            y = torch.zeros_like(w)
            for a in range(0, w.numel(), group):
                if q[a]:
                    sl = slice(a, a + group)
                    y[sl] = torch.linalg.solve(h[sl, sl], w[sl])
            v = w - h @ y
        else:  # joint: argmin (v - w)^T F (v - w) subject to v_q = 0
            free = ~q
            v = torch.zeros_like(w)
            v[free] = w[free] + torch.linalg.solve(f[free][:, free], f[free][:, q] @ w[q])
        v[q] = 0.0
        out_w.append(v.float())
        out_keep.append(~q)
    return out_w, out_keep


@pytest.mark.parametrize(
    "m,block,glob,mask,update",
    [
        (20, 12, "true", "unstructured", "joint"),  # m > B, padded last blocks, global
        (10, 32, "false", "unstructured", "joint"),  # m < B: m-space inverse, per layer
        (20, 12, "true", "block4", "joint"),  # groups of 4, joint update over whole groups
        (20, 16, "true", "unstructured", "independent"),  # the reference (oBERT) update
        (20, 12, "false", "block4", "independent"),  # the reference block4 update
    ],
)
def test_one_shot_matches_dense_oracle(m, block, glob, mask, update):
    model, twin = mlp(), mlp()
    group = 4 if mask == "block4" else 1
    want, keep = dense_oracle(
        twin, 0.5, m, 0.05, block, glob == "true", group, update == "independent"
    )
    manager = ScheduledModifierManager.from_yaml(recipe(0.5, m, block, glob, mask, update))
    manager.apply(model, grad_sampler=sampler())
    for got, w, k, dense in zip(weights_of(model), want, keep, weights_of(mlp())):
        assert torch.equal(got != 0, k)
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, dense * k)  # the kept weights did move


def test_nm_pattern_and_recomputations_keep_masks_monotone():
    model, counter = mlp(), []
    text = recipe(0.5, mask='"2:4"')
    ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler(counter))
    for w in weights_of(model):
        assert torch.equal((w.view(-1, 4) == 0).sum(1), torch.full((w.numel() // 4,), 2))
    model, counter = mlp(), []
    text = recipe(0.7, extra="num_recomputations: 3")
    ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler(counter))
    assert len(counter) == 3 * 20
    zeros = sum(int((w == 0).sum()) for w in weights_of(model))
    assert zeros == round(0.7 * 96)


def test_sweep_cache_reuses_the_fisher():
    counter, cache = [], {}
    results = []
    for s in (0.4, 0.6):
        model = mlp()
        manager = ScheduledModifierManager.from_yaml(recipe(s))
        manager.apply(model, grad_sampler=sampler(counter), sweep_cache=cache)
        results.append(weights_of(model))
    assert len(counter) == 20  # gradients drawn once for both targets
    fresh = mlp()
    ScheduledModifierManager.from_yaml(recipe(0.6)).apply(fresh, grad_sampler=sampler())
    for a, b in zip(results[1], weights_of(fresh)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"obs_update": "sum"}, "obs_update"),
        ({"damp": 0.0}, "damp"),
        ({"mask_type": "block4", "fisher_block_size": 10}, "fisher_block_size"),
        ({"fisher_blocksize": 8}, "fisher_block_size"),
    ],
)
def test_bad_fields_raise(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        OBSPruningModifier(params=["re:.*weight"], final_sparsity=0.5, **kwargs)


def test_reference_fields_and_defaults():
    mod = OBSPruningModifier(params=["re:.*weight"], final_sparsity=0.5, traces_backup_dir=None)
    assert (mod.num_grads, mod.damp, mod.fisher_block_size) == (1024, 1e-7, 50)
    assert mod.global_sparsity is True and mod.obs_update == "joint"


CASES = (("true", "unstructured"), ("false", "block4"))


def _failing_scores(*args, **kwargs):
    raise NumericalError("injected failure")


def _dist_worker(rank, world, init_file, out_file):
    tdist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),  # a missed collective fails instead of hanging
    )  # fmt: skip
    try:
        torch.set_num_threads(1)
        result = []
        for glob, mask in CASES:
            model = mlp()
            manager = ScheduledModifierManager.from_yaml(recipe(0.5, 20, 12, glob, mask))
            manager.apply(model, grad_sampler=sampler())
            result.append([p.detach() for p in model.parameters()])
        # blocks owned here: (param index, first block, end block)
        mod = manager.modifiers[0]
        layout = BlockLayout([r.param.numel() for r in mod.refs], mod.fisher_block_size)
        result.append(torch.tensor([[p.index, p.b0, p.b1] for p in layout.parts]))
        # a kernel failing on rank 1 only must raise on both ranks (no hang in the gather)
        if rank == 1:
            obs_module.obs_scores = _failing_scores
        model = mlp()
        try:
            ScheduledModifierManager.from_yaml(recipe()).apply(model, grad_sampler=sampler())
            result.append(torch.tensor(0))
        except NumericalError as err:
            result.append(torch.tensor(1 if "another rank" in str(err) else 2))
        assert torch.equal(model[0].weight, mlp()[0].weight)  # nothing was written
        torch.save(result, f"{out_file}.{rank}")
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_match_one_process(tmp_path):
    # 9 blocks of 12 split 5 / 4: rank 1 owns the padded last block of layer 0 and layer 2
    out = tmp_path / "weights"
    mp.spawn(_dist_worker, args=(2, tmp_path / "init", str(out)), nprocs=2)
    saved = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    assert [r[-2].tolist() for r in saved] == [[[0, 0, 5]], [[0, 5, 6], [1, 0, 3]]]
    assert [int(r[-1]) for r in saved] == [1, 2]  # rank 0: "another rank"; rank 1: its own
    for i, (glob, mask) in enumerate(CASES):
        model = mlp()
        text = recipe(0.5, 20, 12, glob, mask)
        ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler())
        for rank in range(2):
            got = torch.load(f"{out}.{rank}", weights_only=True)[i]
            for a, b in zip(got, model.parameters()):
                torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
                assert torch.equal(a == 0, b == 0)


def test_a_pruning_step_reports_where_its_time_went():
    model = mlp()
    manager = ScheduledModifierManager.from_yaml(recipe())
    manager.apply(model, grad_sampler=sampler())
    timings = manager.modifiers[0].timings
    assert set(timings) == {"gradients", "curvature", "pruning"}
    assert all(v > 0 for v in timings.values())
