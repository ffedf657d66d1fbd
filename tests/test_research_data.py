"""Offline data, tiny models, CLI, checkpoints, summaries and sparsity info for research/."""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import RESEARCH, ensure_research

ensure_research()
import timm  # noqa: E402
from PIL import Image  # noqa: E402

import utils.models  # noqa: E402, F401  (registers vit_digits, resnet_digits)
from sparseml.sparsity import ModuleSparsificationInfo, tensor_sparsity  # noqa: E402
from utils import checkpoint as ckpt_io  # noqa: E402
from utils import data as data_mod  # noqa: E402
from utils.cli import args_to_yaml, parse_args  # noqa: E402
from utils.errors import CheckpointError, SetupError  # noqa: E402
from utils.summary import read_summary, write_summary_row  # noqa: E402

# ----- torchvision shim ---------------------------------------------------------------------


def _fresh_compat():
    """A second, independent copy of ``utils.compat`` (its own module-level state)."""
    # The shim lives in the package (research/utils/compat.py re-exports it).
    path = RESEARCH.parent / "src" / "sparseml" / "compat.py"
    spec = importlib.util.spec_from_file_location("compat_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _RaisingFinder(importlib.abc.MetaPathFinder):
    def __init__(self, message):
        self.message = message

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            raise RuntimeError(self.message)
        return None


def test_shim_does_nothing_where_torchvision_loads():
    compat = _fresh_compat()  # torchvision is importable now (already imported)
    assert compat.ensure_torchvision() is False
    assert compat._TORCHVISION_LIB is None


def test_shim_reraises_unrelated_errors(monkeypatch):
    compat = _fresh_compat()
    monkeypatch.delitem(sys.modules, "torchvision")
    monkeypatch.setattr(sys, "meta_path", [_RaisingFinder("some other failure"), *sys.meta_path])
    with pytest.raises(RuntimeError, match="some other failure"):
        compat.ensure_torchvision()
    assert compat._TORCHVISION_LIB is None


def test_shim_is_idempotent_and_leaves_the_hub_online(monkeypatch):
    from utils.compat import ensure_torchvision

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    first = ensure_torchvision()
    assert ensure_torchvision() == first
    assert "HF_HUB_OFFLINE" not in os.environ  # --pretrained may download
    assert os.environ["WANDB_MODE"] == "online"  # an explicit choice is kept
    assert timm.create_model("vit_digits") is not None


def test_posterize_patch_accepts_zero_bits():
    from timm.data import auto_augment

    from utils.compat import patch_timm_posterize

    patch_timm_posterize()
    img = Image.new("RGB", (4, 4), (200, 100, 50))
    black = auto_augment.NAME_TO_OP["PosterizeIncreasing"](img, 0)
    assert black.getpixel((0, 0)) == (0, 0, 0) and black.size == (4, 4)
    assert auto_augment.NAME_TO_OP["Posterize"](img, 4).getpixel((0, 0)) == (192, 96, 48)


# ----- digits data --------------------------------------------------------------------------


def test_digits_tree_is_a_stratified_split_of_real_images(digits_dir):
    counts = {split: {} for split in ("train", "val")}
    for split in counts:
        for folder in sorted((digits_dir / split).iterdir()):
            counts[split][folder.name] = len(list(folder.glob("*.png")))
    assert sorted(counts["train"]) == [str(c) for c in range(10)]
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 1797
    assert sum(counts["val"].values()) == 360
    for c in range(10):  # every class keeps ~20% in val
        frac = counts["val"][str(c)] / (counts["val"][str(c)] + counts["train"][str(c)])
        assert 0.15 < frac < 0.25
    img = Image.open(next((digits_dir / "val" / "3").glob("*.png")))
    assert img.size == (32, 32) and img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.max() > 200 and arr.min() < 30  # real strokes, not a constant image


def test_prepare_digits_is_atomic_and_reuses_the_tree(tmp_path, monkeypatch):
    calls = []

    def tiny_writer(dest):
        calls.append(dest)
        for split in ("train", "val"):
            (dest / split / "0").mkdir(parents=True)
        return {"train": 0, "val": 0}

    monkeypatch.setattr(data_mod, "_write_digits_tree", tiny_writer)
    root = tmp_path / "cache" / "digits"
    assert data_mod.prepare_digits(root) == root
    assert data_mod.prepare_digits(root) == root
    assert len(calls) == 1 and calls[0] != root  # written elsewhere, renamed into place
    assert sorted(p.name for p in root.parent.iterdir()) == ["digits"]  # no temp leftovers

    def failing_writer(dest):
        (dest / "train").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(data_mod, "_write_digits_tree", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        data_mod.prepare_digits(tmp_path / "other")
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_prepare_digits_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(SetupError, match="no digits tree"):
        data_mod.prepare_digits(tmp_path)


def test_cap_data_dir_env_sets_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CAP_DATA_DIR", str(tmp_path / "d"))
    assert data_mod.default_digits_dir() == tmp_path / "d"


def _loader_args(*extra):
    args = parse_args(["--workers", "0", "-b", "16", *extra])
    args.distributed, args.world_size = False, 1
    return args


def test_digits_through_timm_dataset_and_loader(digits_dir):
    from utils import training

    args = _loader_args("--dataset", "digits", "--data-dir", str(digits_dir))
    train, val = data_mod.create_datasets(args)
    assert (len(train), len(val)) == (1437, 360)
    model = timm.create_model("vit_digits")
    args.num_classes = 10
    cfg = training.data_config(args, model, verbose=False)
    loader_train, loader_eval, _ = training.build_loaders(
        args, cfg, train, val, torch.device("cpu")
    )
    x, y = next(iter(loader_eval))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,)
    assert float(x.min()) >= -1.01 and float(x.max()) <= 1.01  # mean/std 0.5 of the model
    passes = data_mod.sampler_batches(loader_eval, torch.device("cpu"))(device="cpu")
    assert len(passes) == len(loader_eval)
    items = list(passes) + list(passes)  # one pass per iteration, re-iterable
    assert len(items) == 2 * len(loader_eval)
    inputs, kwargs, target = items[-1]
    assert isinstance(inputs, list) and kwargs == {} and inputs[0].shape[1:] == (3, 32, 32)
    assert target.dtype == torch.int64


def test_any_image_folder_works(tmp_path):
    for split in ("train", "validation"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(folder / f"{i}.jpg")
    train, val = data_mod.create_datasets(_loader_args("--data-dir", str(tmp_path)))
    assert len(train) == 6 and len(val) == 6
    assert sorted(train.reader.class_to_idx) == ["cat", "dog"]


def test_torch_dataset_with_local_files(tmp_path):
    """``torch/mnist`` from local idx files (built from digits), converted to RGB for timm."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        images = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        header = np.array([2051, n, 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = np.array([2049, n], dtype=">i4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    train, val = data_mod.create_datasets(
        _loader_args("--dataset", "torch/mnist", "--data-dir", str(tmp_path))
    )
    assert (len(train), len(val)) == (12, 6)
    img, target = train[0]
    assert img.mode == "RGB" and img.size == (28, 28) and 0 <= int(target) < 10


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SetupError, match="does not exist"):
        data_mod.create_datasets(_loader_args("--data-dir", str(tmp_path / "nope")))
    with pytest.raises(SetupError, match="needs a local root folder"):
        data_mod.create_datasets(_loader_args())


# ----- models -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit_digits", "resnet_digits"])
def test_digit_models_are_registered(name):
    from utils import training

    assert name in timm.list_models("*digits*")
    model = timm.create_model(name)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    args = parse_args(["--model", name, "--pretrained"])
    with pytest.raises(SetupError, match="pretrained"):
        training.build_model(args)


def test_vit_digits_shape_follows_the_brief():
    model = timm.create_model("vit_digits")
    assert model.embed_dim == 96 and len(model.blocks) == 4
    assert model.blocks[0].attn.num_heads == 3 and model.patch_embed.patch_size == (4, 4)


# ----- command line -------------------------------------------------------------------------


def test_cli_precedence_and_spellings(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("batch_size: 17\nlr: 0.01\ndataset: null\napex_amp: false\ngs-batch-size: 9\n")
    args = parse_args(["--config", str(cfg), "-b", "20", "/data", "--local_rank=3"])
    assert args.batch_size == 20  # CLI beats config
    assert args.lr == 0.01  # config beats default
    assert args.apex_amp is False  # unknown config keys are kept
    assert args.gs_batch_size == 9 and args.dataset == "" and args.data_dir == "/data"
    assert args.local_rank == 3 and args.opt == "sgd"
    args = parse_args(["--gs_batch_size", "4", "--local-rank=2", "--sparseml_recipe", "r.yaml"])
    assert (args.gs_batch_size, args.local_rank, args.sparseml_recipe) == (4, 2, "r.yaml")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parse_args(["--local-rank=0"]).local_rank == 1  # the environment wins
    dumped = tmp_path / "args.yaml"
    dumped.write_text(args_to_yaml(args))
    assert parse_args(["--config", str(dumped)]).gs_batch_size == 4  # args.yaml round-trips


def test_cli_config_errors(tmp_path):
    with pytest.raises(SetupError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(SetupError, match="mapping"):
        parse_args(["--config", str(bad)])


@pytest.mark.parametrize("path", sorted((RESEARCH / "configs").glob("*.yaml")), ids=str)
def test_shipped_configs_parse(path):
    args = parse_args(["--config", str(path)])
    assert args.opt == "adamw" and args.lr > 0 and args.epochs > 0


# ----- checkpoints and summaries ------------------------------------------------------------


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = ckpt_io.save_checkpoint(
        tmp_path / "c.pth", model=model, optimizer=opt, epoch=3, arch="x"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # temp file renamed away
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 3 and state["manager"] is None
    fresh = nn.Linear(4, 3)
    ckpt_io.load_model_weights(fresh, ckpt_io.load_checkpoint(path), path)
    assert torch.equal(fresh.weight, model.weight)
    with pytest.raises(CheckpointError, match="does not fit"):
        ckpt_io.load_model_weights(nn.Linear(5, 3), state, path)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.pth"
    model = nn.Linear(4, 3)
    ckpt_io.save_checkpoint(
        path, model=model, optimizer=torch.optim.SGD(model.parameters(), 0.1), epoch=0, arch="x"
    )
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt_io.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt_io.load_checkpoint(tmp_path / "none.pth")


def test_rng_state_round_trip():
    import random

    state = ckpt_io.rng_state()
    first = (torch.rand(3), np.random.rand(), random.random())
    ckpt_io.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_summary_csv_one_header_with_every_column(tmp_path):
    path = tmp_path / "summary.csv"
    write_summary_row(path, {"epoch": 0, "eval_top1": 10.0})
    write_summary_row(path, {"epoch": 1, "eval_top1": 20.0})
    write_summary_row(path, {"epoch": 2, "eval_top1": 30.0, "lr": 0.1})
    lines = path.read_text().splitlines()
    assert lines[0] == "epoch,eval_top1,lr" and len(lines) == 4
    assert [(r["epoch"], r["lr"]) for r in read_summary(path)] == [
        ("0", ""),
        ("1", ""),
        ("2", "0.1"),
    ]


# ----- sparsity info ------------------------------------------------------------------------


def test_tensor_sparsity_exact_and_per_dimension():
    t = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    assert float(tensor_sparsity(t)) == pytest.approx(5 / 8)
    assert tensor_sparsity(t, dim=0).tolist() == pytest.approx([0.5, 0.75])
    assert tensor_sparsity(t, dim=1).tolist() == pytest.approx([1.0, 0.5, 1.0, 0.0])
    assert tensor_sparsity(t, dim=(0, 1)).tolist() == (t == 0).float().tolist()


def test_module_sparsification_info_counts():
    class Wrapper(nn.Module):  # stands in for a DDP wrapper: names keep "module."
        def __init__(self):
            super().__init__()
            self.module = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Linear(3, 4))

    model = Wrapper()
    conv, norm, fc = model.module
    with torch.no_grad():
        conv.weight.view(-1)[:3] = 0  # 3 of 6
        fc.weight.view(-1)[:6] = 0  # 6 of 12
        fc.bias.zero_()  # 4 zeros, trainable but not prunable
    norm.weight.requires_grad_(False)
    info = ModuleSparsificationInfo(model)
    summary = info.params_summary
    total = 6 + 3 + 3 + 12 + 4  # BN weight frozen
    assert summary["total"] == total and summary["sparse"] == 3 + 6 + 4 + 3  # + BN bias
    assert summary["prunable"] == 18 and summary["prunable_sparse"] == 9
    assert summary["prunable_sparsity_percent"] == pytest.approx(50.0)
    assert summary["quantizable"] == 6 + 3 + 12 + 4 and summary["quantized"] == 0
    assert info.params_info == {
        "module.0.weight": {"numel": 6, "sparsity": 0.5, "quantized": False},
        "module.2.weight": {"numel": 12, "sparsity": 0.5, "quantized": False},
    }
    assert json.loads(str(info))["params_summary"]["sparse"] == 16


def test_scheduled_sparsity_stays_reported_while_finetuning_after_pruning():
    from sparseml.pytorch.optim import ScheduledModifierManager
    from utils import logging_utils

    manager = ScheduledModifierManager.from_yaml(
        "modifiers:\n  - !GMPruningModifier\n    params: __ALL_PRUNABLE__\n"
        "    init_sparsity: 0.3\n    final_sparsity: 0.6\n    start_epoch: 0\n"
        "    end_epoch: 2\n    update_frequency: 1\n"
    )
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = manager.modify(model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=1)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert logging_utils.scheduled_sparsity(manager, 3) == pytest.approx(0.6)
    assert logging_utils.scheduled_sparsity(None, 3) == 0.0
