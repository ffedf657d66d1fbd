"""What checkpoints and resume can trust: a content checksum catches flipped
bytes inside a tensor, a pruned checkpoint never resumes without its masks, a finished run is
left alone, and the advice after an interrupt in epoch 0 is what a rerun does.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import copy_digits_subset, ensure_research

ensure_research()

import sparse_training  # noqa: E402
from test_sparse_training import GM_RECIPE, base_args, pruned_weights, sparsity, write  # noqa: E402
from utils import checkpoint as ckpt_io  # noqa: E402
from utils.errors import CheckpointError, SetupError  # noqa: E402
from utils.weights import read_state_dict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits_dir) -> Path:
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("digits"), 12, 4)


def save_small(path: Path) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    ckpt_io.save_checkpoint(path, model=model, optimizer=opt, epoch=3, arch="mlp")
    return model


def data_entries(path: Path) -> list[tuple[str, int, int]]:
    """(name, offset in the file, size) of every tensor storage in a torch zip checkpoint."""
    out = []
    with zipfile.ZipFile(path) as zf, path.open("rb") as f:
        for info in zf.infolist():
            if "/data/" not in info.filename or info.file_size == 0:
                continue
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            out.append((info.filename, info.header_offset + 30 + name_len + extra_len,
                        info.file_size))  # fmt: skip
    return out


def flip_byte(path: Path, which: int) -> str:
    name, offset, size = sorted(data_entries(path), key=lambda e: e[2])[which]
    raw = bytearray(path.read_bytes())
    raw[offset + size // 2] ^= 0x10  # one bit in the middle of the tensor's bytes
    path.write_bytes(bytes(raw))
    return name


@pytest.mark.parametrize("which", [0, -1, 1])  # smallest storage, largest, another one
def test_a_flipped_byte_inside_a_tensor_is_refused_naming_the_file(tmp_path, which):
    path = tmp_path / "c.pth"
    save_small(path)
    ckpt_io.load_checkpoint(path)  # intact: verified and loads
    flip_byte(path, which)
    for read in (lambda: ckpt_io.load_checkpoint(path), lambda: read_state_dict(path, "--x")):
        with pytest.raises(CheckpointError) as err:
            read()
        msg = str(err.value)
        assert str(path) in msg and "checksum" in msg and "\n" not in msg


def test_torch_alone_does_not_notice_the_flip(tmp_path):
    """Why the checksum exists: the same flip loads silently without it (the test can fail)."""
    path = tmp_path / "c.pth"
    model = save_small(path)
    flip_byte(path, -1)
    state = torch.load(path, weights_only=True)
    changed = [
        k for k, v in model.state_dict().items() if not torch.equal(v, state["state_dict"][k])
    ]
    changed += ["optimizer"] if "momentum_buffer" in str(state["optimizer"]) else []
    assert changed  # some tensor differs and torch.load said nothing


def test_a_truncated_checkpoint_is_a_one_line_error(tmp_path):
    path = tmp_path / "c.pth"
    save_small(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="unreadable") as err:
        ckpt_io.load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    path = tmp_path / "c.pth"
    save_small(path)
    state = torch.load(path, weights_only=True)
    del state["checksum"]
    torch.save(state, path)
    assert ckpt_io.load_checkpoint(path)["epoch"] == 3


def test_flipped_resume_checkpoint_stops_the_script_before_training(small_digits, tmp_path):
    argv = [*base_args(small_digits, tmp_path, "run"), "--save-last"]
    last = sparse_training.main([*argv, "--epochs", "1"])["out_dir"] / "vit_digits_last.pth"
    flip_byte(last, -1)
    with pytest.raises(CheckpointError, match="checksum"):
        sparse_training.main([*argv, "--epochs", "2", "--resume", str(last)])
    with pytest.raises(CheckpointError, match="checksum"):
        sparse_training.main([*base_args(small_digits, tmp_path, "b"), "--initial-checkpoint",
                              str(last)])  # fmt: skip


# ----- resume without the recipe --------------------------------------------------------------
def test_pruned_checkpoint_resumed_without_its_recipe_is_refused(small_digits, tmp_path):
    recipe = write(tmp_path / "gm.yaml", GM_RECIPE)
    argv = [*base_args(small_digits, tmp_path, "gm"), "--save-last"]
    out = sparse_training.main([*argv, "--sparseml-recipe", str(recipe), "--stop-epoch", "3"])[
        "out_dir"
    ]
    last = out / "vit_digits_last.pth"
    assert sparsity(pruned_weights(ckpt_io.load_checkpoint(last))) > 0.4
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    resume = [*argv, "--resume", str(last)]
    with pytest.raises(SetupError) as err:
        sparse_training.main(resume)
    msg = str(err.value)
    assert "masks" in msg and "--sparseml-recipe" in msg and "gm.yaml" in msg and "\n" not in msg
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    done = sparse_training.main([*resume, "--sparseml-recipe", str(recipe)])  # with it: fine
    final = ckpt_io.load_checkpoint(done["out_dir"] / "vit_digits_last.pth")
    assert final["epoch"] == 3 and sparsity(pruned_weights(final)) == pytest.approx(0.75, abs=0.01)


# ----- a finished run -------------------------------------------------------------------------
def test_resuming_a_finished_run_says_so_and_changes_nothing(small_digits, tmp_path, capsys):
    argv = [*base_args(small_digits, tmp_path, "done"), "--epochs", "2", "--save-last"]
    first = sparse_training.main(argv)
    out = first["out_dir"]
    marker = out / sparse_training.COMPLETE
    text = marker.read_text()
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()}
    capsys.readouterr()
    again = sparse_training.main([*argv, "--resume", str(out / "vit_digits_last.pth")])
    assert "already finished" in capsys.readouterr().err
    assert marker.read_text() == text and '"eval": {}' not in text
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()} == before
    assert again["eval"] == pytest.approx(first["eval"])


# ----- an interrupt in epoch 0 ----------------------------------------------------------------
def test_interrupt_in_epoch_0_advice_matches_the_rerun(small_digits, tmp_path, capsys, monkeypatch):
    argv = [*base_args(small_digits, tmp_path, "early"), "--epochs", "1", "--save-last"]
    recipe = write(tmp_path / "gm.yaml", GM_RECIPE)
    argv += ["--sparseml-recipe", str(recipe), "--stop-epoch", "1"]
    real = sparse_training.train_one_epoch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sparse_training, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sparse_training.main(argv)
    err = capsys.readouterr().err
    assert "Stopped in epoch 0" in err and "rerun the same command to start over" in err
    monkeypatch.setattr(sparse_training, "train_one_epoch", real)
    out = sparse_training.main(argv)["out_dir"]  # the same command: it starts over, same folder
    assert out == tmp_path / "early" and (out / "vit_digits_last.pth").is_file()


def test_a_folder_with_a_finished_epoch_is_still_refused(small_digits, tmp_path):
    argv = [*base_args(small_digits, tmp_path, "kept"), "--epochs", "1", "--save-last"]
    sparse_training.main(argv)
    with pytest.raises(SetupError, match="already holds a run"):
        sparse_training.main(argv)
