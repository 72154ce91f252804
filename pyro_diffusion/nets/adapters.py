"""Adapters between the network calling convention ``network(z, γ)`` and other networks."""

from __future__ import annotations

import torch
from torch import nn

from ..schedules import NoiseSchedule


class StepIndexed(nn.Module):
    """A network written for DDPM's integer steps, ``network(x_t, t)`` with 1-based t, called
    with noise levels: γ is mapped to its (fractional) step on ``schedule``'s grid by linear
    interpolation, so levels on the grid give exactly t = 1..T (a float tensor; networks that
    index tables by t need levels on the grid, e.g. the model's own or a respaced sub-grid).

    Args:
        network: ``network(x, t)``.
        schedule: the :class:`~pyro_diffusion.schedules.NoiseSchedule` whose steps t counts.
        long: pass t as a LongTensor (rounded) instead of floats.
    """

    def __init__(self, network: nn.Module, schedule: NoiseSchedule, long: bool = False) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network: expected an nn.Module, got {type(network).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
        self.network = network
        self.register_buffer("gammas", schedule.gammas.clone(), persistent=False)
        self.long = long

    def steps(self, gamma: torch.Tensor) -> torch.Tensor:
        """The fractional 1-based step of each level (clamped to [1, T])."""
        grid = self.gammas
        g = gamma.to(grid.dtype).clamp(grid[0], grid[-1])
        upper = torch.searchsorted(grid, g).clamp(1, grid.shape[0] - 1) if grid.shape[0] > 1 else None
        if upper is None:
            return torch.ones_like(g)
        lower = upper - 1
        fraction = (g - grid[lower]) / (grid[upper] - grid[lower])
        return lower.to(grid.dtype) + 1 + fraction

    def forward(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        t = self.steps(gamma)
        t = torch.round(t).long() if self.long else t.to(x.dtype)
        return self.network(x, t)
