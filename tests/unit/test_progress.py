"""Progress with ETA: log lines off a terminal, a bar on one, rank 0 only; wired into the
grad sampler, the Fisher inversion and CAP's elimination (a kernel callback)."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from sparseml import progress as progress_module
from sparseml.kernels.cap import cap_eliminate, cap_nm_prune
from sparseml.progress import Progress, format_seconds
from sparseml.pytorch.optim import ScheduledModifierManager
from toy import mlp, sampler


@pytest.fixture(autouse=True)
def no_forced_mode(monkeypatch):
    monkeypatch.delenv("SPARSEML_PROGRESS", raising=False)
    monkeypatch.delenv("SPARSEML_PROGRESS_INTERVAL", raising=False)
    monkeypatch.delenv("SPARSEML_PROGRESS_QUIET", raising=False)


def test_format_seconds():
    assert [format_seconds(s) for s in (4.4, 65, 3 * 3600 + 7 * 60)] == [
        "4 s",
        "1 min 05 s",
        "3 h 07 min",
    ]


def test_log_mode_first_line_has_an_eta_then_every_interval_and_a_total(caplog):
    stream = io.StringIO()  # not a terminal: log lines
    with (
        caplog.at_level(logging.INFO, logger="sparseml.progress"),
        Progress("phase", 10, "items", stream=stream, interval=3600, quiet=0) as progress,
    ):
        assert progress.mode == "log"
        for _ in range(10):
            progress.update()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # the first ETA, then (interval not reached) the total
    assert lines[0].startswith("phase: 1/10 items (10%,") and "ETA" in lines[0]
    assert lines[1].startswith("phase: 10/10 items in ")
    assert stream.getvalue() == ""


def test_interval_zero_logs_every_update(caplog):
    with (
        caplog.at_level(logging.INFO, logger="sparseml.progress"),
        Progress("p", 3, stream=io.StringIO(), interval=0, quiet=0) as progress,
    ):
        progress.set(1)
        progress.set(3)
    assert [r.getMessage().split(" (")[0] for r in caplog.records][:2] == ["p: 1/3", "p: 3/3"]


def test_bar_mode_redraws_one_line_and_ends_it():
    stream = io.StringIO()
    with Progress("phase", 4, "blocks", stream=stream, mode="bar", quiet=0) as progress:
        progress.update(4)
    text = stream.getvalue()
    assert text.startswith("\r|") and text.endswith("\n")
    assert "4/4 blocks (100%" in text and "#" in text


def test_environment_can_turn_it_off(monkeypatch, caplog):
    monkeypatch.setenv("SPARSEML_PROGRESS", "off")
    stream = io.StringIO()
    with (
        caplog.at_level(logging.INFO, logger="sparseml.progress"),
        Progress("phase", 2, stream=stream, quiet=0) as progress,
    ):
        progress.update(2)
    assert caplog.records == [] and stream.getvalue() == ""


def test_only_rank_zero_shows_progress(monkeypatch, caplog):
    monkeypatch.setattr(progress_module.dist, "rank", lambda: 1)
    stream = io.StringIO()
    with (
        caplog.at_level(logging.INFO, logger="sparseml.progress"),
        Progress("phase", 2, stream=stream, mode="bar", quiet=0) as progress,
    ):
        progress.update(2)
    assert progress.mode == "off" and caplog.records == [] and stream.getvalue() == ""


def test_cap_kernels_report_every_block_and_give_the_same_result():
    torch.manual_seed(0)
    n_b, B = 7, 8
    G = torch.randn(n_b, 16, B, dtype=torch.float64)
    H = torch.linalg.inv(G.mT @ G / 16 + 1e-2 * torch.eye(B, dtype=torch.float64))
    W = torch.randn(n_b, B, dtype=torch.float64)
    pruned = torch.zeros(n_b, B, dtype=torch.bool)
    seen: list[int] = []
    got = cap_eliminate(W, H, pruned, blocks_per_batch=2, on_blocks=seen.append)
    plain = cap_eliminate(W, H, pruned, blocks_per_batch=2)
    assert sum(seen) == n_b and len(seen) == 4  # batches of 2, 2, 2, 1
    assert all(torch.equal(a, b) for a, b in zip(got, plain))
    seen.clear()
    cap_nm_prune(W, H, pruned, 2, 4, blocks_per_batch=3, on_blocks=seen.append)
    assert sum(seen) == n_b


@pytest.mark.parametrize("modifier", ["OBSPruningModifier", "CAPruningModifier"])
def test_one_shot_prune_shows_sampling_and_fisher_progress(modifier, caplog, monkeypatch):
    monkeypatch.setenv("SPARSEML_PROGRESS_QUIET", "0")  # the tiny phases take milliseconds
    recipe = f"""
pruning_modifiers:
  - !{modifier}
    params: ["re:.*weight"]
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 1
    num_grads: 12
    fisher_block_size: 8
    damp: 1.0e-3
"""
    with caplog.at_level(logging.INFO):
        ScheduledModifierManager.from_yaml(recipe).apply(mlp(), grad_sampler=sampler())
    text = caplog.text
    assert "12/12 samples" in text and "ETA" in text
    assert f"{modifier}: Fisher inverse: " in text and "blocks in " in text


@pytest.mark.parametrize("m", [4, 32], ids=["sample_space", "gram"])
def test_fisher_builder_reports_every_block_and_gives_the_same_inverse(m):
    from sparseml.kernels.fisher import BlockFisherBuilder

    torch.manual_seed(0)
    grads = torch.randn(m, 10 * 8)
    results, seen = [], []
    for callback in (None, seen.append):
        builder = BlockFisherBuilder(80, 8, m, 1e-2)
        builder.add(grads)
        results.append(builder.finish(on_blocks=callback))
    assert sum(seen) == 10
    assert torch.equal(results[0].full(), results[1].full())


def test_lines_go_to_stderr_where_logging_is_not_set_up():
    """A user's script or a benchmark that never configured logging still sees progress."""
    silent = logging.getLogger("progress_test_unconfigured")
    silent.propagate = False  # no handler anywhere, as in a script without logging setup
    stream = io.StringIO()
    with Progress(
        "phase", 2, "items", stream=stream, logger=silent, interval=3600, quiet=0
    ) as progress:
        progress.update(2)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("phase: 2/2 items (100%") and "ETA" in lines[0]
    assert lines[1].startswith("phase: 2/2 items in ")


def test_a_phase_shorter_than_the_quiet_start_prints_nothing() -> None:
    stream = io.StringIO()
    silent = logging.getLogger("progress-quiet-test")
    silent.propagate = False
    with Progress("phase", 3, "items", stream=stream, logger=silent, quiet=60) as progress:
        progress.update(3)
    assert stream.getvalue() == ""
