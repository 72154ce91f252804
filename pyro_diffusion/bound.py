r"""The variational bound, term by term and batched over steps (DESIGN.md §2).

Step terms, per datum, in nats (ℓ_1 = L_0, ℓ_t = L_{t-1} for t ≥ 2):

    ℓ_1 = −log p_θ(x_0 | x_1)
    ℓ_t = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t))                       t ≥ 2
        = ½ Σ_d [log σ_t² − log β̃_t + (β̃_t + (μ̃_t − μ_θ)²)/σ_t² − 1]
    L_T = KL(q(x_T | x_0) ‖ N(0, I)) = ½ Σ_d [ᾱ_T x_0² + (1 − ᾱ_T) − log(1 − ᾱ_T) − 1]

each ℓ_t with ``x_t ~ q(x_t | x_0)`` drawn in closed form, so that
``−ELBO = E[Σ_t ℓ_t] + L_T`` and every step can be evaluated in one batched network call.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .parameterization import posterior_mean

__all__ = ["q_sample", "step_terms", "step_terms_given", "prior_term", "vlb_terms", "bits_per_dim"]


def q_sample(schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None):
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, a draw from q(x_t | x_0); returns (x_t, ε)."""
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = (
        schedule.at("sqrt_alphas_cumprod", t, x0) * x0
        + schedule.at("sqrt_one_minus_alphas_cumprod", t, x0) * noise
    )
    return x_t, noise


def _sum_event(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def step_terms_given(diffusion, x0, t, x_t, loc, log_var) -> torch.Tensor:
    """ℓ_t per datum given the reverse step's mean ``loc`` and ``log_var`` at (x_t, t)."""
    from .decoders import decoder_distribution

    schedule = diffusion.schedule
    # KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) for t ≥ 2 (computed for all, kept where t ≥ 2)
    q_loc = posterior_mean(schedule, x0, x_t, t)
    q_log_var = schedule.at("posterior_log_variance_clipped", t, x_t)
    kl = 0.5 * (log_var - q_log_var + (torch.exp(q_log_var) + (q_loc - loc) ** 2) * torch.exp(-log_var) - 1)
    kl = _sum_event(kl.expand_as(x0))
    # −log p_θ(x_0 | x_1) for t = 1
    decoder = decoder_distribution(diffusion.decoder, loc, log_var, diffusion.num_levels)
    nll = -_sum_event(decoder.log_prob(x0))
    return torch.where(t == 1, nll, kl)


def step_terms(diffusion, x0: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """ℓ_t per datum, shape ``(B,)``, at 1-based steps ``t`` (``(B,)``, may differ per datum)
    for the given ``x_t`` (normally a draw from q(x_t | x_0))."""
    loc, log_var, _ = diffusion.reverse_mean_log_variance(x_t, t)
    return step_terms_given(diffusion, x0, t, x_t, loc, log_var)


def prior_term(schedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) per datum, shape ``(B,)``."""
    # q(x_T | x_0) = N(√ᾱ_T x_0, (1 − ᾱ_T) I); the step is the same for every datum, so the
    # schedule's entries enter as 0-d tensors (no per-datum gather, no distribution object)
    # (1 − ᾱ_T) − log(1 − ᾱ_T) − 1 cancels badly near ᾱ_T = 0: evaluated in float64
    sqrt_alpha_bar = schedule.cast("sqrt_alphas_cumprod", x0.dtype)[-1]
    one_minus = schedule.one_minus_alphas_cumprod[-1]
    constant = (one_minus - torch.log(one_minus) - 1).to(x0.dtype)
    return 0.5 * _sum_event((sqrt_alpha_bar * x0) ** 2 + constant)


# Data elements per network call when the chunk is chosen automatically.  On a CPU the
# fastest chunks keep the network's activations in cache (a few MiB: a 128-wide MLP on
# 4,096 2-D rows, a 32-channel U-Net on 128 8×8 images); larger chunks run *slower*.  On a
# GPU the call should fill the device; 2**22 elements of (3, 32, 32) images is 1,365 images.
# Measured in docs/benchmarks.md ("full_bound").
CHUNK_ELEMENTS = {"cpu": 2**13, "cuda": 2**22}


def _default_chunk(batch: int, num_steps: int, max_items: int, event_size: int = 1, device=None) -> int:
    """Steps per network call: as many as keep ``steps × batch`` rows within ``max_items``
    and ``steps × batch × event_size`` data elements within the device's budget
    (``CHUNK_ELEMENTS``), and at least one."""
    device_type = torch.device(device).type if device is not None else "cpu"
    budget = CHUNK_ELEMENTS.get(device_type, CHUNK_ELEMENTS["cuda"])
    rows = min(max_items, budget // max(event_size, 1))
    return max(1, min(num_steps, rows // max(batch, 1)))


def vlb_terms(
    diffusion,
    x0: torch.Tensor,
    *,
    steps_per_call: int | None = None,
    max_items: int = 8192,
    progress: bool = False,
    differentiable: bool = False,
) -> torch.Tensor:
    """All T + 1 terms of the bound per datum: a ``(B, T + 1)`` tensor in nats whose column i
    is L_i (column 0 the decoder term, 1..T−1 the per-step KLs, T the prior KL); the row sums
    are unbiased single-draw estimates of −ELBO(x_0).

    Steps are evaluated in chunks: each network call covers ``steps_per_call`` steps for the
    whole batch (by default as many as fit in ``max_items`` rows and in a budget of data
    elements per call, ``CHUNK_ELEMENTS``: 2**13 on a CPU, where chunks that stay in cache are
    fastest, 2**22 on a GPU; a chunk is at least one step).  Memory grows linearly with the
    chunk.  ``progress`` shows a bar;
    ``differentiable=False`` (default) evaluates under ``torch.no_grad()``.
    """
    diffusion.check_data(x0)
    schedule = diffusion.schedule
    T = schedule.num_steps
    B = x0.shape[0]
    chunk = steps_per_call or _default_chunk(B, T, max_items, diffusion.event_size, x0.device)
    columns = []
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        bar = tqdm(total=T, desc="bound", unit="step", disable=not progress, leave=False)
        for start in range(1, T + 1, chunk):
            stop = min(T, start + chunk - 1)
            n = stop - start + 1
            t = torch.arange(start, stop + 1, device=x0.device).repeat_interleave(B)
            x0_rep = x0.repeat((n,) + (1,) * (x0.dim() - 1))
            x_t, _ = q_sample(schedule, x0_rep, t)
            columns.append(step_terms(diffusion, x0_rep, t, x_t).reshape(n, B))
            bar.update(n)
        bar.close()
        columns.append(prior_term(schedule, x0).unsqueeze(0))
    return torch.cat(columns, 0).transpose(0, 1)


def bits_per_dim(diffusion, terms: torch.Tensor) -> torch.Tensor:
    """−ELBO / (D ln 2) per datum from ``vlb_terms`` output."""
    return terms.sum(-1) / (diffusion.event_size * math.log(2))
