"""Checkpoints as timm users expect: timm's keys, ``timm.models.load_checkpoint``, the N best
kept (``--checkpoint-hist``), older checkpoints still resume; other ranks stay quiet."""

from __future__ import annotations

import logging
import math
import warnings
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from conftest import copy_digits_subset, ensure_research

ensure_research()
import timm  # noqa: E402

import sparse_training  # noqa: E402
from sparseml.serialization import atomic_save  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.checkpoint_hist import CheckpointHistory  # noqa: E402
from utils.distributed import quiet_other_ranks  # noqa: E402
from utils.errors import SetupError  # noqa: E402
from utils.plots import PLOT_TRAINING  # noqa: E402


def _offer_and_write(hist: CheckpointHistory, epoch: int, sparsity: float, metric: float):
    path = hist.offer(epoch, sparsity, metric)
    if path is not None:
        path.write_text(f"epoch {epoch}")
    hist.commit()
    return path


def test_history_keeps_the_sparsest_then_best_n(tmp_path):
    hist = CheckpointHistory(tmp_path, "m", max_history=2, decreasing=False)
    assert _offer_and_write(hist, 0, 0.0, 90.0) is not None
    assert _offer_and_write(hist, 1, 0.0, 95.0) is not None
    assert _offer_and_write(hist, 2, 0.0, 80.0) is None  # worse than both kept
    assert _offer_and_write(hist, 3, 0.0, math.nan) is None  # never kept
    # Pruning: a sparser model outranks every denser one, whatever its accuracy.
    assert _offer_and_write(hist, 4, 0.5, 60.0) is not None
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "m_best.pth",
        "m_best_sparsity=0.00_epoch=1.pth",
        "m_best_sparsity=0.50_epoch=4.pth",
    ]
    assert (tmp_path / "m_best.pth").read_text() == "epoch 4"
    _offer_and_write(hist, 5, 0.5, 70.0)
    assert [e["epoch"] for e in hist.state_dict()] == [5, 4]
    assert (tmp_path / "m_best.pth").read_text() == "epoch 5"
    assert not (tmp_path / "m_best_sparsity=0.00_epoch=1.pth").exists()

    losses = CheckpointHistory(tmp_path / "l", "m", max_history=1, decreasing=True)
    (tmp_path / "l").mkdir()
    _offer_and_write(losses, 0, 0.0, 2.0)
    assert _offer_and_write(losses, 1, 0.0, 1.0) is not None
    assert [e["epoch"] for e in losses.state_dict()] == [1]
    assert CheckpointHistory(tmp_path, "m", 0, False).offer(9, 0.9, 99.0) is None


def test_checkpoint_hist_must_not_be_negative():
    from utils.cli import parse_args

    with pytest.raises(SetupError, match="--checkpoint-hist -1 is not allowed"):
        parse_args(["--dataset", "digits", "--checkpoint-hist", "-1"])


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits_dir) -> Path:
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("ckpt_digits"), 20, 6)


def train_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        str(data), "--dataset", "", "--model", "vit_digits", "--model-kwargs", "depth=1",
        "-b", "50", "--workers", "0", "--opt", "adamw", "--lr", "0.002", "--sched", "step",
        "--warmup-epochs", "0", "--save-last", "--output", str(out), "--experiment", name,
        "--log-interval", "100", *extra,
    ]  # fmt: skip


def test_checkpoints_load_with_timm_and_hist_keeps_n(small_digits, tmp_path, one_thread):
    argv = train_args(small_digits, tmp_path, "hist", "--epochs", "3", "--checkpoint-hist", "2")
    out = sparse_training.main([*argv, "--model-ema", "--model-ema-decay", "0.5"])["out_dir"]
    kept = sorted(out.glob("vit_digits_best_*.pth"))
    assert len(kept) == 2 and (out / "vit_digits_best.pth").is_file()
    state = torch.load(out / "vit_digits_last.pth", weights_only=True)
    assert {"state_dict", "state_dict_ema", "optimizer", "epoch", "arch", "manager"} <= set(state)
    assert state["arch"] == "vit_digits" and state["epoch"] == 2
    hist = state["checkpoint_hist"]
    assert {e["file"] for e in hist} == {p.name for p in kept}
    assert hist[0]["metric"] >= hist[1]["metric"]  # dense run: ranked by top-1
    model = timm.create_model("vit_digits", depth=1)
    for use_ema, key in ((False, "state_dict"), (True, "state_dict_ema")):
        timm.models.load_checkpoint(model, str(out / "vit_digits_last.pth"), use_ema=use_ema)
        for name, value in model.state_dict().items():
            assert torch.equal(value, state[key][name]), (key, name)
    top = torch.load(out / "vit_digits_best.pth", weights_only=True)
    assert top["epoch"] == state["checkpoint_hist"][0]["epoch"]
    png = out / PLOT_TRAINING  # gradual runs' accuracy/sparsity plot, redrawn every epoch
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000


