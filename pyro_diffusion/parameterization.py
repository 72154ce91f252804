"""Mean and variance parameterizations of the reverse step p_θ(x_{t-1} | x_t).

Small functions of ``(schedule, x_t, t, network output)``; DESIGN.md §1 and §6.

Means:
    ``"eps"``: μ_θ = (x_t − β_t/√(1−ᾱ_t) · ε_θ) / √α_t
    ``"x0"``:  μ_θ = μ̃_t(x̂_0, x_t)
    ``"mu"``:  μ_θ is the network output itself

Variances (log σ_t²):
    ``"small"``: log β̃_t, ``"large"``: log β_t, both with step 1 replaced by log β̃_2;
    ``"learned"``: v log β_t + (1 − v) log β̃_t (clipped), v = (o + 1)/2 for the
    network's second output o (Improved DDPM).
"""

from __future__ import annotations

import torch

from .schedule import NoiseSchedule

MEANS = ("eps", "x0", "mu")
VARIANCES = ("small", "large", "learned")

__all__ = [
    "MEANS",
    "VARIANCES",
    "split_output",
    "predict_x0_from_eps",
    "predict_eps_from_x0",
    "posterior_mean",
    "model_mean",
    "predict_eps",
    "model_log_variance",
]


def split_output(output: torch.Tensor, variance: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split the network output into (mean part, variance part) along dim 1 when learned."""
    if variance != "learned":
        return output, None
    mean_part, var_part = output.chunk(2, dim=1)
    return mean_part, var_part


def predict_x0_from_eps(schedule: NoiseSchedule, x_t, t, eps):
    """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t."""
    return (x_t - schedule.at("sqrt_one_minus_alphas_cumprod", t, x_t) * eps) / schedule.at(
        "sqrt_alphas_cumprod", t, x_t
    )


def predict_eps_from_x0(schedule: NoiseSchedule, x_t, t, x0):
    """ε̂ = (x_t − √ᾱ_t x̂_0) / √(1−ᾱ_t)."""
    return (x_t - schedule.at("sqrt_alphas_cumprod", t, x_t) * x0) / schedule.at(
        "sqrt_one_minus_alphas_cumprod", t, x_t
    )


def posterior_mean(schedule: NoiseSchedule, x0, x_t, t):
    """μ̃_t(x_0, x_t), the mean of q(x_{t-1} | x_t, x_0)."""
    return (
        schedule.at("posterior_mean_coef_x0", t, x_t) * x0
        + schedule.at("posterior_mean_coef_xt", t, x_t) * x_t
    )


def model_mean(schedule: NoiseSchedule, mean: str, x_t, t, mean_output):
    """μ_θ(x_t, t) from the network's mean output under parameterization ``mean``."""
    if mean == "eps":
        coef = schedule.at("betas", t, x_t) / schedule.at("sqrt_one_minus_alphas_cumprod", t, x_t)
        return (x_t - coef * mean_output) / schedule.at("alphas", t, x_t).sqrt()
    if mean == "x0":
        return posterior_mean(schedule, mean_output, x_t, t)
    if mean == "mu":
        return mean_output
    raise ValueError(f"mean: expected one of {MEANS}, got {mean!r}")


def predict_eps(schedule: NoiseSchedule, mean: str, x_t, t, mean_output):
    """ε̂_θ(x_t, t) implied by the network's mean output (for L_simple under any mean)."""
    if mean == "eps":
        return mean_output
    if mean == "x0":
        return predict_eps_from_x0(schedule, x_t, t, mean_output)
    if mean == "mu":
        # invert μ = (x_t − β_t/√(1−ᾱ_t) ε) / √α_t
        coef = schedule.at("betas", t, x_t) / schedule.at("sqrt_one_minus_alphas_cumprod", t, x_t)
        return (x_t - schedule.at("alphas", t, x_t).sqrt() * mean_output) / coef
    raise ValueError(f"mean: expected one of {MEANS}, got {mean!r}")


def model_log_variance(schedule: NoiseSchedule, variance: str, t, like, variance_output=None):
    """log σ_t², broadcastable against ``like`` (shape ``(B, *event)``)."""
    if variance == "small":
        return schedule.at("posterior_log_variance_clipped", t, like)
    if variance == "large":
        log_betas = schedule.at("log_betas", t, like)
        clipped = schedule.at("posterior_log_variance_clipped", t, like)
        return torch.where(t.reshape(log_betas.shape) == 1, clipped, log_betas)
    if variance == "learned":
        if variance_output is None:
            raise ValueError("variance='learned' needs the network's variance output")
        fraction = (variance_output + 1) / 2
        return fraction * schedule.at("log_betas", t, like) + (1 - fraction) * schedule.at(
            "posterior_log_variance_clipped", t, like
        )
    raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
