"""Make ``import torchvision`` (hence ``import timm``) work next to a CPU build of torch.

The torchvision wheel that pip pairs with the CPU build of torch here is a CUDA build: its native
ops library cannot load, so ``import torchvision`` stops with "operator torchvision::nms does not
exist" while registering fake kernels for ops it never got. Defining the two op schemas it
registers first lets the pure-Python part of torchvision (the transforms and datasets timm uses)
import; the detection ops themselves stay unusable, which classification code never needs.

``import sparseml`` calls :func:`install_import_hook`: the first ``import torchvision`` after it
(``import timm`` does one) first tries to load torchvision's native library itself and defines
the schemas only when that fails. So a user's script can ``import sparseml`` and then ``import
timm`` with nothing else, while ``import sparseml`` itself stays light (no torch import: the
scripts answer ``--help`` before torch loads). Where torchvision loads normally, or is not
installed, nothing is changed. :func:`ensure_torchvision` does the same eagerly (the research
scripts call it before importing timm). This module never imports timm.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path
from typing import Any

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Kept at module level: a torch.library.Library deregisters its definitions when collected.
_TORCHVISION_LIB: Any = None


def _define_schemas() -> None:
    global _TORCHVISION_LIB
    import torch

    # FRAGMENT: another copy of this shim (or of the research one) may have defined them first.
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        with contextlib.suppress(RuntimeError):  # already defined by another shim
            lib.define(schema)
    _TORCHVISION_LIB = lib


def _forget_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def _is_missing_op_error(err: BaseException) -> bool:
    text = str(err)
    return "torchvision::" in text and "does not exist" in text


def ensure_torchvision() -> bool:
    """Import torchvision now, defining the missing op schemas if that is what stops it; return
    True if they had to be defined (here or by the import hook).

    Safe to call any number of times. Any other import failure of torchvision is raised as is.
    """
    if _TORCHVISION_LIB is not None:
        return True
    if (
        "torchvision" not in sys.modules
        and importlib.machinery.PathFinder.find_spec("torchvision") is None
    ):
        return False
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if not _is_missing_op_error(err):
            raise
        _forget_torchvision()
    else:
        return _TORCHVISION_LIB is not None  # the import hook may have repaired it
    _define_schemas()
    import torchvision  # noqa: F401, F811

    return True


def _native_library(spec: importlib.machinery.ModuleSpec) -> Path | None:
    for folder in spec.submodule_search_locations or ():
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = Path(folder) / f"_C{suffix}"
            if path.is_file():
                return path
    return None


def prepare_torchvision_ops() -> bool:
    """Before torchvision is imported: load its native ops library as torchvision would; if it
    cannot load, define the op schemas torchvision needs. Return True if they were defined."""
    if _TORCHVISION_LIB is not None or "torchvision" in sys.modules:
        return _TORCHVISION_LIB is not None
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    library = None if spec is None else _native_library(spec)
    if library is None:  # not installed, or a build without native ops: nothing to repair
        return False
    import torch

    try:
        torch.ops.load_library(str(library))
    except Exception:  # noqa: BLE001 - any failure to load means the ops will be missing
        _define_schemas()
        return True
    return False


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    """Runs :func:`prepare_torchvision_ops` at the first ``import torchvision``, then leaves."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision":
            uninstall_import_hook()
            prepare_torchvision_ops()
        return None  # the normal finders import it


_HOOK = _TorchvisionHook()


def install_import_hook() -> None:
    """Prepare torchvision's ops lazily, at its first import (see the module docstring).

    Not on Windows, where torchvision sets up DLL folders before loading its library: a load
    attempted earlier could fail where torchvision's own succeeds.
    """
    if os.name == "nt" or "torchvision" in sys.modules or _HOOK in sys.meta_path:
        return
    sys.meta_path.insert(0, _HOOK)


def uninstall_import_hook() -> None:
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(_HOOK)
