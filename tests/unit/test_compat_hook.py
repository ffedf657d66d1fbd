"""The lazy torchvision repair that ``import sparseml`` installs: it defines the missing op
schemas only when torchvision's native library cannot load, and leaves after one use."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import sparseml

COMPAT = Path(sparseml.__file__).parent / "compat.py"


def fresh_compat():
    """An independent copy of ``sparseml.compat`` (its own module-level state)."""
    spec = importlib.util.spec_from_file_location("compat_hook_copy", COMPAT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_torchvision(tmp_path, monkeypatch):
    """A torchvision package folder that is not imported yet; ``library`` sets its ``_C``."""
    folder = tmp_path / "torchvision"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location(
        "torchvision", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(
        importlib.machinery.PathFinder,
        "find_spec",
        classmethod(
            lambda cls, name, path=None, target=None: spec if name == "torchvision" else None
        ),
    )

    def library(content: bytes | None) -> None:
        if content is not None:
            (folder / "_C.so").write_bytes(content)

    return library


def test_unloadable_native_library_gets_the_schemas(fake_torchvision):
    fake_torchvision(b"not a shared library")
    compat = fresh_compat()
    assert compat.prepare_torchvision_ops() is True
    assert compat._TORCHVISION_LIB is not None
    assert compat.prepare_torchvision_ops() is True  # idempotent


def test_loadable_native_library_changes_nothing(fake_torchvision):
    libs = Path(torch.__file__).parent / "lib"
    loadable = next(libs.glob("libc10.*"))  # any library that loads: torch's own
    fake_torchvision(loadable.read_bytes())
    compat = fresh_compat()
    assert compat.prepare_torchvision_ops() is False
    assert compat._TORCHVISION_LIB is None


def test_build_without_native_ops_changes_nothing(fake_torchvision):
    fake_torchvision(None)
    compat = fresh_compat()
    assert compat.prepare_torchvision_ops() is False
    assert compat._TORCHVISION_LIB is None


def test_hook_runs_once_at_the_first_torchvision_import(monkeypatch):
    compat = fresh_compat()
    calls = []
    monkeypatch.setattr(compat, "prepare_torchvision_ops", lambda: calls.append(1))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    compat.install_import_hook()
    assert compat._HOOK in sys.meta_path
    assert compat._HOOK.find_spec("numpy") is None and calls == []
    assert compat._HOOK.find_spec("torchvision") is None  # the normal finders import it
    assert calls == [1] and compat._HOOK not in sys.meta_path
