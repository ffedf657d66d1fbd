"""Errors the research scripts raise for bad command lines, data or checkpoints."""

from __future__ import annotations


class SetupError(RuntimeError):
    """Something needed before training (data, model, recipe, output) is missing or invalid.

    The scripts print the message without a traceback and exit with status 2.
    """


class CheckpointError(SetupError):
    """A checkpoint file cannot be read or does not match the run that loads it."""
