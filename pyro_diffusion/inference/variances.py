r"""Per-level reverse variances estimated from the model itself (Analytic-DPM: Bao et al., 2022),
for the posterior samplers, on any grid of noise levels.

The reverse step from level γ_k down to γ_{k−1} of every :class:`~pyro_diffusion.diffusion.Diffusion`
has the mean of ``q(x_{k−1} | x_k, x_0)`` at ``x_0 = x̂_0(x_k)``, ``μ_θ = keep·x_k + take·x̂_0``.
The Gaussian with that mean closest in KL to the true reverse ``q(x_{k−1} | x_k)`` has covariance
``λ_k² I + take² E[(x_0 − x̂_0)(x_0 − x̂_0)ᵀ]`` (λ_k² = c σ_{k−1}² the "small" variance).  As
``x_0 − x̂_0 = −(σ_k/α_k)(ε − ε̂)``, its isotropic part is

.. math::

    v_k = λ_k^2 + \mathrm{take}^2\,\frac{σ_k^2}{α_k^2}\,(1 − Γ_k),
    \qquad Γ_k = \frac{\mathbb E\,\lVert\hat ε(x_k)\rVert^2}{D}

for the optimal ε̂ (``estimator="analytic"``, Analytic-DPM: E[ε̂ᵀε] = E‖ε̂‖², 1 − Γ_k clipped to
[0, 1], which keeps v_k between the "small" variance and ``λ_k² + take² σ_k²/α_k²``), or with the
residual ``E‖ε − ε̂‖²/D`` in place of ``1 − Γ_k`` (``estimator="residual"``: the optimal variance
for the network's mean whether or not ε̂ is optimal).  ``diagonal=True`` keeps one value per
coordinate instead of their mean.  At the first level the decoder's variance becomes
``(σ_1²/α_1²)(1 − Γ_1)``, the mean conditional variance of x_0 given x_1.

The expectations are over ``x_k = α_k x_0 + σ_k ε`` with x_0 from data, or from the model's own
unconditional samples (:func:`ancestral_sample`); only the network is called (no closed form of
the prior is used).  Cost: one batched network call per level for the M draws (M · K per-datum
evaluations), once per model and grid, shared by every observation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..diffusion import Diffusion
from ..parameterization import step_coefficients
from ..schedules import check_num_steps
from .prior import check_diffusion, frozen, inference_grid, relaxed

__all__ = ["ReverseVariances", "analytic_variances", "ancestral_sample", "ESTIMATORS", "check_variances"]

ESTIMATORS = ("analytic", "residual")


@dataclass
class ReverseVariances:
    """Per-level reverse variances on a grid: ``variances`` ``(K, *shape)`` (shape ``()`` or the
    event shape), entry 0 the decoder's at level 1 and entry k − 1 the step from level k to
    k − 1; ``grid`` ``(K,)`` float64; ``gamma_hat`` the estimated Γ_k (same shape as
    ``variances``; for ``"residual"`` it holds 1 − E(ε − ε̂)²); ``num_samples`` M, ``estimator``,
    and ``evaluations`` (M · K per-datum network evaluations spent)."""

    variances: torch.Tensor
    grid: torch.Tensor
    gamma_hat: torch.Tensor
    num_samples: int
    estimator: str
    evaluations: int

    @property
    def num_steps(self) -> int:
        return self.grid.shape[0]

    def scale(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """The reverse scale at level k (1-based; k = 1 the decoder) as a tensor like ``like``."""
        return self.variances[k - 1].sqrt().to(device=like.device, dtype=like.dtype).expand_as(like)


def check_variances(diffusion: Diffusion, reverse_variance, grid: torch.Tensor) -> ReverseVariances | None:
    """Refuse a ``reverse_variance`` that is neither None nor a :class:`ReverseVariances` on
    ``grid`` with the diffusion's event shape."""
    if reverse_variance is None:
        return None
    if not isinstance(reverse_variance, ReverseVariances):
        raise TypeError(
            "reverse_variance: expected None (the model's) or a ReverseVariances from analytic_variances, "
            f"got {type(reverse_variance).__name__}"
        )
    same = reverse_variance.grid.shape == grid.shape and torch.allclose(
        reverse_variance.grid.to(grid), grid, rtol=0, atol=1e-9
    )
    if not same:
        raise ValueError(
            f"reverse_variance: computed on a {reverse_variance.num_steps}-level grid, not the sampler's "
            f"{grid.shape[0]}-level grid (pass the same num_steps to analytic_variances)"
        )
    shape = tuple(reverse_variance.variances.shape[1:])
    if shape not in ((), tuple(diffusion.event_shape)):
        raise ValueError(
            f"reverse_variance: variances of shape {shape} per level, expected () or "
            f"{tuple(diffusion.event_shape)}"
        )
    return reverse_variance


