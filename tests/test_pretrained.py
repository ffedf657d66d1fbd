"""``--pretrained``: the product never sets HF_HUB_OFFLINE; cached weights load without network;
missing weights offline fail in seconds with one line naming the way out."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, copy_digits_subset, ensure_research

ensure_research()
import huggingface_hub.constants  # noqa: E402
import timm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from utils import models as _models  # noqa: E402, F401  (registers vit_digits)
from utils import pretrained  # noqa: E402
from utils.errors import SetupError  # noqa: E402

# Assignments in Python (os.environ[...] =, setdefault, putenv, update(HF_HUB_OFFLINE=...),
# {"HF_HUB_OFFLINE": ...}) and shell (export/plain assignment, env prefix).
_SETS = re.compile(
    r"""(environ\s*\[\s*["']HF_HUB_OFFLINE["']\s*\]\s*=[^=]"""
    r"""|setdefault\(\s*["']HF_HUB_OFFLINE|putenv\(\s*["']HF_HUB_OFFLINE"""
    r"""|["']HF_HUB_OFFLINE["']\s*:|\bHF_HUB_OFFLINE\s*=[^=])"""
)
# A GPU benchmark harness (like tests, it must not download); not part of the product.
_ALLOWED = {"research/bench/gpu_check.sh"}


def test_no_product_file_assigns_hf_hub_offline():
    files = [p for d in ("src", "research") for p in (ROOT / d).rglob("*") if p.is_file()]
    files = [p for p in files if p.suffix in {".py", ".sh", ".yaml", ".yml", ".cfg", ".toml"}]
    assert len(files) > 30  # the scan sees the code
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in files
        if str(p.relative_to(ROOT)) not in _ALLOWED
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if _SETS.search(line)
    ]
    assert hits == []
    # The pattern itself finds the forms it is meant to find.
    for line in (
        'os.environ["HF_HUB_OFFLINE"] = "1"',
        "export HF_HUB_OFFLINE=1",
        '{"HF_HUB_OFFLINE": "1"}',
    ):
        assert _SETS.search(line), line
    assert not _SETS.search('if os.environ.get("HF_HUB_OFFLINE") == "1":')


# Run inside a process whose environment lacks HF_HUB_OFFLINE: every module of the product is
# imported with os.environ guarded, then a one-shot sweep runs to its end.
_PROBE = r"""
import atexit, importlib, os, pkgutil, runpy, sys
sys.path.insert(0, sys.argv[1])
environ_type = type(os.environ)
original = environ_type.__setitem__
def guarded(self, key, value):
    if key == "HF_HUB_OFFLINE":
        raise AssertionError("the product set HF_HUB_OFFLINE")
    original(self, key, value)
environ_type.__setitem__ = guarded
atexit.register(lambda: print("HF_HUB_OFFLINE at exit:", os.environ.get("HF_HUB_OFFLINE")))
from utils.compat import ensure_torchvision
ensure_torchvision()
import sparseml, utils
names = [m.name for m in pkgutil.walk_packages(sparseml.__path__, "sparseml.")]
names += [m.name for m in pkgutil.iter_modules(utils.__path__, "utils.")]
for name in names:
    importlib.import_module(name)
print("imported", len(names), "modules")
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_scripts_leave_hf_hub_offline_unset(research, digits_dir, tmp_path):
    data = copy_digits_subset(digits_dir, tmp_path / "data", train=2, val=3)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "WANDB_SERVICE")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT / "src"))
    script = research / "one_shot_pruning.py"
    recipe = research / "recipes" / "one_shot" / "gm_digits.yaml"
    args = ["--dataset", "", "--data-dir", data, "--sparseml_recipe", recipe]
    args += ["--sparsities", "0.5", "--workers", "0", "--output_dir", tmp_path / "out"]
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, research, script, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported" in result.stdout and "gm" in result.stdout  # the sweep's table
    assert "HF_HUB_OFFLINE at exit: None" in result.stdout


@pytest.mark.parametrize(
    "script,extra",
    [
        ("sparse_training.py", ["--epochs", "1"]),
        ("one_shot_pruning.py", ["--sparseml_recipe", "research/recipes/one_shot/gm_digits.yaml"]),
    ],
)
def test_pretrained_offline_without_cache_fails_fast(run_script, tmp_path, script, extra):
    extra = [str(ROOT / e) if e.startswith("research/") else e for e in extra]
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path)}
    start = time.monotonic()
    result = run_script(
        script, ["--model", "resnet18", "--pretrained", "--dataset", "digits", *extra], env=env
    )
    seconds = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: --pretrained:")
    assert "--initial-checkpoint" in errors[0] and "HF_HUB_OFFLINE" in errors[0]
    assert "Retry" not in result.stderr and seconds < 40  # not the hub's ~45 s retry loop


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty weights cache and a network that refuses every connection."""
    calls = []

    def refuse(address, *args, **kwargs):
        calls.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    return calls


def test_unreachable_hub_fails_at_once_naming_the_host(no_network):
    start = time.monotonic()
    with pytest.raises(SetupError, match="huggingface.co is unreachable") as err:
        pretrained.pretrained_kwargs("resnet18", "--initial-checkpoint")
    assert time.monotonic() - start < 5
    assert "--initial-checkpoint FILE" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    assert no_network and no_network[0][1] == 443


def test_model_without_pretrained_weights_is_refused():
    with pytest.raises(SetupError, match="no pretrained weights for 'vit_digits'"):
        pretrained.pretrained_kwargs("vit_digits", "--initial-checkpoint")
    assert pretrained.pretrained_kwargs("no_such_model_xyz", "--initial-checkpoint") == {}


def test_cached_weights_load_without_network(no_network, tmp_path):
    source = timm.create_model("test_vit")
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    snapshot = tmp_path / "hub" / "models--timm--test_vit.r160_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(weights, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")

    kwargs = pretrained.pretrained_kwargs("test_vit", "--initial-checkpoint")
    assert Path(kwargs["pretrained_cfg_overlay"]["file"]).name == "model.safetensors"
    loaded = timm.create_model("test_vit", pretrained=True, **kwargs)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert no_network == []  # nothing was looked up on the network
