"""SparseML-style checkpoint helpers: keys, weights_only loading, module. prefix, errors."""

import pytest
import torch
from torch import nn

from sparseml.errors import CheckpointError
from sparseml.pytorch.optim import ScheduledModifierManager
from sparseml.pytorch.utils import (
    ModuleSparsificationInfo,
    get_prunable_layers,
    load_epoch,
    load_model,
    load_optimizer,
    save_model,
)

RECIPE = """
modifiers:
  - !GlobalMagnitudePruningModifier
    params: __ALL_PRUNABLE__
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 1
"""


def test_save_model_with_manager_state_loads_weights_only(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    manager = ScheduledModifierManager.from_yaml(RECIPE)
    opt = manager.modify(model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=1)
    path = tmp_path / "ckpt" / "model.pth"
    save_model(path, nn.DataParallel(model), opt, epoch=3, include_modifiers=True)
    data = torch.load(path, weights_only=True)
    assert set(data) == {"state_dict", "optimizer", "epoch", "manager", "checksum"}
    assert not any(k.startswith("module.") for k in data["state_dict"])
    (masks,) = [v["masks"] for v in data["manager"].values()]
    assert sorted(masks) == ["0.weight", "1.weight"]
    fresh = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    load_model(path, fresh)
    assert torch.equal(fresh[0].weight, model[0].weight)
    load_optimizer(path, torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert load_epoch(path) == 3
    info = ModuleSparsificationInfo(fresh)
    assert info.params_summary["prunable_sparsity_percent"] == pytest.approx(50.0, abs=0.5)
    assert [name for name, _ in get_prunable_layers(fresh)] == ["0", "1"]


def test_corrupt_missing_and_mismatched_checkpoints(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(bad, nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_epoch(tmp_path / "none.pth")
    good = tmp_path / "good.pth"
    save_model(good, nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(good, nn.Linear(3, 2), strict=True)


@pytest.mark.parametrize("damage", ["tensor byte", "epoch"])
def test_save_model_files_carry_a_checksum_every_reader_verifies(tmp_path, damage):
    """A byte changed inside a tensor's storage, or an entry edited, loads silently with
    torch.load; the SparseML-style readers refuse it, naming the file and the entry."""
    model = nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(1.0)
    path = tmp_path / "m.pth"
    save_model(path, model, epoch=3)
    if damage == "epoch":
        data = torch.load(path, weights_only=True)
        data["epoch"] = 30  # the checksum entry kept as it was
        torch.save(data, path)
        entry = "'epoch'"
    else:
        raw = bytearray(path.read_bytes())
        at = raw.find(bytes.fromhex("0000803f") * 16)  # the weight's 1.0s
        raw[at + 1] ^= 0x01
        path.write_bytes(bytes(raw))
        assert torch.load(path, weights_only=True)["state_dict"]["weight"].ne(1.0).sum() == 1
        entry = "'state_dict'"
    for read in (lambda: load_model(path, nn.Linear(4, 4)), lambda: load_epoch(path)):
        with pytest.raises(CheckpointError, match=rf"m.pth is corrupt: its {entry} entry"):
            read()


@pytest.mark.parametrize("content", ["list", "tensor", "foreign"])
def test_load_model_refuses_files_that_would_load_nothing(tmp_path, content):
    """Not a state dict (an AttributeError before), or one sharing no name with the model
    (strict=False loaded nothing, silently)."""
    path = tmp_path / "x.pth"
    data = {"list": [1, 2], "tensor": torch.zeros(3), "foreign": {"other.w": torch.zeros(2)}}
    torch.save(data[content], path)
    with pytest.raises(CheckpointError, match="no state dict of tensors|shares no parameter name"):
        load_model(path, nn.Linear(2, 2))
