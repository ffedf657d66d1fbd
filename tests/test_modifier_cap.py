"""CAPruningModifier end to end against a dense float64 greedy oracle on a tiny MLP."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sparseml.errors import RecipeError
from sparseml.pruning.methods import CAPruningModifier
from sparseml.pytorch.optim import ScheduledModifierManager
from toy import builder, mlp, sampler, weights_of

RECIPE = """
pruning_modifiers:
  - !CAPruningModifier
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
"""


def recipe(s=0.5, m=20, block=12, glob="true", mask="unstructured", extra=""):
    text = RECIPE.format(s=s, m=m, block=block, glob=glob, mask=mask)
    return text + "".join(f"    {line}\n" for line in extra.splitlines() if line)


def dense_blocks(model, m, damp, block):
    """Per param: weights and the float64 damped Fisher blocks of the same gradient samples."""
    params = [model[0].weight, model[2].weight]
    batches, rows = builder()(), []
    model.eval()
    for _ in range(m):
        args, _, target = next(batches)
        model.zero_grad()
        F.mse_loss(model(*args), target).backward()
        rows.append([p.grad.reshape(-1).double() for p in params])
    out = []
    for i, p in enumerate(params):
        g = torch.stack([r[i] for r in rows])
        w = p.detach().reshape(-1).double()
        for a in range(0, w.numel(), block):  # the padded last block equals a shorter one
            sl = slice(a, min(a + block, w.numel()))
            f = damp * torch.eye(sl.stop - a, dtype=torch.float64) + g[:, sl].T @ g[:, sl] / m
            out.append((i, sl, w[sl], f))
    return out


def greedy(w, f):
    """The paper's loop on H = F^-1: order and cumulative losses (1/2 included)."""
    w, h = w.clone(), torch.linalg.inv(f)
    done = torch.zeros_like(w, dtype=torch.bool)
    order, losses, cum = [], torch.zeros_like(w), 0.0
    for _ in range(w.numel()):
        s = (w * w / h.diagonal()).masked_fill(done, float("inf"))
        p = int(s.argmin())
        cum += 0.5 * float(s[p])
        order.append(p)
        losses[p] = cum
        w -= w[p] / h[p, p] * h[:, p]
        done[p] = True
        w[done] = 0
        h -= torch.outer(h[:, p], h[p, :]) / h[p, p]
    return order, losses


def joint_obs(w, f, removed):
    v = torch.zeros_like(w)
    free = ~removed
    v[free] = w[free] + torch.linalg.solve(f[free][:, free], f[free][:, removed] @ w[removed])
    return v


def per_step(run):
    """(order, cumulative losses) -> (order, each step's own increment)."""
    order, cum = run
    inc, prev = torch.zeros_like(cum), 0.0
    for p in order:
        inc[p], prev = cum[p] - prev, float(cum[p])
    return order, inc


def cap_oracle(model, s, m, damp, block, glob, steps=False):
    blocks = dense_blocks(model, m, damp, block)
    runs = [greedy(w, f) for _, _, w, f in blocks]
    runs = [per_step(r) for r in runs] if steps else runs
    sizes = [model[0].weight.numel(), model[2].weight.numel()]
    drop = [torch.zeros(n, dtype=torch.bool) for n in sizes]
    groups = [[0, 1]] if glob else [[0], [1]]
    for params in groups:
        members = [j for j, b in enumerate(blocks) if b[0] in params]
        cat = torch.cat([runs[j][1] for j in members])
        chosen = torch.zeros_like(cat, dtype=torch.bool)
        chosen[torch.argsort(cat, stable=True)[: round(s * cat.numel())]] = True
        start = 0
        for j in members:
            i, sl, w, _ = blocks[j]
            if steps:  # as many as were chosen in the block, from the front of its order
                k = int(chosen[start : start + w.numel()].sum())
                drop[i][sl][torch.as_tensor(runs[j][0][:k], dtype=torch.long)] = True
            else:
                drop[i][sl] = chosen[start : start + w.numel()]
            start += w.numel()
    want = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    for i, sl, w, f in blocks:
        want[i][sl] = joint_obs(w, f, drop[i][sl]).masked_fill(drop[i][sl], 0.0)
    return want, drop


@pytest.mark.parametrize("m,block,glob", [(20, 12, "true"), (10, 32, "false"), (20, 16, "false")])
def test_one_shot_matches_dense_greedy_oracle(m, block, glob):
    """The reference's ranking: each prefix's cumulative loss."""
    want, drop = cap_oracle(mlp(), 0.5, m, 0.05, block, glob == "true")
    model = mlp()
    text = recipe(0.5, m, block, glob, extra="loss_ranking: cumulative")
    ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler())
    for got, w, d, dense in zip(weights_of(model), want, drop, weights_of(mlp())):
        assert torch.equal(got == 0, d)
        torch.testing.assert_close(got.double(), w, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, dense * ~d)  # the kept weights did move


