"""The decoder p_θ(x_0 | x_1): its choices, and the discretized Gaussian for K-level data.

:data:`DECODERS` names where the decoder is centred and how wide it is (see
:class:`~pyro_diffusion.diffusion.Diffusion`): ``"plain"`` (z_1/α_1, scale σ_1/α_1, VDM's),
``"network"`` (the network's x̂, scale σ_1/α_1 · e^s with s learned) and ``"ddpm"`` (x̂, DDPM's
clipped variance β̃_2).  Its family is Gaussian, or for K-level data discretized.

The discretized decoder (DDPM) is for data taking K evenly spaced levels in
[−1, 1]: the probability of level ``x`` is the Gaussian mass of the bin
``[x − 1/(K−1), x + 1/(K−1)]``, with the bins at ±1 opened to ±∞.  Its ``log_prob`` is a
log-probability mass, so −ELBO/(D ln 2) is a true code length in bits per dimension.

:class:`LevelWeightedGaussian` multiplies those bin masses by learned per-dimension level
logits and renormalizes over the K levels: a decoder that can learn which levels the data use
(the digits stored as 8-bit data take 17 of 256 levels) and how often each dimension takes each
one.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions import constraints

__all__ = ["DiscretizedGaussian", "LevelWeightedGaussian", "DECODERS"]

DECODERS = ("plain", "network", "ddpm")


def _log_ndtr(x: torch.Tensor) -> torch.Tensor:
    return torch.special.log_ndtr(x)


class DiscretizedGaussian(dist.TorchDistribution):
    r"""Gaussian mass on K evenly spaced levels in [−1, 1], edge bins open to ±∞.

    ``log_prob(x) = log(Φ((x + h − μ)/σ) − Φ((x − h − μ)/σ))`` with ``h = 1/(K−1)``; at
    ``x = −1`` the lower limit is −∞ and at ``x = +1`` the upper limit is +∞.  Computed from
    ``log Φ`` at both tails for stability.  Samples are Gaussian draws rounded to the nearest
    level and clamped to [−1, 1].

    Args:
        loc: μ, any shape.
        scale: σ > 0, broadcastable with ``loc``.
        num_levels: K ≥ 2.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.interval(-1.0, 1.0)
    has_rsample = False

    def __init__(self, loc, scale, num_levels: int, validate_args=None):
        if not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"num_levels: expected an integer K >= 2, got {num_levels!r}")
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        self.num_levels = num_levels
        super().__init__(self.loc.shape, validate_args=validate_args)

    @property
    def half_width(self) -> float:
        return 1.0 / (self.num_levels - 1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return DiscretizedGaussian(
            self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.num_levels
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        h = self.half_width
        centered = value - self.loc
        upper = (centered + h) / self.scale
        lower = (centered - h) / self.scale
        log_cdf_upper = _log_ndtr(upper)  # log Φ(u)
        log_sf_lower = _log_ndtr(-lower)  # log (1 − Φ(l))
        # interior bin: log(Φ(u) − Φ(l)), factored on the tail the bin lies in
        right_tail = lower > 0
        base = torch.where(right_tail, log_sf_lower, log_cdf_upper)
        log_ratio = torch.where(
            right_tail, _log_ndtr(-upper) - log_sf_lower, _log_ndtr(lower) - log_cdf_upper
        )
        one_minus_ratio = -torch.expm1(log_ratio)
        tiny = torch.finfo(value.dtype).tiny
        interior = base + torch.log(one_minus_ratio.clamp(min=tiny))
        # a bin narrow against σ: the difference of CDFs loses precision, density × width does not
        z = centered / self.scale
        narrow = -0.5 * z * z - torch.log(self.scale) - 0.5 * math.log(2 * math.pi) + math.log(2 * h)
        interior = torch.where(one_minus_ratio < 1e-4, narrow, interior)
        return torch.where(value < -1 + h, log_cdf_upper, torch.where(value > 1 - h, log_sf_lower, interior))

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            draw = self.loc.expand(shape) + self.scale.expand(shape) * torch.randn(
                shape, dtype=self.loc.dtype, device=self.loc.device
            )
            levels = self.num_levels - 1
            return torch.round((draw.clamp(-1, 1) + 1) / 2 * levels) / levels * 2 - 1

    def mean_level(self) -> torch.Tensor:
        """The level nearest the mean, a noiseless decoding."""
        levels = self.num_levels - 1
        return torch.round((self.loc.clamp(-1, 1) + 1) / 2 * levels) / levels * 2 - 1


class LevelWeightedGaussian(DiscretizedGaussian):
    r"""A categorical on the K levels with Gaussian-shaped, learned-reweighted logits.

    ``log p(k) = log_softmax_k (b_k − (x_k − μ)² / (2σ²))`` for the levels x_k of [−1, 1]
    and learned logits ``b`` (one row of K per dimension).  With ``b = 0`` it is the
    Gaussian's density at the levels, renormalized over them (VDM's decoder, which is the
    discretized Gaussian up to O((h/σ)²) when the bins are narrow against σ); ``b`` lets it
    learn which levels the data take and how often.  A proper distribution on the K levels
    whatever ``b`` is; it costs K logits per dimension, no normal CDFs.

    Args:
        loc, scale: as for :class:`DiscretizedGaussian`.
        num_levels: K ≥ 2.
        level_logits: ``b``, shape broadcastable to ``loc.shape + (K,)``.
    """

    def __init__(self, loc, scale, num_levels: int, level_logits: torch.Tensor, validate_args=None):
        super().__init__(loc, scale, num_levels, validate_args=validate_args)
        if level_logits.shape[-1] != num_levels:
            raise ValueError(
                f"level_logits: expected a last dimension of num_levels = {num_levels}, "
                f"got shape {tuple(level_logits.shape)}"
            )
        self.level_logits = level_logits

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return LevelWeightedGaussian(
            self.loc.expand(batch_shape),
            self.scale.expand(batch_shape),
            self.num_levels,
            self.level_logits.expand(batch_shape + (self.num_levels,)),
        )

    def _joint(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # b_k − (x_k − μ)²/(2σ²) up to a constant in k: b_k + w μ x_k − ½ w x_k², w = 1/σ²,
        # as one (…, 2) × (2, K) product; float64, since w μ x_k is large when σ is small
        loc = self.loc.to(torch.float64)
        w = self.scale.to(torch.float64).pow(-2)
        levels = torch.linspace(-1.0, 1.0, self.num_levels, dtype=torch.float64, device=loc.device)
        coefficients = torch.stack([w * loc, -0.5 * w], dim=-1)
        joint = coefficients @ torch.stack([levels, levels * levels]) + self.level_logits.to(torch.float64)
        return joint, w, loc

    def level_log_probs(self) -> torch.Tensor:
        """``log p(k)`` for every level, shape ``batch_shape + (K,)`` (float64)."""
        return torch.log_softmax(self._joint()[0], dim=-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        joint, w, loc = self._joint()
        index = torch.round((value.clamp(-1, 1) + 1) / 2 * (self.num_levels - 1)).long()
        index = index.expand(joint.shape[:-1])
        chosen = joint.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return (chosen - torch.logsumexp(joint, dim=-1)).to(self.loc.dtype)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            draw = dist.Categorical(logits=self.level_log_probs()).sample(sample_shape)
            return draw.to(self.loc.dtype) / (self.num_levels - 1) * 2 - 1

    def mean_level(self) -> torch.Tensor:
        """The most probable level, a noiseless decoding."""
        return self.level_log_probs().argmax(-1).to(self.loc.dtype) / (self.num_levels - 1) * 2 - 1
