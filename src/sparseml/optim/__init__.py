"""Optimizers: the M-FAC optimizer (dynamic inverse-Fisher preconditioning)."""

from sparseml.optim.mfac import MFAC

__all__ = ["MFAC"]
