"""A noise-level-conditioned residual MLP for vector data, or any data flattened."""

from __future__ import annotations

import math

import torch
from torch import nn

from .embedding import NoiseLevelEmbedding


class _Block(nn.Module):
    def __init__(self, width: int, embed_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear1 = nn.Linear(width, width)
        self.linear2 = nn.Linear(width, width)
        self.level = nn.Linear(embed_dim, width)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, h, embedding):
        out = self.linear1(self.act(self.norm(h))) + self.level(embedding)
        return h + self.linear2(self.dropout(self.act(out)))


def fourier_features(x: torch.Tensor, exponents: tuple[int, int]) -> torch.Tensor:
    """``[sin(2^n π x), cos(2^n π x)]`` for n = n_min … n_max, stacked on a new dim 1 (VDM's
    input features for the fine bits of the data: a network then resolves level spacings of
    2^−n without having to build the oscillation itself)."""
    n_min, n_max = exponents
    freqs = math.pi * 2.0 ** torch.arange(n_min, n_max + 1, dtype=x.dtype, device=x.device)
    angles = x.unsqueeze(1) * freqs.reshape(1, -1, *([1] * (x.dim() - 1)))
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class MLPDenoiser(nn.Module):
    """Residual MLP ``network(x, γ)`` for data of shape ``(B, *event_shape)``, flattened.

    Args:
        event_shape: D for vector data ``(B, D)``, or a shape such as ``(1, 8, 8)`` (the datum
            is flattened and the output reshaped back).
        hidden: width of the hidden layers.
        depth: number of residual blocks.
        learned_variance: output twice the entries along dim 1 (the mean part, then the
            variance interpolation) for ``variance="learned"``.
        gamma_range: the noise levels mapped onto the embedding's range (see
            :class:`NoiseLevelEmbedding`).
        dropout: dropout rate inside each residual block (0: none).
        fourier: None, or ``(n_min, n_max)``: the input also gets the Fourier features
            sin/cos(2^n π z) of every entry, n = n_min … n_max (:func:`fourier_features`).
    """

    def __init__(
        self,
        event_shape: int | tuple[int, ...],
        hidden: int = 128,
        depth: int = 3,
        learned_variance: bool = False,
        gamma_range: tuple[float, float] = (-15.0, 15.0),
        dropout: float = 0.0,
        fourier: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
        for name, value, low in (("hidden", hidden, 1), ("depth", depth, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"event_shape: expected a positive size or shape, got {event_shape!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {dropout!r}")
        if fourier is not None:
            if (
                not isinstance(fourier, (tuple, list))
                or len(fourier) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in fourier)
                or fourier[0] > fourier[1]
            ):
                raise ValueError(
                    f"fourier: expected None or integers (n_min, n_max) with n_min <= n_max, got {fourier!r}"
                )
            fourier = (int(fourier[0]), int(fourier[1]))
        self.fourier = fourier
        self.event_shape = shape
        self.dim = math.prod(shape)
        num_features = 1 if fourier is None else 1 + 2 * (fourier[1] - fourier[0] + 1)
        self.learned_variance = learned_variance
        embed_dim = max(16, (hidden // 2) * 2)
        self.embedding = NoiseLevelEmbedding(embed_dim, gamma_range)
        self.input = nn.Linear(self.dim * num_features, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, embed_dim, float(dropout)) for _ in range(depth))
        self.output = nn.Sequential(
            nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, self.dim * (2 if learned_variance else 1))
        )

    def forward(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding(gamma)
        flat = x.reshape(x.shape[0], -1)
        if self.fourier is not None:
            flat = torch.cat([flat, fourier_features(flat, self.fourier).reshape(x.shape[0], -1)], dim=1)
        h = self.input(flat)
        for block in self.blocks:
            h = block(h, embedding)
        out = self.output(h)
        if self.learned_variance:  # (B, 2, C, ...) → (B, 2C, ...): the mean block, then the variance's
            out = out.reshape(x.shape[0], 2, *self.event_shape)
            return out.reshape(x.shape[0], 2 * self.event_shape[0], *self.event_shape[1:])
        return out.reshape(x.shape)
