"""Sinusoidal embedding of the (1-based) diffusion step."""

from __future__ import annotations

import math

import torch
from torch import nn


class StepEmbedding(nn.Module):
    """Transformer-style sinusoidal features of t, then a 2-layer MLP.

    Accepts a LongTensor of 1-based steps (or a float tensor, e.g. continuous time scaled by
    the caller) of shape ``(B,)``; returns ``(B, dim)``."""

    def __init__(self, dim: int, max_period: float = 10_000.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim: expected an even embedding size >= 2, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        return self.mlp(features)
