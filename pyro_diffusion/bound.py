r"""The variational bound, term by term, on any grid or in continuous time.

On a grid of T levels, per datum, in nats (ℓ_1 the decoder term, ℓ_t for t ≥ 2 the KLs):

    ℓ_1 = −log p_θ(x_0 | x_1)
    ℓ_t = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t))                       t ≥ 2
    L_T = KL(q(x_T | x_0) ‖ N(0, I))

each with ``x_t ~ q(x_t | x_0)`` drawn in closed form, so ``−ELBO = E[Σ_t ℓ_t] + L_T`` and all
steps are evaluated in batched network calls.  In continuous time the sum of the ℓ_t (t ≥ 2)
becomes ``∫_0^1 ½ γ'(t) E‖ε − ε̂_θ(z_t, γ(t))‖² dt``, estimated by Monte Carlo over t.

The terms are built from the distributions the Pyro programs sample
(:meth:`~pyro_diffusion.diffusion.Diffusion.marginal`, ``forward_step``, ``reverse_step``,
``decoder_distribution``) and the same ``kl_divergence`` registrations, without tracing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from .chains import InfinitesimalStep
from .parameterization import broadcast
from .schedules import check_num_steps

__all__ = [
    "BoundEstimate",
    "prior_term",
    "decoder_term",
    "step_terms",
    "vlb_terms",
    "bound_samples",
    "bound",
    "nll",
    "bits_per_dim",
]


def _sum_event(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def prior_term(diffusion, x0: torch.Tensor, gamma_T: torch.Tensor | None = None) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) per datum, ``(B,)`` (level: the model's top by default)."""
    diffusion.check_data(x0)
    if gamma_T is None:
        gamma_T = diffusion.grid()[-1]
    q = diffusion.marginal(x0, gamma_T)
    return _sum_event(kl_divergence(q, dist.Normal(torch.zeros_like(x0), torch.ones_like(x0))))


def decoder_term(diffusion, x0: torch.Tensor, gamma_1: torch.Tensor | None = None) -> torch.Tensor:
    """ℓ_1 = −log p_θ(x_0 | x_1) per datum for one draw x_1 ~ q(x_1 | x_0), ``(B,)``."""
    if gamma_1 is None:
        gamma_1 = diffusion.grid()[0]
    z_1 = diffusion.marginal(x0, gamma_1).rsample()
    return -_sum_event(diffusion.decoder_distribution(z_1, diffusion.levels(gamma_1, z_1)).log_prob(x0))


def step_terms(diffusion, x0: torch.Tensor, gamma_s: torch.Tensor, gamma_t: torch.Tensor) -> torch.Tensor:
    """ℓ per datum, ``(B,)``, of the steps from γ_t down to γ_s (per datum, γ_s < γ_t), one draw
    z_t ~ q(z_t | x_0) each."""
    z_t = diffusion.marginal(x0, gamma_t).rsample()
    q = diffusion.forward_step(x0, z_t, gamma_s, gamma_t)
    p, _ = diffusion.reverse_step(z_t, gamma_s, gamma_t)
    return _sum_event(kl_divergence(q, p))


