r"""Samplers as small functions on a grid of noise levels (k-diffusion style).

Every sampler has the signature ``sampler(diffusion, x, gammas, *, callback=None,
progress=False, ...)``: ``x`` the starting noise ``(n, *event_shape)`` at the top level,
``gammas`` the increasing levels γ_1 < … < γ_K to walk down (any grid: the model's own, a
respaced sub-grid of it, or any K levels of a continuous-time schedule), ``callback`` called
after each step with ``{"step": k, "gamma": γ_k, "x": x_k, "x0_hat": x̂}``.  They return x_0.

* :func:`ancestral` — ``x_{k-1} ~ p_θ(x_{k-1} | x_k)``, the model's reverse step between the
  two levels (its variance a function of (γ_{k−1}, γ_k), so respacing needs nothing else).
* :func:`ddim` — DDIM (Song et al. 2021) with η: ``x_{k-1} = α_{k−1} x̂ + √(σ_{k−1}² − s²) ε̂ +
  s z`` with s² = η² c σ_{k−1}² (η = 1: ancestral with the posterior variance; η = 0:
  deterministic).

At the last level the decoder's mean is returned (its nearest level for K-level data;
``denoise_last=False``: a draw from the decoder).  :func:`sample` picks the grid and the noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.infer.util import is_validation_enabled
from tqdm.auto import tqdm

from .decoders import DiscretizedGaussian
from .parameterization import alpha_sigma_log, broadcast, step_coefficients
from .schedules import check_num_steps

__all__ = ["SAMPLERS", "ancestral", "ddim", "sample", "check_grid"]


def check_grid(gammas: torch.Tensor, event_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``gammas`` as a strictly increasing float64 1-D tensor (``(K, *event_shape)`` for a
    per-dimension schedule's ``event_shape``, increasing along dim 0 in every dimension), or
    a ValueError.  The values are
    read (finite, increasing) on the CPU, and on a GPU only with Pyro's validation on, so that a
    sampling call need not wait for the device."""
    if event_shape is None:
        if not isinstance(gammas, torch.Tensor) or gammas.dim() != 1 or gammas.numel() < 1:
            raise ValueError(f"gammas: expected a non-empty 1-D tensor of noise levels, got {gammas!r:.80}")
    elif (
        not isinstance(gammas, torch.Tensor)
        or gammas.dim() != 1 + len(event_shape)
        or tuple(gammas.shape[1:]) != tuple(event_shape)
        or gammas.numel() < 1
    ):
        raise ValueError(
            f"gammas: expected per-dimension noise levels of shape (K, {', '.join(map(str, event_shape))}), "
            f"got {gammas!r:.80}"
        )
    gammas = gammas.detach().to(torch.float64)
    if gammas.device.type != "cpu" and not is_validation_enabled():
        return gammas
    if not torch.isfinite(gammas).all() or not (gammas[1:] > gammas[:-1]).all():
        raise ValueError("gammas: expected finite, strictly increasing noise levels γ_1 < … < γ_K")
    return gammas


