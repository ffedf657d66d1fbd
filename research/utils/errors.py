"""Errors the research scripts raise for bad command lines, data or checkpoints."""

from __future__ import annotations

from sparseml import errors as _sparseml_errors


class SetupError(RuntimeError):
    """Something needed before training (data, model, recipe, output) is missing or invalid.

    The scripts print the message without a traceback and exit with status 2.
    """


class CheckpointError(SetupError, _sparseml_errors.CheckpointError):
    """A checkpoint file cannot be read or does not match the run that loads it.

    One concept with ``sparseml.errors.CheckpointError`` (``except`` either catches it); as a
    :class:`SetupError` the scripts report it in one line with exit status 2.
    """