def test_old_format_checkpoint_still_resumes(small_digits, tmp_path, one_thread):
    argv = train_args(small_digits, tmp_path, "old", "--epochs", "2")
    out = sparse_training.main([*argv, "--stop-epoch", "1"])["out_dir"]
    last = out / "vit_digits_last.pth"
    new = torch.load(last, weights_only=True)
    old = {k: v for k, v in new.items() if k not in ("state_dict", "checkpoint_hist", "version")}
    old.update(model=new["state_dict"], ema=None, scaler=None, best={"0.00": {"metric": 1.0}})
    atomic_save(old, last)
    assert set(load_checkpoint(last)) >= {"state_dict", "state_dict_ema", "amp_scaler"}
    result = sparse_training.main([*argv, "--resume", str(last)])
    resumed = load_checkpoint(last)
    assert resumed["epoch"] == 1 and "model" not in torch.load(last, weights_only=True)
    assert result["eval"]  # the resumed epoch ran


def test_save_checkpoint_omits_unused_ema_and_scaler(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=opt, epoch=0, arch="a")
    state = torch.load(path, weights_only=True)
    assert "state_dict_ema" not in state and "amp_scaler" not in state  # timm would use them
    fresh = torch.nn.Linear(2, 2)
    timm.models.load_checkpoint(fresh, str(path))
    assert torch.equal(fresh.weight, model.weight)


@pytest.fixture
def restore_levels():
    names = ("", "sparseml", "sparse_training", "one_shot", "timm", "utils")
    before = {n: logging.getLogger(n).level for n in names}
    yield
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


def test_other_ranks_log_warnings_only(restore_levels):
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("sparseml").setLevel(logging.NOTSET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_other_ranks(Namespace(rank=0))
        assert logging.getLogger("sparseml.grad_sampler").isEnabledFor(logging.INFO)
        warnings.warn("rank 0 sees this", FutureWarning, stacklevel=1)
        quiet_other_ranks(Namespace(rank=1))
        sampler = logging.getLogger("sparseml.grad_sampler")
        assert not sampler.isEnabledFor(logging.INFO) and sampler.isEnabledFor(logging.WARNING)
        assert not logging.getLogger("sparse_training").isEnabledFor(logging.INFO)
        warnings.warn("deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["rank 0 sees this"]


def test_history_survives_a_failed_write_and_resume(tmp_path, monkeypatch):
    """A full disk while the best checkpoint is written: the run stops; its last checkpoint
    already lists the entry, whose file is missing. The resumed history drops it."""
    import errno

    import utils.checkpoint as ckpt

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hist = CheckpointHistory(tmp_path, "m", max_history=2, decreasing=False)
    first = hist.offer(0, 0.0, 50.0)
    save_checkpoint(first, model=model, optimizer=opt, epoch=0, arch="a")
    hist.commit()
    best_path = hist.offer(1, 0.5, 40.0)
    state = hist.state_dict()
    save_checkpoint(tmp_path / "m_last.pth", model=model, optimizer=opt, epoch=1, arch="a",
                    checkpoint_hist=state)  # fmt: skip

    def full_disk(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "atomic_save", full_disk)
    with pytest.raises(OSError):
        save_checkpoint(best_path, model=model, optimizer=opt, epoch=1, arch="a")
    assert not best_path.exists() and (tmp_path / "m_best.pth").read_bytes() == first.read_bytes()

    resumed = CheckpointHistory(tmp_path, "m", max_history=2, decreasing=False)
    resumed.load_state_dict(load_checkpoint(tmp_path / "m_last.pth")["checkpoint_hist"])
    assert [e["epoch"] for e in resumed.state_dict()] == [0]
    assert resumed.offer(1, 0.5, 40.0) == best_path  # the rerun epoch is ranked again