@pytest.mark.parametrize("extra", ["loss_ranking: per_step", ""])  # "": per_step is the default
@pytest.mark.parametrize("glob", ["true", "false"])
def test_per_step_ranking_matches_its_oracle(glob, extra):
    want, drop = cap_oracle(mlp(), 0.6, 20, 0.05, 12, glob == "true", steps=True)
    cum_want, cum_drop = cap_oracle(mlp(), 0.6, 20, 0.05, 12, glob == "true")
    assert any(not torch.equal(a, b) for a, b in zip(drop, cum_drop))  # the rankings differ
    model = mlp()
    text = recipe(0.6, 20, 12, glob, extra=extra)
    ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler())
    for got, w, d in zip(weights_of(model), want, drop):
        assert torch.equal(got == 0, d)
        torch.testing.assert_close(got.double(), w, rtol=1e-4, atol=1e-5)


def test_nm_is_exact_and_the_joint_obs_update():
    model = mlp()
    ScheduledModifierManager.from_yaml(recipe(0.5, mask='"2:4"')).apply(
        model, grad_sampler=sampler()
    )
    got = weights_of(model)
    for w in got:
        assert torch.equal((w.view(-1, 4) == 0).sum(1), torch.full((w.numel() // 4,), 2))
    for i, sl, w, f in dense_blocks(mlp(), 20, 0.05, 12):
        removed = got[i][sl] == 0
        torch.testing.assert_close(
            got[i][sl].double(),
            joint_obs(w, f, removed).masked_fill(removed, 0),
            rtol=1e-4,
            atol=1e-5,
        )


def test_recomputations_keep_unpruned_weights():
    # The reference zeroes every layer from the second elimination on (stale weights).
    model, counter = mlp(), []
    text = recipe(0.7, extra="num_recomputations: 3")
    manager = ScheduledModifierManager.from_yaml(text)
    manager.apply(model, grad_sampler=sampler(counter))
    assert len(counter) == 3 * 20
    flat = torch.cat(weights_of(model))
    assert int((flat == 0).sum()) == round(0.7 * 96)
    keep = torch.cat([m.reshape(-1) for m in manager.modifiers[0].masks])
    assert torch.equal(keep, flat != 0)  # every kept weight is still non-zero


@pytest.mark.parametrize("targets", [(0.4, 0.6), (0.6, 0.4)])  # a sweep in either order
def test_sweep_cache_reuses_fisher_and_order(targets):
    counter, cache, results = [], {}, []
    for s in targets:  # B = 4 divides both weights: blocks are views of them, no padding copy
        model = mlp()
        manager = ScheduledModifierManager.from_yaml(recipe(s, block=4))
        manager.apply(model, grad_sampler=sampler(counter), sweep_cache=cache)
        results.append(weights_of(model))
    assert len(counter) == 20  # gradients drawn once for both targets
    assert any("curvature" in key for key in cache)  # the Fisher and the elimination order
    for s, swept in zip(targets, results):  # the cached weights are not the pruned model's
        fresh = mlp()
        ScheduledModifierManager.from_yaml(recipe(s, block=4)).apply(fresh, grad_sampler=sampler())
        for a, b in zip(swept, weights_of(fresh)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mask_type": "block4", "fisher_block_size": 12}, "mask_type"),
        ({"blocks_in_parallel": 0}, "blocks_in_parallel"),
        ({"loss_ranking": "greedy"}, "loss_ranking"),
        ({"blocks_in_paralel": 8}, "blocks_in_parallel"),
        ({"mask_type": "2:4", "fisher_block_size": 10}, "fisher_block_size"),
        ({"mask_type": "2:4", "final_sparsity": 0.7}, "final_sparsity"),
    ],
)
def test_bad_fields_raise(kwargs, match):
    kwargs = {"init_sparsity": 0.5, "final_sparsity": 0.5, **kwargs}
    with pytest.raises(RecipeError, match=match):
        CAPruningModifier(params=["re:.*weight"], **kwargs)


def test_reference_fields_and_defaults():
    mod = CAPruningModifier(params=["re:.*weight"], final_sparsity=0.5, traces_backup_dir="/x")
    assert (mod.num_grads, mod.damp, mod.fisher_block_size) == (1024, 1e-7, 50)
    assert mod.global_sparsity is True and mod.blocks_in_parallel == -1


def _dist_worker(rank, world, init_file, out_file):
    tdist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        torch.set_num_threads(1)
        result = []
        for mask in ('"2:4"',):  # unstructured: tests/test_pruner_contract.py
            model = mlp()
            ScheduledModifierManager.from_yaml(recipe(0.5, mask=mask)).apply(
                model, grad_sampler=sampler()
            )
            result.append([p.detach() for p in model.parameters()])
        torch.save(result, f"{out_file}.{rank}")
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "weights"
    mp.spawn(_dist_worker, args=(2, tmp_path / "init", str(out)), nprocs=2)
    for i, mask in enumerate(('"2:4"',)):
        model = mlp()
        ScheduledModifierManager.from_yaml(recipe(0.5, mask=mask)).apply(
            model, grad_sampler=sampler()
        )
        for rank in range(2):
            got = torch.load(f"{out}.{rank}", weights_only=True)[i]
            for a, b in zip(got, model.parameters()):
                torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
                assert torch.equal(a == 0, b == 0)
