"""MFACPruningModifier: one-shot against a dense float64 OBS oracle, schedules, buffering."""

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from sparseml.errors import GradSamplerError, RecipeError
from sparseml.pruning.methods import MFACPruningModifier
from sparseml.pytorch.optim import ScheduledModifierManager

RECIPE = """
pruning_modifiers:
  - !MFACPruningModifier
    params: ["re:.*weight"]
    init_sparsity: {s}
    final_sparsity: {s}
    start_epoch: 0
    end_epoch: 1
    update_frequency: 1
    num_grads: 12
    damp: 0.05
    fisher_block_size: {block}
    global_sparsity: {glob}
    blocks_cross_layers: {cross}
"""


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def builder(counter=None):
    def build(**kwargs):
        gen = torch.Generator().manual_seed(0)
        while True:
            if counter is not None:
                counter.append(1)
            x = torch.randn(16, 6, generator=gen)
            yield [x], {}, x[:, :3] * x[:, 3:] + 0.1 * torch.randn(16, 3, generator=gen)

    return build


def sampler(counter=None):
    return {"data_loader_builder": builder(counter), "loss_fn": F.mse_loss}


def dense_oracle(model, sparsity, num_grads, damp, block, glob, cross):
    """The OBS step with dense float64 block inverses, from the same gradient samples."""
    weights = [model[0].weight, model[2].weight]
    batches = builder()()
    rows = []
    model.eval()
    for _ in range(num_grads):
        args, _, target = next(batches)
        model.zero_grad()
        F.mse_loss(model(*args), target).backward()
        rows.append(torch.cat([w.grad.reshape(-1) for w in weights]).double())
    grads = torch.stack(rows)
    sizes = [w.numel() for w in weights]
    starts = [0, sizes[0]]
    if block is None:
        cuts = [(0, sum(sizes))]
    elif cross:
        cuts = [(a, min(a + block, sum(sizes))) for a in range(0, sum(sizes), block)]
    else:
        cuts = [
            (s + a, s + min(a + block, n))
            for s, n in zip(starts, sizes)
            for a in range(0, n, block)
        ]
    hinv = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
    for a, b in cuts:
        g = grads[:, a:b]
        hinv[a:b, a:b] = torch.linalg.inv(
            damp * torch.eye(b - a, dtype=torch.float64) + g.T @ g / num_grads
        )
    w = torch.cat([p.detach().reshape(-1) for p in weights]).double()
    scores = w**2 / (2 * hinv.diagonal())
    drop = torch.zeros(sum(sizes), dtype=torch.bool)
    if glob:
        drop[torch.argsort(scores)[: round(sparsity * sum(sizes))]] = True
    else:
        for s, n in zip(starts, sizes):
            drop[s + torch.argsort(scores[s : s + n])[: round(sparsity * n)]] = True
    new = w + hinv @ torch.where(drop, -w / hinv.diagonal(), 0.0)
    new[drop] = 0.0
    return new.float(), ~drop


@pytest.mark.parametrize(
    "block,glob,cross",
    [
        (16, "false", "false"),  # B > m, per-layer blocks with a partial last block
        (5, "false", "false"),  # B < m: explicit block inverses
        (10, "true", "true"),  # reference blocking across the two layers, global threshold
        ("null", "true", "false"),  # the full Fisher
    ],
)
def test_one_shot_matches_dense_oracle(block, glob, cross):
    model, twin = mlp(), mlp()
    want, keep = dense_oracle(
        twin, 0.5, 12, 0.05, None if block == "null" else block, glob == "true", cross == "true"
    )
    manager = ScheduledModifierManager.from_yaml(
        RECIPE.format(s=0.5, block=block, glob=glob, cross=cross)
    )
    manager.apply(model, grad_sampler=sampler())
    got = torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])
    assert torch.equal(got != 0, keep)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(
        got, torch.cat([p.reshape(-1) for p in (twin[0].weight, twin[2].weight)]) * keep
    )


