"""Plots people read: titles name model and data, N:M results stand out, a collapsed method does
not squash the others, gradual runs get accuracy and sparsity per epoch."""

from __future__ import annotations

from argparse import Namespace

import pytest

from conftest import ensure_research

ensure_research()
from utils import plots  # noqa: E402


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save (their PNG is still written)."""
    figures = []
    save = plots._save

    def keep(fig, path):
        figures.append(
            {
                "suptitle": fig._suptitle.get_text() if fig._suptitle else "",
                "titles": [ax.get_title() for ax in fig.axes],
                "axes": [
                    {
                        "ylim": ax.get_ylim(),
                        "lines": {ln.get_label(): ln for ln in ax.get_lines()},
                    }
                    for ax in fig.axes
                ],
            }
        )
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def _row(method, sparsity, accuracy, mask="unstructured"):
    settings = {"dataset": "digits", "mask_type": mask}
    return {
        "method": method,
        "sparsity": sparsity,
        "accuracy": accuracy,
        "model": "vit_digits",
        "settings": settings,
    }


def test_one_shot_plot_names_model_data_nm_and_zooms_the_drop(tmp_path, drawn):
    rows = [_row("dense", 0.0, 95.0)]
    rows += [_row("cap", s, 95.0 - 10 * s) for s in (0.5, 0.7, 0.9)]  # -5 .. -9 points
    rows += [_row("gm", s, a) for s, a in ((0.5, 90.0), (0.7, 40.0), (0.9, 10.0))]  # collapses
    rows += [_row("cap_2to4", 0.5, 93.0, "2:4"), _row("nan", 0.5, None)]
    path = plots.plot_accuracy(rows, tmp_path / "p.png")
    assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
    [fig] = drawn
    assert "vit_digits" in fig["suptitle"] and "digits" in fig["suptitle"]
    accuracy, drop = fig["axes"]
    assert accuracy["lines"]["cap"].get_marker() == "o"
    nm = accuracy["lines"]["cap_2to4 (2:4)"]
    assert nm.get_marker() not in ("o", "None", "") and nm.get_linestyle() == "None"
    # The drop panel keeps cap's -5 .. -9 readable although gm falls 85 points.
    low, high = drop["ylim"]
    assert -11.0 < low < -9.0 and 0.0 <= high < 1.0
    assert list(drop["lines"]["cap"].get_ydata()) == pytest.approx([-5.0, -7.0, -9.0])
    assert "gm" in fig["titles"][1] and "cap" not in fig["titles"][1].split("(")[1]
    # Explicit names (the script passes its --model and --dataset / data folder) win.
    plots.plot_accuracy(rows, tmp_path / "q.png", "deit_small", "ImageFolder imagenet")
    assert drawn[1]["suptitle"] == "One-shot pruning of deit_small on ImageFolder imagenet"


def test_dataset_label():
    assert plots.dataset_label(Namespace(dataset="digits", data_dir=None)) == "digits"
    assert (
        plots.dataset_label(Namespace(dataset="", data_dir="/d/imagenet")) == "ImageFolder imagenet"
    )


def test_training_plot_shows_accuracy_and_sparsity_per_epoch(tmp_path, drawn):
    rows = [
        {"epoch": str(e), "eval_top1": str(80 + e), "eval_top5": "99", "sparsity": str(s),
         "prunable_sparsity_percent": str(100 * s)}
        for e, s in enumerate((0.0, 0.0, 0.5, 0.75, 0.75))
    ]  # fmt: skip
    path = plots.plot_training(rows, tmp_path / plots.PLOT_TRAINING, "vit_digits", "digits")
    assert path.stat().st_size > 5000
    [fig] = drawn
    assert fig["titles"][0] == "Gradual pruning of vit_digits on digits"
    accuracy, sparsity = fig["axes"]
    assert list(accuracy["lines"]["top-1"].get_ydata()) == [80, 81, 82, 83, 84]
    assert list(sparsity["lines"]["sparsity"].get_ydata()) == [0.0, 0.0, 0.5, 0.75, 0.75]


def test_dense_training_plot_is_not_titled_gradual_pruning(tmp_path, drawn):
    rows = [{"epoch": str(e), "eval_top1": str(80 + e), "sparsity": "0.0"} for e in range(3)]
    plots.plot_training(rows, tmp_path / "t.png", "vit_digits", "digits", pruning=False)
    [fig] = drawn
    assert fig["titles"][0] == "Dense training of vit_digits on digits"