def _levels(diffusion, gamma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``gamma`` shaped against ``x`` (per-dimension levels get leading 1s)."""
    levels = getattr(diffusion, "levels", None)
    return levels(gamma, x) if levels is not None else gamma


def _finish(diffusion, x, gamma_1, denoise_last: bool):
    decoder = diffusion.decoder_distribution(x, _levels(diffusion, gamma_1, x))
    if not denoise_last:
        return decoder.sample()
    return decoder.mean_level() if isinstance(decoder, DiscretizedGaussian) else decoder.loc


def _walk(diffusion, x, gammas, step_fn: Callable, callback, progress, denoise_last, desc):
    per_dimension = getattr(diffusion, "per_dimension", False)
    gammas = check_grid(gammas, tuple(diffusion.event_shape) if per_dimension else None).to(x.device)
    K = gammas.shape[0]
    for k in tqdm(range(K, 1, -1), desc=desc, disable=not progress, leave=False):
        x, x0_hat = step_fn(x, gammas[k - 2], gammas[k - 1])
        if callback is not None:
            callback({"step": k, "gamma": gammas[k - 1], "x": x, "x0_hat": x0_hat})
    x = _finish(diffusion, x, gammas[0], denoise_last)
    if callback is not None:
        callback({"step": 1, "gamma": gammas[0], "x": x, "x0_hat": x})
    return x


@torch.no_grad()
def ancestral(
    diffusion,
    x: torch.Tensor,
    gammas: torch.Tensor,
    *,
    callback: Callable | None = None,
    progress: bool = False,
    denoise_last: bool = True,
) -> torch.Tensor:
    """Ancestral sampling with the model's reverse steps between consecutive levels."""

    def step(x, gamma_s, gamma_t):
        p, (prediction, _) = diffusion.reverse_step(x, gamma_s, gamma_t)
        return p.loc + p.scale * torch.randn_like(x), prediction.x0

    return _walk(diffusion, x, gammas, step, callback, progress, denoise_last, "sampling")


@torch.no_grad()
def ddim(
    diffusion,
    x: torch.Tensor,
    gammas: torch.Tensor,
    *,
    eta: float = 0.0,
    callback: Callable | None = None,
    progress: bool = False,
    denoise_last: bool = True,
) -> torch.Tensor:
    """DDIM with ``eta`` ∈ [0, 1] (module docstring)."""
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0 <= eta <= 1:
        raise ValueError(f"eta: expected a number in [0, 1], got {eta!r}")

    def step(x, gamma_s, gamma_t):
        prediction, _ = diffusion.predict(x, gamma_t, gamma_s)
        gamma_s, gamma_t = _levels(diffusion, gamma_s, x), _levels(diffusion, gamma_t, x)
        coef = step_coefficients(gamma_s, gamma_t, x)
        log_a2_s, log_s2_s = alpha_sigma_log(gamma_s)
        alpha_s = broadcast(torch.exp(0.5 * log_a2_s), x)
        noise_var = eta**2 * torch.exp(coef.log_small)
        keep_var = (broadcast(torch.exp(log_s2_s), x) - noise_var).clamp(min=0)
        out = alpha_s * prediction.x0 + keep_var.sqrt() * prediction.eps
        if eta > 0:
            out = out + noise_var.sqrt() * torch.randn_like(x)
        return out, prediction.x0

    return _walk(diffusion, x, gammas, step, callback, progress, denoise_last, "DDIM")


#: name → sampler
SAMPLERS: dict[str, Callable] = {"ancestral": ancestral, "ddim": ddim}


@torch.no_grad()
def sample(
    diffusion,
    num_samples: int,
    *,
    num_steps: int | None = None,
    method: str = "ancestral",
    x_T: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> torch.Tensor:
    """``num_samples`` draws from p_θ with ``method`` (:data:`SAMPLERS`) on the grid
    ``num_steps`` (None: the model's own; fewer: a respaced sub-grid for a tabulated schedule).

    Args:
        x_T: start from this noise ``(n, *event_shape)`` instead of a fresh N(0, I) draw.
        dtype: dtype of the samples (default: torch's default dtype).
        kwargs: passed to the sampler (``eta``, ``callback``, ``progress``, ``denoise_last``).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    if method not in SAMPLERS:
        raise ValueError(f"method: expected one of {sorted(SAMPLERS)}, got {method!r}")
    if num_steps is not None:
        check_num_steps(num_steps)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    callback = kwargs.get("callback")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a function of one dict or None, got {callback!r:.80}")
    shape = (num_samples, *diffusion.event_shape)
    device = diffusion.device
    if x_T is None:
        x = torch.randn(shape, device=device, dtype=dtype or torch.get_default_dtype(), generator=generator)
    else:
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise TypeError(f"x_T: expected a floating-point tensor of shape {shape}, got {x_T!r:.80}")
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T: expected shape {shape}, got {tuple(x_T.shape)}")
        if not torch.isfinite(x_T).all():
            raise ValueError("x_T: contains NaN or infinite values")
        x = x_T
    return SAMPLERS[method](diffusion, x, diffusion.grid(num_steps), **kwargs)
