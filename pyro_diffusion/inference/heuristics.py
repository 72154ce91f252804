r"""The common heuristics for inverse problems with a diffusion prior, as baselines.

Neither targets p_θ(x_0 | y) exactly; they are what most inverse-problem toolkits ship, and
:mod:`pyro_diffusion.inference.smc` / :mod:`~pyro_diffusion.inference.nuts` are validated
against them (``docs/prior.md``).

* :func:`replacement_sample` — for masks (inpainting): run the reverse chain and after each
  step overwrite the observed entries of x_{t-1} by a forward-noised copy of the data,
  ``√ᾱ_{t-1} y + √(1 − ᾱ_{t-1}) ε`` (Song et al. 2021's "replacement"; at t − 1 = 0 the
  observed entries become y itself).
* :func:`dps_sample` — diffusion posterior sampling (Chung et al., 2023): an ancestral step
  followed by a gradient step on the data fit of the denoised estimate,

  .. math::

      x_{t-1} = μ_θ(x_t, t) + σ_t z − ζ_t ∇_{x_t} \lVert y − A\,\hat x_0(x_t) \rVert_2,
      \qquad ζ_t = ζ / \lVert y − A\,\hat x_0(x_t) \rVert_2 ,

  with the paper's step ``ζ_t ∇‖r‖²`` (Algorithm 1), which with ζ_t = ζ/‖r‖ equals
  ``2ζ ∇‖r‖`` (one network call with gradient per step).  ζ needs tuning per problem.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..diffusion import GaussianDiffusion
from .observations import LinearObservation, check_conditioning
from .prior import frozen, reverse_step, reverse_step_and_x0

__all__ = ["replacement_sample", "dps_sample"]


def _check(diffusion, observation, y, num_samples):
    check_conditioning(diffusion, observation, y)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")


@torch.no_grad()
def replacement_sample(
    diffusion: GaussianDiffusion,
    observation: LinearObservation,
    y: torch.Tensor,
    num_samples: int,
    *,
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Inpainting by replacement: ``num_samples`` draws ``(n, *event_shape)`` given ``y``
    (shape ``(m,)`` or ``(n, m)``); the observation must be a mask.  Returns (samples, stats)
    with stats ``{"seconds", "network_calls"}``.  The observation noise is ignored (y is
    pasted in as if exact), as the heuristic does."""
    _check(diffusion, observation, y, num_samples)
    if observation.observed_index is None:
        raise ValueError("observation: replacement needs a mask (LinearObservation.mask)")
    start = time.perf_counter()
    schedule = diffusion.schedule
    x = torch.randn(num_samples, *diffusion.event_shape)
    for t in tqdm(range(diffusion.num_steps, 0, -1), desc="replacement", disable=not progress, leave=False):
        loc, log_var = reverse_step(diffusion, x, t)
        x = loc + torch.exp(0.5 * log_var) * torch.randn_like(x) if t > 1 else loc
        if t > 1:
            a = schedule.alphas_cumprod[t - 2].item()  # ᾱ_{t-1}
            noisy = a**0.5 * y + (1 - a) ** 0.5 * torch.randn(num_samples, observation.num_observations)
        else:
            noisy = y
        x = observation.replace(x, noisy)
    return x, {"seconds": time.perf_counter() - start, "network_calls": diffusion.num_steps}


def dps_sample(
    diffusion: GaussianDiffusion,
    observation: LinearObservation,
    y: torch.Tensor,
    num_samples: int,
    *,
    step_size: float = 1.0,
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Diffusion posterior sampling (see the module docstring) with ζ = ``step_size``:
    ``num_samples`` draws ``(n, *event_shape)`` given ``y`` (``(m,)`` or ``(n, m)``).
    At t = 1 the decoder's mean is returned (DDPM's convention).  Returns (samples, stats)."""
    _check(diffusion, observation, y, num_samples)
    if not step_size > 0:
        raise ValueError(f"step_size: expected ζ > 0, got {step_size!r}")
    start = time.perf_counter()
    x = torch.randn(num_samples, *diffusion.event_shape)
    for t in tqdm(range(diffusion.num_steps, 0, -1), desc="DPS", disable=not progress, leave=False):
        with torch.enable_grad(), frozen(diffusion):
            x_req = x.detach().requires_grad_(True)
            loc, log_var, x0_hat = reverse_step_and_x0(diffusion, x_req, t)
            residual = (y - observation.mean(x0_hat)).norm(dim=-1)
            (grad,) = torch.autograd.grad(residual.sum(), x_req)
        step = 2 * step_size * grad  # ζ_t ∇‖r‖² with ζ_t = ζ/‖r‖

        if t > 1:
            x = (loc + torch.exp(0.5 * log_var) * torch.randn_like(loc) - step).detach()
        else:
            x = (loc - step).detach()
    return x, {"seconds": time.perf_counter() - start, "network_calls": diffusion.num_steps}