@torch.no_grad()
def ancestral_sample(
    diffusion: Diffusion,
    num_samples: int,
    *,
    num_steps: int | None = None,
    reverse_variance: ReverseVariances | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``num_samples`` unconditional draws ``(n, *event_shape)`` of the K-step chain, with the
    model's reverse variances or those of ``reverse_variance`` (a discretized decoder is relaxed)."""
    check_diffusion(diffusion)
    n = check_num_steps(num_samples, "num_samples")
    grid = inference_grid(diffusion, num_steps)
    rv = check_variances(diffusion, reverse_variance, grid)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=diffusion.device).manual_seed(seed)
    dtype = torch.get_default_dtype()
    shape = (n, *diffusion.event_shape)
    x = torch.randn(shape, dtype=dtype, device=diffusion.device, generator=generator)
    K = grid.shape[0]
    with frozen(diffusion):
        for k in tqdm(range(K, 0, -1), desc="ancestral", disable=not progress, leave=False):
            if k > 1:
                step, _ = diffusion.reverse_step(x, grid[k - 2], grid[k - 1])
            else:
                step = relaxed(diffusion.decoder_distribution(x, grid[0]))
            scale = step.scale if rv is None else rv.scale(k, step.loc)
            noise = torch.randn(shape, dtype=dtype, device=diffusion.device, generator=generator)
            x = step.loc + scale * noise
    return x