def test_num_grads_mapping_uses_largest_key_at_or_below_current_sparsity():
    recipe = """
    !MFACPruningModifier
      params: ["re:.*weight"]
      init_sparsity: 0.5
      final_sparsity: 0.7
      start_epoch: 0
      end_epoch: 1
      update_frequency: 1
      num_grads: {0.0: 5, 0.5: 9, 0.9: 20}
      fisher_block_size: 8
    """
    model = mlp()
    counter = []
    manager = ScheduledModifierManager.from_yaml(recipe)
    opt = manager.modify(
        model, torch.optim.SGD(model.parameters(), lr=0.0), steps_per_epoch=2,
        grad_sampler=sampler(counter),
    )  # fmt: skip
    drawn = []
    for _ in range(3):  # prunes at step 0 (epoch 0) and step 2 (epoch 1 = end)
        before = len(counter)
        model(torch.randn(2, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        drawn.append(len(counter) - before)
    assert drawn == [5, 0, 9]
    for layer in (model[0], model[2]):
        assert (layer.weight == 0).float().mean().item() == pytest.approx(0.7, abs=0.02)


def test_gradient_buffering_prunes_from_training_gradients():
    recipe = """
    !MFACPruningModifier
      params: ["re:.*weight"]
      init_sparsity: 0.3
      final_sparsity: 0.6
      start_epoch: 1
      end_epoch: 3
      update_frequency: 1
      num_grads: 4
      fisher_block_size: 8
      use_gradient_buffering: true
    """
    model = mlp()
    manager = ScheduledModifierManager.from_yaml(recipe)
    opt = manager.modify(model, torch.optim.SGD(model.parameters(), lr=0.05), steps_per_epoch=3)
    mod = manager.modifiers[0]
    batches = builder()()
    history = []
    for _ in range(3 * 4):
        args, _, target = next(batches)
        F.mse_loss(model(*args), target).backward()
        opt.step()
        opt.zero_grad()
        history.append(None if mod.buffer is None else mod.buffer.count)
    assert history[:3] == [1, 2, 3]  # buffering before the start
    assert history[3] == 1  # reset after the pruning step (new masks), then one push
    for layer in (model[0], model[2]):
        assert (layer.weight == 0).float().mean().item() == pytest.approx(0.6, abs=0.02)
    assert mod.buffer is None  # freed once the modifier ended


def test_buffering_without_training_gradients_raises():
    recipe = RECIPE.format(s=0.5, block=8, glob="false", cross="false")
    recipe += "    use_gradient_buffering: true\n"
    with pytest.raises(GradSamplerError, match="no training gradients"):
        ScheduledModifierManager.from_yaml(recipe).apply(mlp())


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("num_grads", {0.5: 64}, "key 0.0"),
        ("num_grads", 0, "integer >= 1"),
        ("damp", 0.0, "damp"),
        ("fisher_block_size", 2.5, "integer"),
        ("num_pages", 0, "num_pages"),
    ],
)
def test_bad_fields_raise(field, value, match):
    kwargs = {"params": ["re:.*weight"], "final_sparsity": 0.5, field: value}
    with pytest.raises(RecipeError, match=match):
        MFACPruningModifier(**kwargs)


def test_reference_spellings_are_accepted():
    mod = MFACPruningModifier(
        params=["re:.*weight"], final_sparsity=0.5, fisher_block_size=-1,
        available_gpus=["cuda:0"], block_implementation="block", num_grads={0: 8, 0.5: 16},
    )  # fmt: skip
    assert mod.fisher_block_size is None and mod.available_devices == ["cuda:0"]
    assert mod.num_grads == {0.0: 8, 0.5: 16} and mod.global_sparsity is False


def test_missing_devices_warn_and_fall_back(caplog):
    recipe = RECIPE.format(s=0.5, block=16, glob="false", cross="false") + (
        "    available_gpus: ['cuda:7']\n"
    )
    model = mlp()
    with caplog.at_level("WARNING"):
        ScheduledModifierManager.from_yaml(recipe).apply(model, grad_sampler=sampler())
    assert "cuda:7" in caplog.text and "do not exist" in caplog.text
    assert float((model[0].weight == 0).float().mean()) == 0.5


BLOCKS = (16, "null")  # blocks split over the ranks; the full F computed on all, broadcast


def _dist_worker(rank, world, init_file, out_file):
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        result = []
        for block in BLOCKS:
            model = mlp()
            recipe = RECIPE.format(s=0.5, block=block, glob="false", cross="false")
            ScheduledModifierManager.from_yaml(recipe).apply(model, grad_sampler=sampler())
            result.append([p.detach() for p in model.parameters()])
        torch.save(result, f"{out_file}.{rank}")
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "weights"
    mp.spawn(_dist_worker, args=(2, tmp_path / "init", str(out)), nprocs=2)
    for i, block in enumerate(BLOCKS):
        model = mlp()
        recipe = RECIPE.format(s=0.5, block=block, glob="false", cross="false")
        ScheduledModifierManager.from_yaml(recipe).apply(model, grad_sampler=sampler())
        for rank in range(2):
            got = torch.load(f"{out}.{rank}", weights_only=True)[i]
            for a, b in zip(got, model.parameters()):
                torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
                assert torch.equal(a == 0, b == 0)
