"""Grad sampler: how-to error, builder kwargs, restart of finite loaders, NaN, progress, modes."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseml.errors import GradSamplerError, NumericalError
from sparseml.grad_sampler import GradSampler
from sparseml.pytorch.optim import ScheduledModifierManager

OBS = """
pruning_modifiers:
  - !OBSPruningModifier
    params: ["re:.*weight"]
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 1
    num_grads: 6
    fisher_block_size: 8
    damp: 1.0e-3
    grad_sampler_kwargs:
      batch_size: 5
"""


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))


def finite_builder(seen, batches=2, poison=False):
    def build(batch_size=3, **kwargs):
        seen.append(batch_size)
        gen = torch.Generator().manual_seed(0)
        out = []
        for _ in range(batches):
            x = torch.randn(batch_size, 4, generator=gen)
            if poison:
                x[0, 0] = float("nan")
            out.append(([x], {}, torch.randint(0, 2, (batch_size,), generator=gen)))
        return out

    return build


def test_missing_grad_sampler_says_how_to_pass_one():
    manager = ScheduledModifierManager.from_yaml(OBS)
    with pytest.raises(GradSamplerError, match="data_loader_builder.*--gs-loader"):
        manager.apply(model())


def test_builder_gets_recipe_kwargs_and_finite_loader_restarts(caplog):
    seen = []
    net = model()
    net.train()
    sampler = GradSampler(finite_builder(seen), F.cross_entropy, {"batch_size": 5})
    params = [p for p in net.parameters()]
    with caplog.at_level(logging.INFO, logger="sparseml.grad_sampler"):
        chunks = list(sampler.iter_chunks(net, params, num_grads=5, chunk_size=2))
    assert seen == [5]  # built once, with the recipe's kwargs
    assert [c[0].shape[0] for c in chunks] == [2, 2, 1]
    # two batches, cycled: samples 0, 2, 4 are the same batch (eval mode: no dropout noise)
    assert torch.equal(chunks[0][0][0], chunks[1][0][0]) and torch.equal(
        chunks[0][0][0], chunks[2][0][0]
    )
    assert net.training and all(p.grad is None for p in params)  # mode restored, grads zeroed
    assert "5/5 samples" in caplog.text and "ETA" in caplog.text


def test_empty_loader_and_bad_batches_raise():
    net = model()
    params = list(net.parameters())
    empty = GradSampler(lambda **kw: [], F.cross_entropy)
    with pytest.raises(GradSamplerError, match="yields no batches"):
        list(empty.iter_chunks(net, params, 2))
    pairs = GradSampler(lambda **kw: [(torch.randn(2, 4), torch.zeros(2))], F.cross_entropy)
    with pytest.raises(GradSamplerError, match="triples"):
        list(pairs.iter_chunks(net, params, 1))
    with pytest.raises(GradSamplerError, match="callables"):
        GradSampler("not callable", F.cross_entropy)


def test_nan_gradients_raise_and_leave_the_model_untouched():
    net = model()
    before = [p.detach().clone() for p in net.parameters()]
    manager = ScheduledModifierManager.from_yaml(OBS)
    sampler = {"data_loader_builder": finite_builder([], poison=True), "loss_fn": F.cross_entropy}
    with pytest.raises(NumericalError, match="nothing"):
        manager.apply(net, grad_sampler=sampler)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_masked_samples_are_zero_on_pruned_entries():
    net = model()
    params = [net[0].weight]
    mask = torch.rand_like(net[0].weight) > 0.5
    sampler = GradSampler(finite_builder([]), F.cross_entropy)
    (chunk,) = list(sampler.iter_chunks(net, params, 3, masks=[mask]))
    assert chunk[0][:, ~mask.reshape(-1)].abs().max() == 0
    assert chunk[0][:, mask.reshape(-1)].abs().max() > 0


def test_generator_builder_is_built_anew_for_each_pass():
    """A builder returning a generator (one pass only) works past its first pass, and draws the
    same samples as the same batches given as a list."""
    seen = []
    as_list = finite_builder(seen)

    def as_generator(**kwargs):
        return (batch for batch in as_list(**kwargs))

    grads = []
    for build in (as_list, as_generator):
        torch.manual_seed(1)
        net = model()
        sampler = GradSampler(build, F.cross_entropy, {"batch_size": 5})
        params = [p for p in net.parameters() if p.dim() == 2]
        chunks = list(sampler.iter_chunks(net, params, 5, chunk_size=5))
        grads.append(torch.cat([torch.cat(c, dim=1) for c in chunks], dim=0))
        assert sampler.passes == 3  # 5 samples from 2 batches per pass
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_non_finite_gradient_anywhere_in_a_chunk_is_an_error(bad, dtype):
    from sparseml.grad_sampler import _check_finite

    chunk = [torch.randn(3, 7).to(dtype), torch.randn(4, 5).to(dtype), torch.empty(0, 2)]
    _check_finite(chunk, "sampled gradients")  # finite: passes
    chunk[1][2, 3] = bad
    with pytest.raises(NumericalError, match="NaN/Inf in sampled gradients"):
        _check_finite(chunk, "sampled gradients")


def test_an_all_kept_mask_leaves_the_samples_as_drawn():
    net = model()
    params = [net[0].weight]
    sampler = GradSampler(finite_builder([]), F.cross_entropy)
    (plain,) = list(sampler.iter_chunks(net, params, 3))
    sampler = GradSampler(finite_builder([]), F.cross_entropy)
    (kept,) = list(
        sampler.iter_chunks(
            net, params, 3, masks=[torch.ones_like(net[0].weight, dtype=torch.bool)]
        )
    )
    assert torch.equal(plain[0], kept[0])


def test_reused_chunk_buffers_hold_the_same_samples():
    """With ``reuse`` every chunk is written into the first chunk's buffers (the last, short
    one into their leading rows), and the samples, masks included, are those of fresh ones."""
    net = model()
    params = [p for p in net.parameters() if p.dim() == 2]
    mask = torch.rand(8, 4, generator=torch.Generator().manual_seed(3)) < 0.5

    def draw(reuse):
        sampler = GradSampler(finite_builder([], batches=7), F.cross_entropy)
        out, pointers = [], set()
        masks = [mask, torch.ones_like(params[1], dtype=torch.bool)]
        for chunk in sampler.iter_chunks(net, params, 7, 3, masks=masks, reuse=reuse):
            pointers.add(chunk[0].data_ptr())
            out.append([t.clone() for t in chunk])
        return out, pointers

    fresh, _ = draw(False)
    reused, pointers = draw(True)
    assert len(pointers) == 1 and [c[0].shape[0] for c in reused] == [3, 3, 1]
    for a, b in zip(fresh, reused):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert bool((reused[0][0][:, ~mask.flatten()] == 0).all())
