"""A time-conditioned MLP denoiser for vector data ``(B, D)``."""

from __future__ import annotations

import torch
from torch import nn

from .embedding import StepEmbedding


class _Block(nn.Module):
    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear1 = nn.Linear(width, width)
        self.linear2 = nn.Linear(width, width)
        self.step = nn.Linear(embed_dim, width)
        self.act = nn.SiLU()

    def forward(self, h, embedding):
        out = self.linear1(self.act(self.norm(h))) + self.step(embedding)
        return h + self.linear2(self.act(out))


class MLPDenoiser(nn.Module):
    """Residual MLP ``denoiser(x_t, t)`` for data of shape ``(B, dim)``.

    Args:
        dim: D, the data dimension.
        hidden: width of the hidden layers.
        depth: number of residual blocks.
        learned_variance: output ``2·dim`` values (mean part, then variance interpolation)
            for ``GaussianDiffusion(variance="learned")``.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, learned_variance: bool = False) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 0:
            raise ValueError(f"dim, hidden, depth: expected positive sizes, got {dim}, {hidden}, {depth}")
        self.dim = dim
        self.learned_variance = learned_variance
        embed_dim = max(16, (hidden // 2) * 2)
        self.embedding = StepEmbedding(embed_dim)
        self.input = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, embed_dim) for _ in range(depth))
        self.output = nn.Sequential(
            nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim * (2 if learned_variance else 1))
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding(t)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, embedding)
        return self.output(h)
