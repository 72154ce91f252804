r"""What the network predicts, and the reverse step's variance, as functions of noise levels.

For a step from level γ_t down to γ_s (γ_s < γ_t) write ``c = −expm1(γ_s − γ_t)`` and
α, σ as in :func:`~pyro_diffusion.schedules.alpha_sigma`.  The forward posterior is

    q(z_s | z_t, x) = N(α_s (1 − c) z_t / α_t + α_s c x,  c σ_s² I),

and the reverse step p_θ(z_s | z_t) = N(μ̃(x̂_θ, z_t), σ²_θ I) plugs the network's estimate x̂_θ
of x into the posterior mean.  On a DDPM grid (s = t − 1) ``c σ_s² = β̃_t`` and ``c σ_t² = β_t``.

Means (:data:`MEANS`), the network's output ``o`` read as:
    ``"eps"``: ε̂ = o;  ``"x0"``: x̂ = o;  ``"v"``: v̂ = o with v = α ε − σ x (so x̂ = α z − σ v̂,
    ε̂ = σ z + α v̂);  ``"mu"``: o is the reverse mean μ itself (discrete steps only).

Variances (:data:`VARIANCES`), log σ²_θ as a function of (γ_s, γ_t):
    ``"small"``: log(c σ_s²) (the posterior's, β̃_t);  ``"large"``: log(c σ_t²) (the
    transition's, β_t);  ``"learned"``: u log(c σ_t²) + (1 − u) log(c σ_s²) with u = (o_v + 1)/2
    for the network's second output o_v (Improved DDPM).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

__all__ = [
    "MEANS",
    "VARIANCES",
    "Prediction",
    "alpha_sigma_log",
    "step_coefficients",
    "predict",
    "posterior_mean",
    "reverse_log_variance",
]

MEANS = ("eps", "x0", "v", "mu")
VARIANCES = ("small", "large", "learned")


class Prediction(NamedTuple):
    """The network's estimates at z: x̂ (of the data) and ε̂ (of the noise), z's shape."""

    x0: torch.Tensor
    eps: torch.Tensor


def broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-datum values ``(B,)`` (or a scalar) shaped to broadcast against ``(B, *event)``, in
    ``like``'s dtype; values with as many dimensions as ``like`` (a per-dimension schedule's
    levels, shaped by :meth:`~pyro_diffusion.diffusion.Diffusion.levels`) are used as they are."""
    values = values.to(like.dtype)
    if values.dim() == 0:
        return values
    return values.reshape(values.shape + (1,) * (like.dim() - values.dim()))


def alpha_sigma_log(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log α², log σ²) = (logsigmoid(−γ), logsigmoid(γ)), stable at both ends."""
    return F.logsigmoid(-gamma), F.logsigmoid(gamma)


class StepCoefficients(NamedTuple):
    """The posterior q(z_s | z_t, x) = N(keep·z_t + take·x, exp(log_small)) and the reverse
    variances of one step, each broadcastable against the data (float64 in, data dtype out)."""

    keep: torch.Tensor  # α_s (1 − c)/α_t
    take: torch.Tensor  # α_s c
    log_small: torch.Tensor  # log c σ_s²
    log_large: torch.Tensor  # log c σ_t²
    log_gap: torch.Tensor  # log((α_s c σ_t/α_t)²): mean gap (x − x̂) → (ε − ε̂), squared
    expm1_delta: torch.Tensor  # expm1(γ_t − γ_s) = SNR_s/SNR_t − 1


def step_coefficients(gamma_s: torch.Tensor, gamma_t: torch.Tensor, like: torch.Tensor) -> StepCoefficients:
    """The coefficients of a step from γ_t down to γ_s (float64 tensors of shape ``(B,)`` or
    scalars), computed in float64 and cast to ``like``'s dtype."""
    gamma_s, gamma_t = gamma_s.to(torch.float64), gamma_t.to(torch.float64)
    log_a2_s, log_s2_s = alpha_sigma_log(gamma_s)
    log_a2_t, log_s2_t = alpha_sigma_log(gamma_t)
    delta = gamma_t - gamma_s
    log_c = torch.log(-torch.expm1(-delta))
    keep = torch.exp(0.5 * (log_a2_s - log_a2_t) - delta)  # α_s (1 − c)/α_t with 1 − c = e^{−Δ}
    take = torch.exp(0.5 * log_a2_s + log_c)
    values = (
        keep,
        take,
        log_c + log_s2_s,
        log_c + log_s2_t,
        log_a2_s + 2 * log_c + log_s2_t - log_a2_t,
        torch.expm1(delta),
    )
    return StepCoefficients(*(broadcast(v, like) for v in values))


def predict(mean: str, output: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor) -> Prediction:
    """(x̂, ε̂) at ``z`` (level ``gamma`` ``(B,)`` float64) from the network's mean output under
    ``mean`` ∈ {"eps", "x0", "v"} (``"mu"`` needs the step: :func:`predict_from_mean`)."""
    log_a2, log_s2 = alpha_sigma_log(gamma.to(torch.float64))
    alpha, sigma = broadcast(torch.exp(0.5 * log_a2), z), broadcast(torch.exp(0.5 * log_s2), z)
    if mean == "eps":
        return Prediction((z - sigma * output) / alpha, output)
    if mean == "x0":
        return Prediction(output, (z - alpha * output) / sigma)
    if mean == "v":
        return Prediction(alpha * z - sigma * output, sigma * z + alpha * output)
    if mean == "mu":
        raise ValueError("mean: 'mu' is defined per step; use predict_from_mean with the step's levels")
    raise ValueError(f"mean: expected one of {MEANS}, got {mean!r}")


def predict_from_mean(
    output: torch.Tensor, z_t: torch.Tensor, gamma_s: torch.Tensor, gamma_t: torch.Tensor
) -> Prediction:
    """(x̂, ε̂) implied by a predicted reverse mean μ = keep·z_t + take·x̂ (``mean="mu"``)."""
    coef = step_coefficients(gamma_s, gamma_t, z_t)
    x0 = (output - coef.keep * z_t) / coef.take
    log_a2, log_s2 = alpha_sigma_log(gamma_t.to(torch.float64))
    alpha, sigma = broadcast(torch.exp(0.5 * log_a2), z_t), broadcast(torch.exp(0.5 * log_s2), z_t)
    return Prediction(x0, (z_t - alpha * x0) / sigma)


def posterior_mean(coef: StepCoefficients, x0: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """μ̃(x, z_t) = keep·z_t + take·x, the mean of q(z_s | z_t, x)."""
    return coef.keep * z_t + coef.take * x0


def reverse_log_variance(
    variance: str, coef: StepCoefficients, variance_output: torch.Tensor | None = None
) -> torch.Tensor:
    """log σ²_θ of the reverse step under ``variance``, broadcastable against the data."""
    if variance == "small":
        return coef.log_small
    if variance == "large":
        return coef.log_large
    if variance == "learned":
        if variance_output is None:
            raise ValueError("variance='learned' needs the network's variance output")
        fraction = (variance_output + 1) / 2
        return fraction * coef.log_large + (1 - fraction) * coef.log_small
    raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
