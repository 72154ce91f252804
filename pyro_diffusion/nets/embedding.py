"""Sinusoidal embedding of the noise level the network is given."""

from __future__ import annotations

import math

import torch
from torch import nn


class NoiseLevelEmbedding(nn.Module):
    """Transformer-style sinusoidal features of the noise level, then a 2-layer MLP.

    The level γ (a float tensor ``(B,)``) is first mapped linearly from ``gamma_range`` onto
    [0, ``scale``] (values outside extrapolate), so that the sinusoids' periods span the
    levels a diffusion uses; returns ``(B, dim)``."""

    def __init__(
        self,
        dim: int,
        gamma_range: tuple[float, float] = (-15.0, 15.0),
        scale: float = 1000.0,
        max_period: float = 10_000.0,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim: expected an even embedding size >= 2, got {dim!r}")
        low, high = gamma_range
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"gamma_range: expected (low, high) with low < high, got {gamma_range!r}")
        self.gamma_range = (float(low), float(high))
        self.scale = float(scale)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        low, high = self.gamma_range
        position = self.scale * (gamma.to(self.freqs.dtype) - low) / (high - low)
        angles = position[:, None] * self.freqs[None, :]
        return self.mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1))