def continuous_terms(diffusion, x0: torch.Tensor, times: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """One draw of the continuous-time diffusion term ½ γ'(t) ‖ε − ε̂‖² per datum at ``times``,
    and the schedule's shape outputs."""
    at = diffusion.schedule(times)
    z_t = diffusion.marginal(x0, at.gamma).rsample()
    eps = diffusion.noise_of(x0, z_t, at.gamma)
    prediction, _ = diffusion.predict(z_t, at.gamma)
    rate = broadcast(at.derivative, z_t)
    kl = kl_divergence(InfinitesimalStep(z_t, eps, rate), InfinitesimalStep(z_t, prediction.eps, rate))
    return _sum_event(kl), at.shape_outputs


# Data elements per network call when the chunk is chosen automatically.  On a CPU the fastest
# chunks keep the network's activations in cache; on a GPU the call should fill the device.
CHUNK_ELEMENTS = {"cpu": 2**13, "cuda": 2**22}


def _default_chunk(batch: int, num_steps: int, max_items: int, event_size: int = 1, device=None) -> int:
    """Steps per network call: as many as keep ``steps × batch`` rows within ``max_items``
    and ``steps × batch × event_size`` elements within the device's budget, at least one."""
    device_type = torch.device(device).type if device is not None else "cpu"
    budget = CHUNK_ELEMENTS.get(device_type, CHUNK_ELEMENTS["cuda"])
    rows = min(max_items, budget // max(event_size, 1))
    return max(1, min(num_steps, rows // max(batch, 1)))


def vlb_terms(
    diffusion,
    x0: torch.Tensor,
    *,
    num_steps: int | None = None,
    steps_per_call: int | None = None,
    max_items: int = 8192,
    progress: bool = False,
    differentiable: bool = False,
) -> torch.Tensor:
    """All T + 1 terms of the bound on the grid ``num_steps`` (None: the model's own) per
    datum: a ``(B, T + 1)`` tensor in nats whose column 0 is the decoder term, columns
    1..T−1 the per-step KLs (steps 2..T) and column T the prior KL; row sums are unbiased
    single-draw estimates of −ELBO(x_0).

    Each network call covers ``steps_per_call`` steps for the whole batch (by default as many
    as fit in ``max_items`` rows and the device's element budget, ``CHUNK_ELEMENTS``).
    ``differentiable=False`` (default) evaluates under ``torch.no_grad()``."""
    diffusion.check_data(x0)
    if steps_per_call is not None:
        check_num_steps(steps_per_call, "steps_per_call")
    check_num_steps(max_items, "max_items")
    grid = diffusion.grid(num_steps).to(x0.device)
    T = grid.shape[0]
    B = x0.shape[0]
    chunk = steps_per_call or _default_chunk(B, T, max_items, diffusion.event_size, x0.device)
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        columns = [decoder_term(diffusion, x0, grid[0]).unsqueeze(0)]
        bar = tqdm(total=T, desc="bound", unit="step", disable=not progress, leave=False)
        bar.update(1)
        for start in range(2, T + 1, chunk):
            stop = min(T, start + chunk - 1)
            n = stop - start + 1
            t = torch.arange(start, stop + 1, device=x0.device).repeat_interleave(B)
            x0_rep = x0.repeat((n,) + (1,) * (x0.dim() - 1))
            columns.append(step_terms(diffusion, x0_rep, grid[t - 2], grid[t - 1]).reshape(n, B))
            bar.update(n)
        bar.close()
        columns.append(prior_term(diffusion, x0, grid[-1]).unsqueeze(0))
    return torch.cat(columns, 0).transpose(0, 1)


def bits_per_dim(diffusion, terms: torch.Tensor) -> torch.Tensor:
    """−ELBO / (D ln 2) per datum from ``vlb_terms`` (or any per-datum nats summed over the last
    dimension)."""
    if not isinstance(terms, torch.Tensor) or not terms.is_floating_point() or terms.dim() < 1:
        raise TypeError(
            f"terms: expected a floating-point tensor of per-datum terms in nats, got {terms!r:.80}"
        )
    return terms.sum(-1) / (diffusion.event_size * math.log(2))


class BoundEstimate(NamedTuple):
    """Monte Carlo estimate of −ELBO per datum from ``num_draws`` independent single-draw
    estimates: ``mean``, ``standard_error`` (= sqrt(variance / n)) and ``variance`` (of one
    draw: the estimator's variance), all ``(B,)``, in the unit asked for."""

    mean: torch.Tensor
    standard_error: torch.Tensor
    variance: torch.Tensor
    num_draws: int

    def dataset_mean(self) -> tuple[float, float]:
        """(mean over data, its Monte Carlo standard error given the data)."""
        n = self.mean.shape[0]
        return self.mean.mean().item(), (self.standard_error.pow(2).sum().sqrt() / n).item()


@torch.no_grad()
def bound_samples(
    diffusion,
    x0: torch.Tensor,
    *,
    num_steps: int | None = 0,
    num_times: int = 128,
    max_items: int = 16384,
    progress: bool = False,
) -> torch.Tensor:
    """``num_times`` independent single-draw estimates of −ELBO(x_0) per datum, in nats,
    ``(B, num_times)``: the one-step estimator (uniform step, decoder and prior in closed form)
    in continuous time (``num_steps=0``, the default) or on a T-level grid.  Row means are
    unbiased for −ELBO; their spread is the estimator's variance."""
    diffusion.check_data(x0)
    if isinstance(num_times, bool) or not isinstance(num_times, int) or num_times < 2:
        raise ValueError(f"num_times: expected an integer >= 2, got {num_times!r}")
    check_num_steps(max_items, "max_items")
    continuous = num_steps == 0 and not isinstance(num_steps, bool)
    if continuous:
        gamma_1, gamma_T = diffusion.schedule.endpoint_levels()
    else:
        grid = diffusion.grid(num_steps).to(x0.device)
        gamma_1, gamma_T = grid[0], grid[-1]
        if grid.shape[0] < 2:
            raise ValueError("num_steps: the one-step estimator needs T >= 2 noise levels")
    B = x0.shape[0]
    per_call = max(1, max_items // max(B, 1))
    prior = prior_term(diffusion, x0, gamma_T).to(torch.float64)
    columns = []
    for start in tqdm(range(0, num_times, per_call), desc="bound", disable=not progress, leave=False):
        n = min(per_call, num_times - start)
        x_rep = x0.repeat((n,) + (1,) * (x0.dim() - 1))
        if continuous:
            times = torch.rand(n * B, dtype=torch.float64, device=x0.device)
            terms, _ = continuous_terms(diffusion, x_rep, times)
        else:
            T = grid.shape[0]
            index = torch.randint(2, T + 1, (n * B,), device=x0.device)
            terms = (T - 1) * step_terms(diffusion, x_rep, grid[index - 2], grid[index - 1])
        terms = terms + decoder_term(diffusion, x_rep, gamma_1)
        columns.append(terms.reshape(n, B).to(torch.float64))
    return torch.cat(columns, 0).transpose(0, 1) + prior[:, None]


def bound(
    diffusion,
    x0: torch.Tensor,
    *,
    num_steps: int | None = 0,
    num_times: int = 128,
    bits: bool = True,
    **kwargs,
) -> BoundEstimate:
    """Monte Carlo −ELBO per datum with standard errors from ``num_times`` draws of the
    one-step estimator (:func:`bound_samples`), in bits per dimension (``bits``) or nats."""
    samples = bound_samples(diffusion, x0, num_steps=num_steps, num_times=num_times, **kwargs)
    if bits:
        samples = samples / (diffusion.event_size * math.log(2))
    variance = samples.var(1)
    return BoundEstimate(samples.mean(1), (variance / num_times).sqrt(), variance, num_times)


def nll(
    diffusion, x0: torch.Tensor, *, num_steps: int | None = None, num_times: int = 128, **kwargs
) -> torch.Tensor:
    """−ELBO(x_0) per datum in bits per dimension, ``(B,)``: on a grid (``num_steps`` None or
    T) every step's term once (:func:`vlb_terms`); in continuous time (``num_steps=0``) the mean
    of ``num_times`` draws (:func:`bound`)."""
    if num_steps == 0 and not isinstance(num_steps, bool):
        return bound(diffusion, x0, num_steps=0, num_times=num_times, **kwargs).mean
    if num_steps is not None:
        check_num_steps(num_steps)
    return bits_per_dim(diffusion, vlb_terms(diffusion, x0, num_steps=num_steps, **kwargs))


__all__ += ["continuous_terms", "CHUNK_ELEMENTS"]


# ------------------------------------------------------------------ importance weighting
@torch.no_grad()
def log_importance_weights(
    diffusion,
    x0: torch.Tensor,
    *,
    num_steps: int | None = None,
    num_particles: int = 16,
    max_items: int = 8192,
    progress: bool = False,
) -> torch.Tensor:
    r"""``num_particles`` log importance weights per datum, ``(num_particles, B)`` float64 nats:

    .. math::

        \log w = \log p_θ(x_0, x_{1:T}) − \log q(x_{1:T} \mid x_0),
        \qquad x_{1:T} \sim q(x_{1:T} \mid x_0),

    whole trajectories of the forward chain on the grid ``num_steps`` (None: the model's own;
    K: a K-level grid), drawn level by level with ``forward_transition`` and scored by the
    model's prior, reverse steps and decoder (the distributions the Pyro programs sample).
    Their mean is a single-draw ELBO; ``logsumexp − log M`` is the importance-weighted bound
    (:func:`importance_weighted_bound`).  One network call per level for ``max_items`` rows
    (particles × data) at a time."""
    diffusion.check_data(x0)
    check_num_steps(num_particles, "num_particles")
    check_num_steps(max_items, "max_items")
    grid = diffusion.grid(num_steps).to(x0.device).detach()
    T, B = grid.shape[0], x0.shape[0]
    per_chunk = max(1, max_items // num_particles)
    out = []
    bar = tqdm(total=T * B, desc="importance weights", unit="level×datum", disable=not progress, leave=False)
    for start in range(0, B, per_chunk):
        x = x0[start : start + per_chunk]
        n = x.shape[0]
        x = x.repeat((num_particles,) + (1,) * (x.dim() - 1))
        first = diffusion.marginal(x, grid[0])
        z = first.sample()
        log_w = -_sum_event(first.log_prob(z)).to(torch.float64)
        decoder = diffusion.decoder_distribution(z, diffusion.levels(grid[0], z))
        log_w = log_w + _sum_event(decoder.log_prob(x)).to(torch.float64)
        bar.update(n)
        for k in range(1, T):
            forward = diffusion.forward_transition(z, grid[k - 1], grid[k])
            z_next = forward.sample()
            reverse, _ = diffusion.reverse_step(z_next, grid[k - 1], grid[k])
            log_w = log_w + (
                _sum_event(reverse.log_prob(z)).to(torch.float64)
                - _sum_event(forward.log_prob(z_next)).to(torch.float64)
            )
            z = z_next
            bar.update(n)
        top = dist.Normal(torch.zeros_like(z), torch.ones_like(z))
        log_w = log_w + _sum_event(top.log_prob(z)).to(torch.float64)
        out.append(log_w.reshape(num_particles, n))
    bar.close()
    return torch.cat(out, 1)


def importance_weighted_bound(
    diffusion,
    x0: torch.Tensor,
    *,
    num_steps: int | None = None,
    num_particles: int = 16,
    num_repeats: int = 2,
    bits: bool = True,
    **kwargs,
) -> BoundEstimate:
    r"""The importance-weighted bound (Burda et al., 2016) per datum, with standard errors:

    .. math::

        −\log p_θ(x_0) \le −E\Big[\log \frac1M \sum_{m=1}^M w_m\Big]
        \le −\mathrm{ELBO}(x_0),

    with the forward chain as the proposal of M = ``num_particles`` whole trajectories on the
    grid ``num_steps`` (:func:`log_importance_weights`): a bound on the negative
    log-likelihood of the model's chain on that grid, never looser than its ELBO, and tighter
    as M grows.  ``num_repeats`` independent M-particle estimates per datum give the mean and
    its standard error (``variance``: of one M-particle estimate); bits per dimension
    (``bits``) or nats.  ``kwargs`` go to :func:`log_importance_weights`."""
    check_num_steps(num_repeats, "num_repeats", minimum=2)
    draws = []
    for _ in range(num_repeats):
        log_w = log_importance_weights(
            diffusion, x0, num_steps=num_steps, num_particles=num_particles, **kwargs
        )
        draws.append(-(torch.logsumexp(log_w, 0) - math.log(num_particles)))
    samples = torch.stack(draws, 1)
    if bits:
        samples = samples / (diffusion.event_size * math.log(2))
    variance = samples.var(1)
    return BoundEstimate(samples.mean(1), (variance / num_repeats).sqrt(), variance, num_repeats)


__all__ += ["log_importance_weights", "importance_weighted_bound"]
