"""Ancestral sampling from the reverse chain, as small functions (k-diffusion style).

``x_T ~ N(0, I)``; for t = T..2, ``x_{t-1} = μ_θ(x_t, t) + σ_t z``; at t = 1 either the
decoder's mean (``denoise_last=True``, the DDPM convention; rounded to the nearest level for
the discretized decoder) or a draw from the decoder p_θ(x_0 | x_1).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .decoders import DiscretizedGaussian, decoder_distribution

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
    for step in tqdm(range(T, 0, -1), desc="sampling", disable=not progress, leave=False):
        if return_chain:
            chain.append(x)
        t = torch.full((num_samples,), step, dtype=torch.long, device=device)
        loc, log_var, _ = diffusion.reverse_mean_log_variance(x, t)
        if step > 1:
            x = loc + torch.exp(0.5 * log_var) * torch.randn_like(x)
        else:
            decoder = decoder_distribution(diffusion.decoder, loc, log_var, diffusion.num_levels)
            if denoise_last:
                x = decoder.mean_level() if isinstance(decoder, DiscretizedGaussian) else loc
            else:
                x = decoder.sample()
    return (x, chain) if return_chain else x
