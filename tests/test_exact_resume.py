"""A gradual run stopped at an epoch boundary and resumed from its state equals the
uninterrupted run bit for bit, for every pruner (the grad sampler's stream position and
seeds, M-FAC's buffered gradients, masks, optimizer and RNG states all restored).

The loaders shuffle and augment with the global RNGs, so a resumed stream that started over,
or replayed batches that consumed the training RNG, would give different weights.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from sparseml.pytorch.optim import ScheduledModifierManager
from toy import mlp

SECOND = "num_grads: 6\n    damp: 0.01\n    fisher_block_size: 8\n    global_sparsity: true"
PRUNERS = {
    "GMPruningModifier": "",
    "OBSPruningModifier": SECOND,
    "CAPruningModifier": SECOND,
    "FastCAPruningModifier": "num_grads: 6\n    damp: 0.01\n    fisher_block_size: 8",
    # one Fisher per 2 output rows, each step's target reached in 3 sweeps, loss-curve allocation
    "FastCAP-groups-sweeps": "num_grads: 6\n    damp: 0.01\n    fisher_block_size: 8\n"
    "    fisher_layout: rows\n    row_scaling: true\n    fisher_rows: 2\n    sweeps: 3\n"
    "    global_sparsity: true\n    global_allocation: losses",
    "MFACPruningModifier": SECOND,
    "MFAC-buffered": "num_grads: 3\n    fisher_block_size: 8\n    use_gradient_buffering: true",
}
EPOCHS, STOP = 4, 2


class Noisy(Dataset):
    """A regression set whose items get fresh noise from the global RNGs (an augmentation)."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i] + 0.01 * torch.randn(8) + 0.01 * random.random() + 0.01 * np.random.rand()
        return x, x[:4] * x[4:]


def recipe(name: str) -> str:
    tags = {"MFAC": "MFACPruningModifier", "FastCAP-": "FastCAPruningModifier"}
    tag = next((t for prefix, t in tags.items() if name.startswith(prefix)), name)
    return f"""
modifiers:
  - !{tag}
    params: ["re:.*weight"]
    init_sparsity: 0.2
    final_sparsity: 0.7
    start_epoch: 0
    end_epoch: 3
    update_frequency: 1
    {PRUNERS[name]}
"""


class Batches:
    """One pass over a shuffled loader per iteration (what the scripts hand the sampler)."""

    def __init__(self) -> None:
        self.loader = DataLoader(Noisy(16, 1), batch_size=4, shuffle=True)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield [x], {}, y


def setup(name: str):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    manager = ScheduledModifierManager.from_yaml(recipe(name))
    sampler = None if name == "MFAC-buffered" else {
        "data_loader_builder": lambda **kw: Batches(), "loss_fn": F.mse_loss,
    }  # fmt: skip
    return model, opt, manager, sampler


def train(model, wrapped, loader, epochs) -> None:
    for _ in epochs:
        for x, y in loader:
            F.mse_loss(model(x), y).backward()
            wrapped.step()
            wrapped.zero_grad()


def rng_state():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def set_rng(state) -> None:
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_resume_equals_uninterrupted(name: str, one_thread) -> None:
    train_loader = DataLoader(Noisy(32, 0), batch_size=8, shuffle=True)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    start = rng_state()

    model, opt, manager, sampler = setup(name)
    wrapped = manager.modify(model, opt, steps_per_epoch=4, grad_sampler=sampler)
    train(model, wrapped, train_loader, range(EPOCHS))
    full = copy.deepcopy(model.state_dict())

    set_rng(start)
    model, opt, manager, sampler = setup(name)
    wrapped = manager.modify(model, opt, steps_per_epoch=4, grad_sampler=sampler)
    train(model, wrapped, train_loader, range(STOP))
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "manager": manager.state_dict()}
    )
    saved["rng"] = rng_state()
    del model, opt, manager, wrapped  # the process dies here

    model, opt, manager, sampler = setup(name)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    manager.load_state_dict(saved["manager"])
    wrapped = manager.modify(model, opt, steps_per_epoch=4, epoch=STOP, grad_sampler=sampler)
    model.load_state_dict(saved["model"])  # as the script does after modify
    set_rng(saved["rng"])
    train(model, wrapped, train_loader, range(STOP, EPOCHS))

    assert float((model[0].weight == 0).float().mean()) > 0.5
    for key, value in full.items():
        assert torch.equal(model.state_dict()[key], value), key