def _interpolate(gamma_hat: torch.Tensor, at: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Γ ``(L, *shape)`` estimated at the levels ``at`` (L,), increasing, to every level of
    ``grid`` (K,): linear in γ on logit Γ (exact for Gaussian data, where logit Γ = γ − log s²
    per coordinate), extrapolated linearly beyond the ends; Γ clipped to [1e-12, 1 − 1e-12]."""
    tiny = 1e-12
    logit = torch.logit(gamma_hat.clamp(tiny, 1.0 - tiny))
    right = torch.searchsorted(at, grid).clamp(1, at.shape[0] - 1)
    left = right - 1
    t = ((grid - at[left]) / (at[right] - at[left])).reshape(-1, *([1] * (gamma_hat.dim() - 1)))
    return torch.sigmoid((1 - t) * logit[left] + t * logit[right])


@torch.no_grad()
def analytic_variances(
    diffusion: Diffusion,
    data: torch.Tensor | None = None,
    *,
    num_steps: int | None = None,
    num_samples: int = 1000,
    estimator: str = "analytic",
    diagonal: bool = False,
    num_levels: int | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> ReverseVariances:
    r"""Estimate the per-level reverse variances of the K-level grid (module docstring).

    Args:
        diffusion: any diffusion (its mean parameterization does not matter; its variance
            setting is replaced).
        data: draws of x_0 ``(M, *event_shape)`` (training data); None draws M =
            ``num_samples`` from the model's own K-step chain (:func:`ancestral_sample`, its
            own variances; M · K more evaluations).
        num_steps: the grid: None the model's own, K a K-level grid (``diffusion.grid(K)``);
            pass the same to the sampler.
        num_samples: M when ``data`` is None.
        estimator: ``"analytic"`` (1 − E‖ε̂‖²/D, clipped to [0, 1]) or ``"residual"``
            (E‖ε − ε̂‖²/D).
        diagonal: one variance per coordinate instead of their mean.
        num_levels: None (default: Γ_k estimated at every level, M · K evaluations) or L ≥ 2:
            Γ estimated at L levels of the grid evenly spaced in index (both ends included) and
            interpolated to the others, linearly in γ on logit Γ (exact for Gaussian data),
            M · L evaluations.
        seed: seed of the noise draws (None: torch's global generator).
        progress: a progress bar over the K levels.

    Returns:
        a :class:`ReverseVariances` for ``reverse_variance=`` of
        :func:`~pyro_diffusion.inference.smc.twisted_smc` and
        :func:`~pyro_diffusion.inference.mcgdiff.mcgdiff`.
    """
    check_diffusion(diffusion)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
    if not isinstance(diagonal, bool):
        raise ValueError(f"diagonal: expected a bool, got {diagonal!r}")
    grid = inference_grid(diffusion, num_steps)
    K = grid.shape[0]
    if num_levels is not None:
        num_levels = check_num_steps(num_levels, "num_levels", 2)
    levels = list(range(1, K + 1))
    if num_levels is not None and num_levels < K:
        levels = sorted({round(1 + i * (K - 1) / (num_levels - 1)) for i in range(num_levels)})
    evaluations = 0
    if data is None:
        M = check_num_steps(num_samples, "num_samples", 2)
        data = ancestral_sample(diffusion, M, num_steps=num_steps, seed=seed, progress=progress)
        evaluations += M * K
    else:
        if not isinstance(data, torch.Tensor) or tuple(data.shape[1:]) != tuple(diffusion.event_shape):
            raise ValueError(
                f"data: expected draws of shape (M, {', '.join(map(str, diffusion.event_shape))}), got "
                f"{tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__}"
            )
        if data.shape[0] < 2:
            raise ValueError(f"data: expected at least 2 draws, got {data.shape[0]}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=diffusion.device).manual_seed(seed + 1)
    dtype = torch.get_default_dtype()
    x0 = data.detach().to(device=diffusion.device, dtype=dtype)
    M = x0.shape[0]
    reduce = (0,) if diagonal else tuple(range(x0.dim()))
    gamma_hat = []
    with frozen(diffusion):
        for k in tqdm(levels, desc="analytic variances", disable=not progress, leave=False):
            gamma = grid[k - 1]
            eps = torch.randn(x0.shape, dtype=dtype, device=diffusion.device, generator=generator)
            z = diffusion.marginal(x0, gamma).loc + torch.sigmoid(gamma).sqrt().to(dtype) * eps
            below = grid[k - 2] if k > 1 else grid[0].new_tensor(-math.inf)
            prediction, _ = diffusion.predict(z.to(dtype), gamma, below)
            eps_hat = prediction.eps.to(torch.float64)
            if estimator == "analytic":
                g = eps_hat.pow(2).mean(reduce).clamp(0.0, 1.0)
            else:
                g = 1.0 - (eps.to(torch.float64) - eps_hat).pow(2).mean(reduce)
            gamma_hat.append(g)
    evaluations += M * len(levels)
    gamma_hat = torch.stack(gamma_hat)  # (L, *shape)
    if len(levels) < K:
        gamma_hat = _interpolate(
            gamma_hat, grid[[k - 1 for k in levels]].to(torch.float64), grid.to(torch.float64)
        )
    spread = (1.0 - gamma_hat).clamp(min=0.0)  # the conditional variance of ε given x_k, per coordinate
    variances = torch.empty_like(gamma_hat)
    # decoder: Var(x_0 | x_1) = (σ_1²/α_1²) (1 − Γ_1)
    variances[0] = torch.exp(grid[0]) * spread[0]
    for k in range(2, K + 1):
        coef = step_coefficients(grid[k - 2], grid[k - 1], grid[k - 1])
        variances[k - 1] = coef.log_small.exp() + coef.log_gap.exp() * spread[k - 1]
    tiny = torch.finfo(torch.float64).tiny
    return ReverseVariances(
        variances=variances.clamp(min=tiny).cpu(),
        grid=grid.cpu(),
        gamma_hat=gamma_hat.cpu(),
        num_samples=M,
        estimator=estimator,
        evaluations=evaluations,
    )
