"""A tiny regression model and an infinite gradient-sample source shared by pruner tests."""

import torch
import torch.nn.functional as F
from torch import nn


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))


def builder(counter=None):
    """``data_loader_builder``: endless batches of a fixed quadratic regression task."""

    def build(**kwargs):
        gen = torch.Generator().manual_seed(0)
        while True:
            if counter is not None:
                counter.append(1)
            x = torch.randn(16, 8, generator=gen)
            yield [x], {}, x[:, :4] * x[:, 4:] + 0.1 * torch.randn(16, 4, generator=gen)

    return build


def sampler(counter=None) -> dict:
    return {"data_loader_builder": builder(counter), "loss_fn": F.mse_loss}


def weights_of(model) -> list[torch.Tensor]:
    return [model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)]
