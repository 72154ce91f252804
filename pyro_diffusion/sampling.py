"""Ancestral sampling from the reverse chain, as small functions (k-diffusion style).

``x_T ~ N(0, I)``; for t = T..2, ``x_{t-1} = μ_θ(x_t, t) + σ_t z``; at t = 1 either the
decoder's mean (``denoise_last=True``, the DDPM convention; rounded to the nearest level for
the discretized decoder) or a draw from the decoder p_θ(x_0 | x_1).
"""

from __future__ import annotations

import weakref

import torch
from tqdm.auto import tqdm

from .decoders import DiscretizedGaussian, decoder_distribution
from .parameterization import model_log_variance, model_mean

__all__ = ["ancestral_sample"]


@torch.no_grad()
def ancestral_sample(
    diffusion,
    num_samples: int,
    *,
    progress: bool = False,
    denoise_last: bool = True,
    return_chain: bool = False,
    x_T: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
):
    """Draw ``num_samples`` data from p_θ by running the reverse chain.

    Args:
        diffusion: a :class:`~pyro_diffusion.GaussianDiffusion`.
        num_samples: n.
        progress: show a progress bar over the T steps.
        denoise_last: return the decoder's mean (DDPM) instead of a decoder draw.
        return_chain: also return the list ``[x_T, …, x_1]``.
        x_T: start from this noise instead of a fresh draw.
        dtype: dtype of the samples (default: torch's default dtype).

    Returns:
        ``(n, *event_shape)`` samples, and the chain when ``return_chain``.

    On a GPU the loop reads no value back from the device (no host-device synchronization):
    with fixed variances the per-step coefficients are Python numbers computed once per
    schedule and configuration (that first call reads them back once, before the loop).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    device = diffusion.schedule.betas.device
    shape = (num_samples, *diffusion.event_shape)
    if x_T is None:
        x = torch.randn(shape, device=device, dtype=dtype or torch.get_default_dtype())
    else:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T: expected shape {shape}, got {tuple(x_T.shape)}")
        x = x_T
    chain = []
    T = diffusion.num_steps
    tables = _step_tables(diffusion, x.dtype, device) if diffusion.variance != "learned" else None
    for step in tqdm(range(T, 0, -1), desc="sampling", disable=not progress, leave=False):
        if return_chain:
            chain.append(x)
        t = torch.full((num_samples,), step, dtype=torch.long, device=device)
        if tables is None:
            loc, log_var, _ = diffusion.reverse_mean_log_variance(x, t)
            scale = torch.exp(0.5 * log_var)
        else:
            coef_x, coef_output, scale, log_var = (column[step - 1] for column in tables)
            mean_output, _ = diffusion.denoise(x, t)
            loc = torch.add(coef_x * x, mean_output, alpha=coef_output)  # a_t x_t + b_t o
        if step > 1:
            x = (
                torch.add(loc, torch.randn_like(x), alpha=scale)
                if tables
                else loc + scale * torch.randn_like(x)
            )
        else:
            if tables is not None:
                log_var = torch.full((), log_var, dtype=x.dtype, device=device)
            decoder = decoder_distribution(diffusion.decoder, loc, log_var, diffusion.num_levels)
            if denoise_last:
                x = decoder.mean_level() if isinstance(decoder, DiscretizedGaussian) else loc
            else:
                x = decoder.sample()
    return (x, chain) if return_chain else x


# tables per schedule, keyed by what they depend on; dropped with the schedule
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _step_tables(diffusion, dtype: torch.dtype, device) -> tuple[list[float], ...]:
    """:func:`_compute_step_tables`, cached per schedule (the one host read-back happens on the
    first call for a configuration; later calls make none)."""
    schedule = diffusion.schedule
    betas = schedule.betas
    key = (betas.data_ptr(), betas._version, str(betas.device), diffusion.mean, diffusion.variance, dtype)
    per_schedule = _TABLES.setdefault(schedule, {})
    tables = per_schedule.get(key)
    if tables is None:
        per_schedule.clear()
        tables = per_schedule[key] = _compute_step_tables(diffusion, dtype, device)
    return tables


def _compute_step_tables(diffusion, dtype: torch.dtype, device) -> tuple[list[float], ...]:
    """Per-step Python numbers for fixed variances: ``μ_θ(x_t, t) = a_t x_t + b_t o`` (every mean
    parameterization is affine in ``x_t`` and the network output ``o``), ``σ_t`` and
    ``log σ_t²``, for t = 1..T, from the parameterization's own functions.

    All steps of the batch share t, so the loop then needs three arithmetic operations per
    step instead of gathering schedule entries per datum (docs/benchmarks.md, "sampling").
    Read back to the host once, before the loop."""
    schedule = diffusion.schedule
    T = schedule.num_steps
    steps = torch.arange(1, T + 1, device=device)
    zeros = torch.zeros((T, 1), dtype=dtype, device=device)
    ones = torch.ones_like(zeros)
    coef_x = model_mean(schedule, diffusion.mean, ones, steps, zeros)
    coef_output = model_mean(schedule, diffusion.mean, zeros, steps, ones)
    log_var = model_log_variance(schedule, diffusion.variance, steps, zeros).expand_as(zeros)
    table = torch.cat([coef_x, coef_output, torch.exp(0.5 * log_var), log_var], 1)
    return tuple(table.transpose(0, 1).tolist())
