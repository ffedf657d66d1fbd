"""Exception types shared by the whole package.

Every error raised for bad user input names what was wrong and what is allowed, so a user can
fix a recipe or a command line without reading the source.
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

    ``sparseml.serialization`` raises it; the research scripts' own checkpoint errors derive
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
