"""What a user's data folders can trust: one class map for every split,
saved in checkpoints and checked on resume, evaluation and export; symlink loops refused fast.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import copy_digits_subset, ensure_research

ensure_research()

import one_shot_pruning  # noqa: E402
import sparse_training  # noqa: E402
from test_sparse_training import base_args  # noqa: E402
from utils import class_map  # noqa: E402
from utils import data as data_mod  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.cli import parse_args  # noqa: E402
from utils.errors import SetupError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits_dir) -> Path:
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("digits"), 12, 4)


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def datasets(root: Path):
    args = parse_args([str(root), "--dataset", "", "--workers", "0", "-b", "4"])
    args.distributed, args.world_size = False, 1
    return data_mod.create_datasets(args)


def labels_by_folder(ds) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for path, target in ds.reader.samples:
        found.setdefault(Path(path).parent.name, set()).add(target)
    return found


# ----- one class map for every split --------------------------------------------------
@pytest.mark.parametrize("how", ["empty", "missing"])
@pytest.mark.parametrize("split", ["val", "train"])
def test_a_class_empty_in_one_split_keeps_every_label(small_digits, tmp_path, how, split):
    root = copy_tree(small_digits, tmp_path / "data")
    for image in (root / split / "3").iterdir():
        image.unlink()
    if how == "missing":
        (root / split / "3").rmdir()
    train, val = datasets(root)
    for ds in (train, val):
        assert class_map.dataset_class_names(ds) == [str(i) for i in range(10)]
        got = labels_by_folder(ds)
        assert all(got[c] == {int(c)} for c in got), got  # folder "7" is label 7 in both
    assert "3" not in labels_by_folder(val if split == "val" else train)


def test_checkpoint_class_map_is_saved_and_checked_on_resume(small_digits, tmp_path):
    argv = [*base_args(small_digits, tmp_path, "run"), "--epochs", "2", "--stop-epoch", "1"]
    out = sparse_training.main([*argv, "--save-last"])["out_dir"]
    last = out / "vit_digits_last.pth"
    assert load_checkpoint(last)["class_map"] == [str(i) for i in range(10)]
    renamed = copy_tree(small_digits, tmp_path / "renamed")
    for split in ("train", "val"):  # the same number of classes, other names: label 0 moves
        (renamed / split / "0").rename(renamed / split / "zero")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SetupError) as err:
        sparse_training.main([str(renamed), *argv[1:], "--save-last", "--resume", str(last)])
    assert "wrong labels" in str(err.value) and "'0'" in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched


def test_one_shot_evaluation_refuses_data_with_other_classes(small_digits, tmp_path):
    argv = [*base_args(small_digits, tmp_path, "dense"), "--epochs", "1"]
    best = sparse_training.main(argv)["out_dir"] / "vit_digits_best.pth"
    fewer = copy_tree(small_digits, tmp_path / "fewer")
    for split in ("train", "val"):
        shutil.rmtree(fewer / split / "9")
    gm = Path(sparse_training.__file__).parent / "recipes" / "one_shot" / "gm_digits.yaml"
    common = ["--model", "vit_digits", "--model-kwargs", "depth=1", "--dataset", ""]
    common += ["--initial-checkpoint", str(best), "--sparseml-recipe", str(gm), "--workers", "0"]
    common += ["--sparsities", "0.5", "--output", str(tmp_path / "sweeps"), "--no-report"]
    with pytest.raises(SetupError, match="wrong labels"):
        one_shot_pruning.main(["--data-dir", str(fewer), *common, "--experiment", "x"])
    rows = one_shot_pruning.main(["--data-dir", str(small_digits), *common, "--experiment", "y"])
    assert len(rows) == 2  # the data it was trained on: the dense row and one pruned row


def test_export_checks_and_reports_the_class_map(small_digits, tmp_path):
    import export

    argv = [*base_args(small_digits, tmp_path, "dense"), "--epochs", "1"]
    best = sparse_training.main(argv)["out_dir"] / "vit_digits_best.pth"
    common = ["--model", "vit_digits", "--model-kwargs", "depth=1", "--formats", "compressed"]
    common += ["--initial-checkpoint", str(best)]
    report = export.main([*common, "--output", str(tmp_path / "e")])
    assert report["class_map"] == [str(i) for i in range(10)]
    state = load_checkpoint(best)
    state["class_map"] = state["class_map"][:9]  # names that no longer fit the classifier
    del state["checksum"]
    torch.save(state, tmp_path / "nine.pth")
    common[-1] = str(tmp_path / "nine.pth")
    with pytest.raises(SetupError, match="9 classes but the model has 10 outputs"):
        export.main([*common, "--output", str(tmp_path / "e2")])


# ----- symlink loops in a data folder -------------------------------------------------
def loop_tree(tmp_path: Path, small_digits: Path, shape: str) -> Path:
    root = copy_tree(small_digits, tmp_path / shape)
    if shape == "self":  # a folder linking to itself
        os.symlink(root / "train" / "1", root / "train" / "1" / "again")
    elif shape == "parent":  # a link to the split folder from inside a class
        os.symlink(root / "train", root / "train" / "2" / "up")
    else:  # two folders linking to each other
        os.symlink(root / "train" / "5", root / "train" / "4" / "to5")
        os.symlink(root / "train" / "4", root / "train" / "5" / "to4")
    return root


@pytest.mark.parametrize("shape", ["self", "parent", "mutual"])
def test_symlink_loops_are_a_clear_error_not_a_hang(small_digits, tmp_path, shape):
    root = loop_tree(tmp_path, small_digits, shape)
    start = time.perf_counter()
    with pytest.raises(SetupError) as err:
        datasets(root)
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "symlink loop" in msg and str(root) in msg and "\n" not in msg


def test_symlink_loop_fails_the_script_before_training(small_digits, tmp_path):
    root = loop_tree(tmp_path, small_digits, "mutual")
    with pytest.raises(SetupError, match="symlink loop"):
        sparse_training.main(base_args(root, tmp_path / "out", "x"))
    assert not (tmp_path / "out").exists()


def test_links_to_folders_outside_the_tree_are_read_once(small_digits, tmp_path):
    root = copy_tree(small_digits, tmp_path / "linked")
    shutil.move(root / "val" / "6", tmp_path / "elsewhere6")
    os.symlink(tmp_path / "elsewhere6", root / "val" / "6")
    _, val = datasets(root)
    images = [Path(p).name for p, _ in val.reader.samples]
    assert len(images) == len(set(images)) == 40 and labels_by_folder(val)["6"] == {6}
