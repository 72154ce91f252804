"""A small noise-level-conditioned U-Net for images ``(B, C, H, W)`` (H and W divisible by
2**(levels − 1))."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .embedding import NoiseLevelEmbedding


def _norm(channels: int) -> nn.GroupNorm:
    groups = 8 if channels % 8 == 0 else 1
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Two 3×3 convolutions with GroupNorm and SiLU, the noise-level embedding added in between."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.step = nn.Linear(embed_dim, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, embedding):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.step(F.silu(embedding))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNetDenoiser(nn.Module):
    """A small U-Net ``network(x, γ)`` for images.

    Args:
        channels: C of the data.
        base: channels at the first level.
        multipliers: channel multiplier per resolution level (each level after the first
            halves H and W).
        dropout: dropout inside the residual blocks.
        learned_variance: output ``2·C`` channels for ``variance="learned"``.
        gamma_range: the noise levels mapped onto the embedding's range.
    """

    def __init__(
        self,
        channels: int = 1,
        base: int = 32,
        multipliers: tuple[int, ...] = (1, 2),
        dropout: float = 0.0,
        learned_variance: bool = False,
        gamma_range: tuple[float, float] = (-15.0, 15.0),
    ) -> None:
        super().__init__()
        if not multipliers or any(
            isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in multipliers
        ):
            raise ValueError(
                f"multipliers: expected a non-empty tuple of positive integers, got {multipliers!r}"
            )
        if channels < 1 or base < 1:
            raise ValueError(
                f"channels, base, multipliers: expected positive sizes, got {channels}, {base}, {multipliers}"
            )
        self.channels = channels
        self.learned_variance = learned_variance
        embed_dim = base * 4
        self.embedding = NoiseLevelEmbedding(embed_dim, gamma_range)
        self.input = nn.Conv2d(channels, base, 3, padding=1)
        widths = [base * m for m in multipliers]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        previous = base
        for i, width in enumerate(widths):
            self.down.append(ResBlock(previous, width, embed_dim, dropout))
            self.downsample.append(
                nn.Conv2d(width, width, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity()
            )
            previous = width
        self.middle = nn.ModuleList(
            [
                ResBlock(previous, previous, embed_dim, dropout),
                ResBlock(previous, previous, embed_dim, dropout),
            ]
        )
        self.up = nn.ModuleList()
        for width in reversed(widths):
            self.up.append(ResBlock(previous + width, width, embed_dim, dropout))
            previous = width
        self.output = nn.Sequential(
            _norm(previous),
            nn.SiLU(),
            nn.Conv2d(previous, channels * (2 if learned_variance else 1), 3, padding=1),
        )
        self.levels = len(widths)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (self.levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"x: height and width must be divisible by {factor}, got {tuple(x.shape[-2:])}")
        embedding = self.embedding(gamma)
        h = self.input(x)
        skips = []
        for block, down in zip(self.down, self.downsample):
            h = block(h, embedding)
            skips.append(h)
            h = down(h)
        for block in self.middle:
            h = block(h, embedding)
        for block in self.up:
            skip = skips.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), embedding)
        return self.output(h)
