"""A second-order prune fired inside a training step never touches that step's gradient.

The manager's step wrapper runs the pruner before the real optimizer step; the pruner draws
its own gradient samples through the grad sampler. The optimizer must then apply exactly the
training gradient of that step (micro-batches accumulated included), not the last sample's
gradient or nothing. Also: ``sweep_cache`` is refused by ``manager.modify``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparseml.pytorch.optim import ScheduledModifierManager
from toy import builder, mlp, sampler

PRUNERS = {
    "OBSPruningModifier": "fisher_block_size: 8",
    "CAPruningModifier": "fisher_block_size: 8",
    "FastCAPruningModifier": "fisher_block_size: 8",
    "MFACPruningModifier": "fisher_block_size: 8",
}


def recipe(name: str) -> str:
    return f"""
modifiers:
  - !{name}
    params: ["re:.*weight"]
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 0
    num_grads: 12
    damp: 0.01
    {PRUNERS[name]}
"""


class RecordingSGD(torch.optim.SGD):
    """SGD that records the gradients it is asked to apply."""

    def step(self, closure=None):
        self.seen = [
            None if p.grad is None else p.grad.clone() for p in self.param_groups[0]["params"]
        ]
        return super().step(closure)


@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_prune_step_applies_the_training_gradient(name: str, micro_batches: int) -> None:
    model = mlp()
    manager = ScheduledModifierManager.from_yaml(recipe(name))
    opt = RecordingSGD(model.parameters(), lr=0.1)
    wrapped = manager.modify(model, opt, steps_per_epoch=4, grad_sampler=sampler())
    batches = builder()()
    for _ in range(micro_batches):  # training gradient, accumulated over micro-batches
        next(batches)  # a different stream position than the sampler's first batches
        (x,), _, target = next(batches)
        F.mse_loss(model(x), target).backward()
    training = [p.grad.clone() for p in model.parameters()]
    wrapped.step()  # the prune fires here, before the real step
    assert float((model[0].weight == 0).float().mean()) > 0.3  # it did prune
    for seen, grad in zip(opt.seen, training):
        assert torch.equal(seen, grad)
    for p, grad in zip(model.parameters(), training):  # and .grad is left as it was
        assert torch.equal(p.grad, grad)


def test_sweep_cache_is_refused_by_modify() -> None:
    model = mlp()
    manager = ScheduledModifierManager.from_yaml(recipe("OBSPruningModifier"))
    with pytest.raises(ValueError, match="sweep_cache is only valid for manager.apply"):
        manager.modify(
            model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=2,
            grad_sampler=sampler(), sweep_cache={},
        )  # fmt: skip
