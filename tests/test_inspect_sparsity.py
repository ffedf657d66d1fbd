"""research/inspect_sparsity.py on our checkpoints, plain state dicts and compressed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ensure_research

ensure_research()
import inspect_sparsity  # noqa: E402
from sparseml.compressed import save_compressed  # noqa: E402
from sparseml.masks import nm_mask  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.errors import CheckpointError, SetupError  # noqa: E402


def nm(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return weight.masked_fill(~nm_mask(weight.abs().reshape(-1), n, m).view(weight.shape), 0.0)


def model() -> nn.Module:
    """Layers with known patterns: 2:4, 4:8 (not 2:4), 1:4, 70% unstructured, dense conv."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 64), nn.Linear(64, 64),
        nn.Linear(64, 64), nn.Linear(64, 32), nn.LayerNorm(32),
    )  # fmt: skip
    with torch.no_grad():
        net[2].weight.copy_(nm(net[2].weight, 2, 4))
        w = net[3].weight  # 4:8 with all four zeros of a group in one half: no 2:4
        w.view(-1, 8)[:, :4] = 0.0
        net[4].weight.copy_(nm(net[4].weight, 1, 4))
        w = net[5].weight
        w[torch.rand(w.shape) < 0.7] = 0.0
    return net


EXPECTED = {"0.weight": None, "2.weight": "2:4", "3.weight": "4:8", "4.weight": "1:4",
            "5.weight": None}  # fmt: skip


def check(report: dict) -> None:
    layers = {r["name"]: r for r in report["layers"]}
    assert {k: r["nm"] for k, r in layers.items()} == EXPECTED
    assert layers["2.weight"]["sparsity"] == pytest.approx(0.5)
    assert layers["3.weight"]["groups_2of4"] == pytest.approx(0.5)  # half the 4-groups
    assert layers["4.weight"]["sparsity"] == pytest.approx(0.25)
    assert 0.65 < layers["5.weight"]["sparsity"] < 0.75
    total = report["totals"]
    params = sum(p.numel() for p in model().parameters())
    assert total["params"] == params and total["layers"] == 5 and total["layers_2of4"] == 1
    assert layers["3.weight"]["param_share"] == pytest.approx(64 * 64 / params)
    zeros = sum(round(r["sparsity"] * r["numel"]) for r in layers.values())
    assert total["zeros"] == zeros + 32  # + the LayerNorm bias (zeros); other biases nonzero


def test_training_checkpoint(tmp_path, capsys):
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    path = save_checkpoint(tmp_path / "run_last.pth", model=net, optimizer=opt, epoch=2, arch="x")
    report = inspect_sparsity.main([str(path), "--json", str(tmp_path / "r.json")])
    check(report)
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(report))
    table = capsys.readouterr().out
    assert "2.weight" in table and "layers: 5 with" in table and "stored as" not in table


def test_plain_state_dict_with_plot(tmp_path):
    torch.save(model().state_dict(), tmp_path / "sweep_sparsity=0.9.pth")
    report = inspect_sparsity.main([str(tmp_path / "sweep_sparsity=0.9.pth"), "--plot",
                                    str(tmp_path / "plots" / "layers.png")])  # fmt: skip
    check(report)
    assert (tmp_path / "plots" / "layers.png").read_bytes()[:4] == b"\x89PNG"


def test_compressed_file_shows_its_layouts(tmp_path, capsys):
    path = save_compressed(model().state_dict(), tmp_path / "m.sparse.safetensors")
    report = inspect_sparsity.main([str(path)])
    check(report)
    assert report["stored_as"]["2.weight"] == "nm 2:4"
    assert report["stored_as"]["5.weight"] == "bitmask"
    assert report["stored_as"]["0.weight"] == "dense"
    assert "stored as" in capsys.readouterr().out


def test_bad_inputs(tmp_path):
    with pytest.raises(SetupError, match="CKPT .* does not exist"):
        inspect_sparsity.main([str(tmp_path / "none.pth")])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth is unreadable"):
        inspect_sparsity.main([str(tmp_path / "junk.pth")])


def test_cli_json_to_stdout_and_exit_2(run_script, tmp_path):
    path = save_compressed(model().state_dict(), tmp_path / "m.sparse.safetensors")
    done = run_script("inspect_sparsity.py", [str(path), "--json", "-"], timeout=120)
    assert done.returncode == 0, done.stderr
    check(json.loads(done.stdout))
    data = bytearray(Path(path).read_bytes())
    data[-5] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    done = run_script("inspect_sparsity.py", [str(path)], timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"compressed checkpoint {path}: tensor" in done.stderr and "checksum" in done.stderr
