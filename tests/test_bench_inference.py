"""bench_inference.py times a user's model (dense vs CSR vs ONNX Runtime, one run) and refuses
speedups while the machine is busier than its cores."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from conftest import RESEARCH, ensure_research

ensure_research()
sys.path.insert(0, str(RESEARCH / "bench"))
import bench_inference as bi  # noqa: E402
import inference_backends  # noqa: E402  (BusyGuard reads the load there)

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    import timm

    import utils.models  # noqa: F401  (registers vit_digits)

    torch.manual_seed(0)
    model = timm.create_model("vit_digits", depth=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks.") and p.dim() == 2:
                bi.prune_(p.data, 0.9)
    path = tmp_path_factory.mktemp("ckpt") / "pruned.pth"
    torch.save(model.state_dict(), path)
    return path


def run(argv, monkeypatch, capsys, load: float) -> str:
    monkeypatch.setattr(inference_backends, "load_1min", lambda: load)
    monkeypatch.setattr(inference_backends, "usable_cores", lambda: 2)
    assert bi.main(argv) == 0
    return capsys.readouterr().out


def user_args(path) -> list[str]:
    return ["--model", "vit_digits", "--model-kwargs", "depth=1", "--initial-checkpoint",
            str(path), "--batch-sizes", "1", "4", "--quick", "--threads", "1"]  # fmt: skip


def table(out: str) -> list[list[str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("| ") and "---" not in ln]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_user_checkpoint_dense_vs_sparse_in_one_run(pruned_checkpoint, monkeypatch, capsys):
    out = run(user_args(pruned_checkpoint), monkeypatch, capsys, load=0.5)
    share = float(re.search(r"zeros ([\d.]+)% of Linear weights", out).group(1))
    assert 80 < share < 90  # 90% of the block layers, the classifier head dense
    assert "4 Linear layers with >= 50% zeros run as CSR" in out
    head, *rows = table(out)
    assert head == ["batch", "dense", "CSR", "CSR speedup", "ORT", "ORT speedup"]
    assert [r[0] for r in rows] == ["1", "4"]
    for row in rows:
        assert all(float(row[i]) > 0 for i in (1, 2, 4))
        assert row[3].endswith("x") and row[5].endswith("x")
    assert "busy" not in out


def test_speedups_refused_when_busier_than_the_cores(pruned_checkpoint, monkeypatch, capsys):
    out = run(user_args(pruned_checkpoint), monkeypatch, capsys, load=7.5)
    _, *rows = table(out)
    assert rows and all(r[3] == "busy" and r[5] == "busy" for r in rows)
    assert all(float(r[1]) > 0 for r in rows)  # the times are still shown
    assert "No speedup printed for 4 cell(s)" in out
    assert "busier than its 2 cores (1-minute load average up to 7.50)" in out


def test_prune_option_on_a_dense_model(monkeypatch, capsys):
    argv = ["--model", "vit_digits", "--model-kwargs", "depth=1", "--prune", "0.7",
            "--batch-sizes", "2", "--quick", "--threads", "1"]  # fmt: skip
    out = run(argv, monkeypatch, capsys, load=0.0)
    assert "zeros 70.0% of Linear weights" in out
    assert len(table(out)) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prune", "0.5"], "need --model"),
        (["--model", "vit_digits", "--prune", "1.5"], "--prune 1.5: must be in [0, 1)"),
        (["--model", "vit_digits", "--initial-checkpoint", "nope.pth"], "no such file"),
        (["--model", "vit_digits", "--batch-sizes", "0"], "each must be >= 1"),
    ],
)
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        bi.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
