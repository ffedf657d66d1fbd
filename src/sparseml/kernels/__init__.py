"""Pure tensor math for the pruners: no nn.Module, no torch.distributed, no schedules.

Kernels never raise the user-facing recipe errors: a bad argument is the caller's bug
(``ValueError`` / ``TypeError``, ``RuntimeError`` for a misused builder), and callers validate
recipe values first. Bad numbers raise `sparseml.errors.NumericalError`.
"""
