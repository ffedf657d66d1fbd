"""Exception types shared by the whole package, and which code raises which.

Errors by origin (the research scripts map them to exit codes in ``utils.faults.describe``):

- User input (recipe text and fields, a recipe's patterns matched against the model, CLI
  options, files) raises a `SparsificationError` subclass such as `RecipeError`: one line, exit
  status 2. It names what was wrong and what is allowed, so a user can fix a recipe or a command
  line without reading the source.
- Kernels and internal code (``sparseml.kernels``, ``sparseml.curvature``, ``sparseml.layouts``,
  argument checks of helpers) raise ``ValueError`` / ``TypeError`` / ``RuntimeError``: a bad
  argument there is a bug of the caller, reported with a traceback and exit status 1. Where such
  a check is the only guard on a user value, the user-input boundary (a parser of recipe text,
  a field validation) raises the user error instead.
- `NumericalError`: the data or the settings led to NaN/Inf or a matrix that is not positive
  definite; one line, exit status 1 (``describe`` checks it before `SparsificationError`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SparsificationError(Exception):
    """Base class of every error this package raises on purpose."""


class RecipeError(SparsificationError, ValueError):
    """A recipe (or a modifier field in it) is malformed or holds a value that is not allowed."""


class NumericalError(SparsificationError, RuntimeError):
    """A computation met NaN/Inf values or a matrix that is not positive definite."""


class CheckpointError(SparsificationError, RuntimeError):
    """A checkpoint file is missing, corrupt or does not match the model.

    ``sparseml.checkpoints`` raises it; the research scripts' own checkpoint errors derive
    from it (``utils.errors.CheckpointError``), so there is one concept to catch.
    """


class GradSamplerError(SparsificationError, RuntimeError):
    """A second-order pruner could not draw the gradient samples it needs."""


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean: a, b?)"`` for the names closest to ``name``, or ``""``."""
    found = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(found)}?)" if found else ""


class CompressedFileError(CheckpointError, ValueError):
    """A compressed sparse checkpoint is truncated, corrupt, of another format version, or its
    entries do not fit together (``sparseml.compressed``); the message names the file."""
