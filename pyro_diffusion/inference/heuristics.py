r"""The common heuristics for inverse problems with a diffusion prior, as baselines.

Neither targets p_θ(x_0 | y) exactly; they are what most inverse-problem toolkits ship, and
:mod:`pyro_diffusion.inference.smc` / :mod:`~pyro_diffusion.inference.nuts` are validated
against them (``docs/prior.md``).

Both run on a grid of K noise levels of any :class:`~pyro_diffusion.diffusion.Diffusion` (the
model's own, or a sub-grid: ``num_steps``) with its reverse steps
``diffusion.reverse_step(x_k, γ_{k−1}, γ_k)``; at the last level the decoder's mean is taken.

* :func:`replacement_sample` — for masks (inpainting) and any A: run the reverse chain and after each
  step overwrite the observed entries of x_{k-1} by a forward-noised copy of the data,
  ``α_{k-1} y + σ_{k-1} ε`` with α² = sigmoid(−γ), σ² = sigmoid(γ) (Song et al. 2021's
  "replacement"; at k − 1 = 0 the observed entries become y itself).  For any other A the
  same is done in the SVD basis of A, x̄ = V_h x, with ȳ = (Uᵀ y)_{:r} / s in place of y.
* :func:`dps_sample` — diffusion posterior sampling (Chung et al., 2023): an ancestral step
  followed by a gradient step on the data fit of the denoised estimate,

  .. math::

      x_{k-1} = μ_θ(x_k) + s_k z − ζ_k ∇_{x_k} \lVert y − A\,\hat x_0(x_k) \rVert_2^2,
      \qquad ζ_k = ζ / \lVert y − A\,\hat x_0(x_k) \rVert_2 ,

  the paper's step ``ζ_k ∇‖r‖²`` (Algorithm 1), which with ζ_k = ζ/‖r‖ equals
  ``2ζ ∇‖r‖`` (one network call with gradient per level).  ζ needs tuning per problem, and
  a fixed ζ acts K times; ``step_per_level=λ`` sets ζ_k = λ (γ_k − γ_{k−1}) instead, a step per
  unit of noise level whose effect does not depend on the grid.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..diffusion import Diffusion
from ..parameterization import alpha_sigma_log
from .observations import LinearObservation, check_conditioning
from .prior import frozen, inference_grid
from .result import PosteriorResult

__all__ = ["replacement_sample", "dps_sample"]


def _check(diffusion, observation, y, num_samples):
    check_conditioning(diffusion, observation, y)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")


def _network_calls(diffusion: Diffusion, K: int, gradient_at_x1: bool) -> int:
    # a reverse step per level above the first, and the network at x_1 when the decoder
    # (or DPS's gradient step) needs it
    return K - 1 + int(gradient_at_x1 or diffusion.decoder_uses_network)


@torch.no_grad()
def replacement_sample(
    diffusion: Diffusion,
    observation: LinearObservation,
    y: torch.Tensor,
    num_samples: int,
    *,
    num_steps: int | None = None,
    progress: bool = False,
) -> PosteriorResult:
    """Replacement: ``num_samples`` draws given ``y`` (shape ``(m,)`` or ``(n, m)`` for a mask)
    on the grid ``num_steps`` (None: the model's own).  For a mask the observed entries are
    replaced; for any other A the observed coordinates of its SVD basis (``x̄ = V_h x``, where
    ``ȳ = (Uᵀ y)_{:r} / s``; one ``y`` of shape ``(m,)``).  The observation noise is ignored
    (y is pasted in as if exact), as the heuristic does.  Returns a :class:`~pyro_diffusion.inference.result.PosteriorResult` (unweighted
    ``draws`` ``(num_samples, *event_shape)``)."""
    _check(diffusion, observation, y, num_samples)
    grid = inference_grid(diffusion, num_steps)
    K = grid.shape[0]
    start = time.perf_counter()
    device = diffusion.device
    y = y.to(device)
    if observation.observed_index is not None:
        m = observation.num_observations

        def paste(x, values):
            return observation.replace(x, values)

    else:  # a dense A: replace the observed coordinates of the SVD basis, x̄ = V_h x
        if y.dim() != 1:
            raise ValueError(f"y: expected one observation (m,) for a dense A, got {tuple(y.shape)}")
        spectral = observation.svd()
        m = spectral.rank
        Vh = spectral.Vh.to(device)
        y = spectral.project(y, float(observation.noise_scale))[0].to(device)
        D = diffusion.event_size

        def paste(x, values):
            flat = x.reshape(num_samples, D).to(torch.float64) @ Vh.T
            flat[:, :m] = values.to(torch.float64)
            return (flat @ Vh).to(x.dtype).reshape(x.shape)

    x = torch.randn(num_samples, *diffusion.event_shape, device=device)
    with frozen(diffusion):
        for k in tqdm(range(K, 0, -1), desc="replacement", disable=not progress, leave=False):
            if k > 1:
                step, _ = diffusion.reverse_step(x, grid[k - 2], grid[k - 1])
                x = step.loc + step.scale * torch.randn_like(x)
                log_a2, log_s2 = alpha_sigma_log(grid[k - 2])  # the level of x_{k-1}
                noise = torch.randn(num_samples, m, device=device)
                values = math.exp(0.5 * float(log_a2)) * y + math.exp(0.5 * float(log_s2)) * noise
            else:
                x = diffusion.decoder_distribution(x, grid[0]).loc
                values = y
            x = paste(x, values)
    return PosteriorResult(
        draws=x,
        diagnostics={},
        seconds=time.perf_counter() - start,
        network_calls=_network_calls(diffusion, K, False),
        method="replacement",
        num_steps=K,
    )


def dps_sample(
    diffusion: Diffusion,
    observation: LinearObservation,
    y: torch.Tensor,
    num_samples: int,
    *,
    step_size: float = 1.0,
    step_per_level: float | None = None,
    num_steps: int | None = None,
    progress: bool = False,
) -> PosteriorResult:
    """Diffusion posterior sampling (see the module docstring) with ζ = ``step_size``:
    ``num_samples`` draws given ``y`` (``(m,)`` or ``(n, m)``) on the grid ``num_steps``
    (None: the model's own).  At the last level the decoder's mean, moved by the last
    gradient step, is returned (DDPM's convention).

    ``step_per_level`` = λ replaces ζ by a step per unit of noise level,
    ``ζ_k = λ (γ_k − γ_{k−1})`` (the first interval's width at k = 1), so that the total
    guidance ``Σ_k ζ_k ∇‖r‖`` is a Riemann sum of ``λ ∫ ∇‖r‖ dγ`` and the sampler tends to
    one limit as the grid is refined: a λ tuned on one K holds on another.  The paper's ζ
    (the same at every level) pushes K times, so its effect grows with K.

    Returns a :class:`~pyro_diffusion.inference.result.PosteriorResult` (unweighted ``draws``)."""
    _check(diffusion, observation, y, num_samples)
    if not isinstance(step_size, (int, float)) or isinstance(step_size, bool) or not step_size > 0:
        raise ValueError(f"step_size: expected ζ > 0, got {step_size!r}")
    if step_per_level is not None and (
        not isinstance(step_per_level, (int, float))
        or isinstance(step_per_level, bool)
        or not step_per_level > 0
    ):
        raise ValueError(f"step_per_level: expected None or λ > 0, got {step_per_level!r}")
    grid = inference_grid(diffusion, num_steps)
    K = grid.shape[0]
    start = time.perf_counter()
    device = diffusion.device
    y = y.to(device)
    x = torch.randn(num_samples, *diffusion.event_shape, device=device)
    for k in tqdm(range(K, 0, -1), desc="DPS", disable=not progress, leave=False):
        with torch.enable_grad(), frozen(diffusion):
            x_req = x.detach().requires_grad_(True)
            if k > 1:
                step, (prediction, _) = diffusion.reverse_step(x_req, grid[k - 2], grid[k - 1])
            else:
                prediction, variance_output = diffusion.predict(x_req, grid[0], grid[0].new_tensor(-math.inf))
                step = diffusion.decoder_distribution(x_req, grid[0], prediction, variance_output)
            residual = (y - observation.mean(prediction.x0)).norm(dim=-1)
            (grad,) = torch.autograd.grad(residual.sum(), x_req)
        if step_per_level is None:
            zeta = step_size
        else:
            width = (
                grid[k - 1] - grid[k - 2] if k > 1 else (grid[1] - grid[0] if K > 1 else grid.new_tensor(0.0))
            )
            zeta = step_per_level * float(width)
        move = 2 * zeta * grad  # ζ_k ∇‖r‖² with ζ_k = ζ/‖r‖
        if k > 1:
            x = (step.loc + step.scale * torch.randn_like(x) - move).detach()
        else:
            x = (step.loc - move).detach()
    return PosteriorResult(
        draws=x,
        diagnostics={"step_size": float(step_size), "step_per_level": step_per_level},
        seconds=time.perf_counter() - start,
        network_calls=_network_calls(diffusion, K, True),
        method="dps",
        num_steps=K,
    )
