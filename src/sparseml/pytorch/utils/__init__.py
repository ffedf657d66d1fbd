"""``sparseml.pytorch.utils``: sparsity measurement, checkpoints, gradient sampling."""

from sparseml.checkpoints import load_epoch, load_model, load_optimizer, save_model
from sparseml.grad_sampler import GradSampler
from sparseml.params import all_param_refs, is_prunable
from sparseml.sparsity import ModuleSparsificationInfo, tensor_sparsity


def get_prunable_layers(module):
    """``(name, layer)`` pairs of the Linear and Conv layers of ``module``."""
    return [(r.name.rsplit(".", 1)[0], r.module) for r in all_param_refs(module) if is_prunable(r)]


__all__ = [
    "GradSampler",
    "ModuleSparsificationInfo",
    "get_prunable_layers",
    "load_epoch",
    "load_model",
    "load_optimizer",
    "save_model",
    "tensor_sparsity",
]
