r"""The two chains as Pyro programs over the same sites, and their step-restricted forms.

On a grid of T noise levels γ_1 < … < γ_T (latent ``x_t`` at level γ_t, ``x_0`` the data):

**Guide** — the forward (noising) chain q(x_{1:T} | x_0), no parameters of its own, in one of
two factorizations of the same joint:

* ``"posterior"`` order (default): ``x_T ~ q(x_T | x_0)``, then for t = T..2
  ``x_{t-1} ~ q(x_{t-1} | x_t, x_0)``.  Model and guide then have the same dependency
  structure, the condition under which :class:`pyro.infer.TraceMeanField_ELBO` is exact: at
  ``x_{t-1}`` it takes KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)), at ``x_T`` KL(q(x_T|x_0) ‖ N(0, I)).
* ``"forward"`` order: for t = 1..T ``x_t ~ q(x_t | x_{t-1})``.  Same joint, but a per-site
  KL against the model would compare the wrong conditionals, so its kernels
  (:class:`ForwardTransition`) have no analytic KL: estimators fall back on ``log p − log q``.

**Model** — the reverse chain p_θ(x_{0:T}): ``x_T ~ N(0, I)``, ``x_{t-1} ~ p_θ(x_{t-1} | x_t)``
for t = T..2, ``x_0 ~`` the decoder p_θ(x_0 | x_1), observed when data is given.

**Step-restricted forms** (``steps=`` a :class:`StepDraw`): the one-step-per-datum estimator

    −ELBO(x_0) = L_T + Σ_t E_{q(x_t|x_0)} ℓ_t = L_T + E_{t~r} E_{q(x_t|x_0)} [ℓ_t / r(t)]

as a model/guide pair.  Per datum, the draw picks a step: an upper level γ_t and a lower level
γ_s (the next level down on the grid, or, in continuous time, an infinitesimal step with rate
γ'(t)).  Both programs emit

* ``x_T``: the prior term (guide q(x_T | x_0), model N(0, I));
* ``x_t``: the step's upper level, drawn from q(x_t | x_0) in *both* programs (the bound
  conditions on it; its KL is zero);
* ``x_s``: the step's lower level, guide q(x_s | x_t, x_0), model p_θ(x_s | x_t), whose
  per-site KL is ℓ_t; with ``x_t`` and ``x_s`` inside ``poutine.scale(1/r(t))``;
* the decoder: when it uses the network it is one of the steps (the model's observed ``x_0``
  at the data whose draw is step 1, masked to them); otherwise it is computed for every datum
  from its own latent ``x_1`` (KL zero) and observed ``x_0``;
* ``eps_hat``: a deterministic site holding the network's ε̂ at ``x_t`` (for L_simple).

Any ELBO with analytic KLs (:class:`pyro.infer.TraceMeanField_ELBO`, or
:class:`~pyro_diffusion.losses.DiffusionELBO`, which also keeps the per-datum terms) then
returns an unbiased one-network-call estimate of −ELBO, and a user's handlers (scale, mask,
condition) act on it as on any Pyro program.

The KL of a step comes from Pyro's ``kl_divergence`` registry: :class:`ForwardStep` against
:class:`ReverseStep` (the closed form in ε: ½[log σ²_θ/σ²_q + σ²_q/σ²_θ − 1 + g (ε − ε̂)²/σ²_θ],
g = (α_s c σ_t/α_t)²; for the posterior variance exactly ½ expm1(γ_t − γ_s)(ε − ε̂)²), and
:class:`InfinitesimalStep` against itself (½ γ'(t)(ε − ε̂)², the rate of a step's KL).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints, kl_divergence, register_kl

from .parameterization import Prediction, StepCoefficients, broadcast, step_coefficients

__all__ = [
    "GUIDE_ORDERS",
    "TIME_SAMPLERS",
    "site_name",
    "ForwardMarginal",
    "ForwardStep",
    "ReverseStep",
    "ForwardTransition",
    "InfinitesimalStep",
    "StepDraw",
    "StepLevels",
    "forward_guide",
    "reverse_model",
    "step_guide",
    "step_model",
    "per_site_kl",
    "ReverseChain",
    "ForwardChain",
    "uniform_times",
    "low_discrepancy_times",
]

GUIDE_ORDERS = ("posterior", "forward")
TIME_SAMPLERS = ("uniform", "low-discrepancy", "importance")


def site_name(t: int, prefix: str = "") -> str:
    """The Pyro site of x_t: ``"x_{t}"`` with the paper's 1-based t (``x_0`` is data)."""
    if isinstance(t, torch.Tensor) and t.dim() == 0 and not t.is_floating_point() and t.dtype != torch.bool:
        t = int(t)
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise ValueError(f"t: expected a step t >= 0 (0 is the data), got {t!r}")
    return f"{prefix}x_{t}"


def _event(distribution, event_dims: int):
    return distribution.to_event(event_dims) if event_dims else distribution


# ---------------------------------------------------------------------------- step distributions
class ForwardMarginal(dist.Normal):
    """q(z | x) = N(α x, σ²) at one noise level, carrying ``log_variance`` = log σ² in float64,
    so that its KL against N(0, I) (the prior term) keeps the digits that σ² ≈ 1 loses in
    float32, and its KL against an equal marginal (the step's upper level) is exactly zero."""

    def __init__(self, loc, scale, log_variance: torch.Tensor, validate_args=None):
        super().__init__(loc, scale, validate_args=validate_args)
        self.log_variance = log_variance

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return ForwardMarginal(
            self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.log_variance
        )


@register_kl(ForwardMarginal, dist.Normal)
def _kl_marginal_normal(q: ForwardMarginal, p: dist.Normal):
    # ½[r − 1 − log r + (μ_q − μ_p)²/σ_p²] with r = σ_q²/σ_p², the first three terms in float64
    log_ratio = q.log_variance - 2 * torch.log(p.scale.to(torch.float64))
    variance_terms = (torch.expm1(log_ratio) - log_ratio).to(q.loc.dtype)
    return 0.5 * (variance_terms + ((q.loc - p.loc) / p.scale) ** 2)


@register_kl(ForwardMarginal, ForwardMarginal)
def _kl_marginal_marginal(q: ForwardMarginal, p: ForwardMarginal):
    # the step's upper level: both programs draw it from the same q(x_t | x_0)
    return torch.zeros(
        torch.broadcast_shapes(q.batch_shape, p.batch_shape), dtype=q.loc.dtype, device=q.loc.device
    )


class ForwardStep(dist.Normal):
    """q(z_s | z_t, x) = N(keep·z_t + take·x, c σ_s²), carrying ``eps``, the noise of z_t
    (``(z_t − α_t x)/σ_t``), and the step's :class:`StepCoefficients` for the analytic KL."""

    def __init__(self, loc, scale, eps, coefficients: StepCoefficients, validate_args=None):
        super().__init__(loc, scale, validate_args=validate_args)
        self.eps = eps.expand(self.batch_shape) if eps.shape != self.batch_shape else eps
        self.coefficients = coefficients

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return type(self)(
            self.loc.expand(batch_shape),
            self.scale.expand(batch_shape),
            self.eps.expand(batch_shape),
            self.coefficients,
        )


class ReverseStep(dist.Normal):
    """p_θ(z_s | z_t) = N(keep·z_t + take·x̂, σ²_θ), carrying the network's ``eps_hat`` and
    ``log_variance`` (log σ²_θ) and whether σ²_θ is the posterior's (``small``).  Built from
    ``loc`` and ``scale`` alone (as Pyro's reparameterizers rebuild a distribution) it is a
    plain Normal, and its KL is the Normal one."""

    def __init__(self, loc, scale, eps_hat=None, log_variance=None, small: bool = False, validate_args=None):
        super().__init__(loc, scale, validate_args=validate_args)
        if eps_hat is not None and eps_hat.shape != self.batch_shape:
            eps_hat = eps_hat.expand(self.batch_shape)
        self.eps_hat = eps_hat
        self.log_variance = log_variance
        self.small = small

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return type(self)(
            self.loc.expand(batch_shape),
            self.scale.expand(batch_shape),
            None if self.eps_hat is None else self.eps_hat.expand(batch_shape),
            self.log_variance,
            self.small,
        )


@register_kl(ForwardStep, ReverseStep)
def _kl_forward_reverse(q: ForwardStep, p: ReverseStep):
    if p.eps_hat is None:  # a plain Normal: the Gaussian KL from the means and scales
        log_ratio = 2 * (torch.log(p.scale) - torch.log(q.scale))
        return 0.5 * (log_ratio + torch.exp(-log_ratio) - 1 + ((q.loc - p.loc) / p.scale) ** 2)
    coef = q.coefficients
    squared = (q.eps - p.eps_hat) ** 2
    if p.small:  # same variance: ½ (SNR_s/SNR_t − 1)(ε − ε̂)²
        return 0.5 * coef.expm1_delta * squared
    log_q, log_p = coef.log_small, p.log_variance
    return 0.5 * (log_p - log_q + torch.exp(log_q - log_p) - 1 + torch.exp(coef.log_gap - log_p) * squared)


class ForwardTransition(dist.Normal):
    """A forward kernel q(x_t | x_{t-1}) of the forward-order guide.  ``kl_divergence`` against
    the model's step raises ``NotImplementedError``, so analytic-KL estimators use
    ``log p − log q`` at these sites (which is unbiased); no pairing returns a wrong value."""

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return ForwardTransition(self.loc.expand(batch_shape), self.scale.expand(batch_shape))


@register_kl(ForwardTransition, dist.Normal)
def _no_kl_for_forward_order(p, q):
    raise NotImplementedError(
        "q(x_t | x_{t-1}) of the forward-order guide has no per-site KL against the model's "
        "p(x_t | x_{t+1}); the estimator must use log p - log q at this site"
    )


class InfinitesimalStep(dist.TorchDistribution):
    r"""A step of zero width at level γ(t), for the continuous-time bound.

    As s → t, KL(q(z_s|z_t,x) ‖ p_θ(z_s|z_t)) / (t − s) → ½ γ'(t) (ε − ε̂)²: this distribution
    carries ``value`` (the point z_t where the step sits; its draws), ``eps`` (the guide's ε or
    the model's ε̂) and ``rate`` (γ'(t)), and ``kl_divergence`` between two of them is that
    limit.  A step of zero width has no density: ``log_prob`` is NaN, so only analytic-KL
    estimators (``TraceMeanField_ELBO``, ``DiffusionELBO``) give a number."""

    arg_constraints = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, value: torch.Tensor, eps: torch.Tensor, rate: torch.Tensor, validate_args=None):
        self.value, self.eps, self.rate = value, eps, rate
        super().__init__(value.shape, torch.Size(), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return InfinitesimalStep(self.value.expand(batch_shape), self.eps.expand(batch_shape), self.rate)

    def rsample(self, sample_shape=torch.Size()):
        return self.value.expand(self._extended_shape(sample_shape))

    def log_prob(self, value):
        return torch.full_like(value, math.nan)


@register_kl(InfinitesimalStep, InfinitesimalStep)
def _kl_infinitesimal(q: InfinitesimalStep, p: InfinitesimalStep):
    return 0.5 * q.rate * (q.eps - p.eps) ** 2


# ---------------------------------------------------------------------------- drawing the steps
def uniform_times(batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``batch`` independent draws u ~ U(0, 1), float64."""
    return torch.rand(batch, dtype=torch.float64, device=device, generator=generator)


def low_discrepancy_times(batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``u_k = (u + k/B) mod 1`` for k = 0..B−1 with one u ~ U(0, 1): each u_k ~ U(0, 1)
    marginally, and the B times are evenly spaced (VDM's low-discrepancy sampler), float64."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive integer, got {batch!r}")
    u = torch.rand((), dtype=torch.float64, device=device, generator=generator)
    return torch.remainder(u + torch.arange(batch, dtype=torch.float64, device=device) / batch, 1.0)


class StepLevels(NamedTuple):
    """The noise levels of one step per datum (all float64 ``(B,)`` unless said).

    ``gamma_t`` the upper level; ``gamma_s`` the lower level (discrete; a finite stand-in
    where the step is the decoder) or None (continuous); ``rate`` γ'(t) (continuous) or None;
    ``on_decoder`` bool ``(B,)``, the data whose step is the decoder, or None when the decoder
    is computed for every datum; ``weight`` 1/r(t); ``gamma_1``, ``gamma_T`` the decoder's and
    the prior's levels (scalars); ``index`` the 1-based step (discrete) or None;
    ``shape_outputs`` a learned schedule's shape tensors (continuous time); ``first`` and
    ``num_candidates`` the smallest step drawn and how many steps were drawn among."""

    gamma_t: torch.Tensor
    gamma_s: torch.Tensor | None
    rate: torch.Tensor | None
    on_decoder: torch.Tensor | None
    weight: torch.Tensor
    gamma_1: torch.Tensor
    gamma_T: torch.Tensor
    index: torch.Tensor | None
    shape_outputs: tuple = ()
    first: int = 2
    num_candidates: int = 0


class StepDraw:
    """One draw of the estimator's step per datum, shared by the model and the guide.

    The programs call :meth:`levels` with their diffusion, grid and batch size; the first call
    draws (and evaluates the schedule once, so that both programs use the same tensors), later
    calls return the same :class:`StepLevels`.  A loss makes a new draw for every evaluation.

    Args:
        times: ``"uniform"``, ``"low-discrepancy"`` (evenly spaced with a random shift: each
            datum's step is still uniform) or ``"importance"`` (r(t) from ``probabilities``).
        probabilities: for ``"importance"``, a function ``(n, device) -> (n,)`` giving r over
            the n candidate steps of the grid (or None while it has no estimate: uniform).
        detach_mean: the model's reverse means use a detached x̂ (the hybrid loss).
        index: fixed 1-based steps ``(B,)`` instead of a random draw (tests, profiles).
        times_values: fixed times ``u`` ``(B,)`` in [0, 1] instead of a random draw.
    """

    def __init__(
        self,
        times: str = "uniform",
        *,
        probabilities: Callable | None = None,
        detach_mean: bool = False,
        index: torch.Tensor | None = None,
        times_values: torch.Tensor | None = None,
    ) -> None:
        if times not in TIME_SAMPLERS:
            raise ValueError(f"times: expected one of {TIME_SAMPLERS}, got {times!r}")
        self.times = times
        self.probabilities = probabilities
        self.detach_mean = detach_mean
        self.fixed_index = index
        self.fixed_times = times_values
        self._levels: StepLevels | None = None
        self._key = None
        self._coefficients: dict = {}

    def coefficients(self, like: torch.Tensor) -> StepCoefficients:
        """The drawn steps' :func:`~pyro_diffusion.parameterization.step_coefficients`, cast
        for ``like`` and computed once per draw (the guide's and the model's step share them)."""
        key = (like.dtype, like.dim(), torch.is_grad_enabled())
        cached = self._coefficients.get(key)
        if cached is None:
            levels = self._levels
            cached = self._coefficients[key] = step_coefficients(levels.gamma_s, levels.gamma_t, like)
        return cached

    @property
    def drawn(self) -> StepLevels | None:
        """The levels of this draw once a program has asked for them (else None)."""
        return self._levels

    def levels(self, diffusion, num_steps: int, batch: int, device) -> StepLevels:
        key = (id(diffusion), num_steps, batch)
        if self._levels is not None:
            if key != self._key:
                raise ValueError(
                    "steps: this StepDraw was already used for another diffusion, grid or batch; "
                    "make one StepDraw per evaluation"
                )
            return self._levels
        self._key = key
        self._levels = self._draw(diffusion, num_steps, batch, device)
        return self._levels

    def _uniform(self, batch, device) -> torch.Tensor:
        if self.fixed_times is not None:
            u = self.fixed_times
            if not isinstance(u, torch.Tensor) or not u.is_floating_point() or u.shape != (batch,):
                raise ValueError(f"times_values: expected a float tensor of shape ({batch},), got {u!r:.80}")
            if not ((u >= 0) & (u <= 1)).all():
                raise ValueError("times_values: expected times in [0, 1]")
            return u.to(device=device, dtype=torch.float64)
        sampler = low_discrepancy_times if self.times == "low-discrepancy" else uniform_times
        return sampler(batch, device=device)

    def _draw(self, diffusion, num_steps: int, batch: int, device) -> StepLevels:
        schedule = diffusion.schedule
        if num_steps == 0:  # continuous time
            at = schedule(self._uniform(batch, device))
            gamma_1, gamma_T = schedule.endpoint_levels()
            weight = torch.ones(batch, dtype=torch.float64, device=device)
            return StepLevels(
                at.gamma, None, at.derivative, None, weight, gamma_1, gamma_T, None, at.shape_outputs
            )
        grid = diffusion.grid(num_steps).to(device)
        T = grid.shape[0]
        first = 1 if diffusion.decoder_uses_network else 2  # the smallest step drawn
        n = T - first + 1
        if n < 1:
            raise ValueError(
                f"num_steps: a {diffusion.decoder!r} decoder is computed for every datum, so the "
                f"one-step estimator needs T >= 2 noise levels, got T = {T}"
            )
        probs = None
        if self.fixed_index is not None:
            index = self.fixed_index
            if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.shape != (batch,):
                raise ValueError(f"index: expected a LongTensor of shape ({batch},), got {index!r:.80}")
            if not ((index >= first) & (index <= T)).all():
                raise ValueError(f"index: steps must lie in {first}..{T} (the candidate steps of this grid)")
            index = index.to(device)
            weight = torch.full((batch,), float(n), dtype=torch.float64, device=device)
        elif self.times == "importance" and self.probabilities is not None:
            probs = self.probabilities(n, device)
        if self.fixed_index is None:
            if probs is None:
                u = self._uniform(batch, device)
                index = first + torch.clamp((u * n).long(), max=n - 1)
                weight = torch.full((batch,), float(n), dtype=torch.float64, device=device)
            else:
                offset = torch.multinomial(probs, batch, replacement=True)
                index = first + offset
                weight = 1.0 / probs[offset].to(torch.float64)
        gamma_t = grid[index - 1]
        lower = grid[(index - 2).clamp(min=0)]
        on_decoder = None
        if first == 1:
            on_decoder = index == 1
            # a finite stand-in, masked out (per-dimension levels: one flag per datum)
            flag = on_decoder.reshape(on_decoder.shape + (1,) * (gamma_t.dim() - 1))
            lower = torch.where(flag, gamma_t - 1.0, lower)
        return StepLevels(gamma_t, lower, None, on_decoder, weight, grid[0], grid[-1], index, (), first, n)


# ---------------------------------------------------------------------------- full chains
def forward_guide(diffusion, x0: torch.Tensor, grid: torch.Tensor, order: str = "posterior") -> dict:
    """Sample the forward chain on ``grid`` as Pyro sites ``x_T … x_1``; returns ``{t: x_t}``."""
    if order not in GUIDE_ORDERS:
        raise ValueError(f"order: expected one of {GUIDE_ORDERS}, got {order!r}")
    T = grid.shape[0]
    event_dims = diffusion.event_dims
    values: dict[int, torch.Tensor] = {}
    with pyro.plate(diffusion.plate_name, x0.shape[0]):
        if order == "posterior":
            x_t = pyro.sample(site_name(T), _event(diffusion.marginal(x0, grid[T - 1]), event_dims))
            values[T] = x_t
            for t in range(T, 1, -1):
                q = diffusion.forward_step(x0, x_t, grid[t - 2], grid[t - 1])
                x_t = pyro.sample(site_name(t - 1), _event(q, event_dims))
                values[t - 1] = x_t
        else:
            # q(x_1 | x_0) as a forward kernel: a marginal would pair analytically with the
            # model's p(x_1 | x_2), a KL that conditions on an x_2 drawn after x_1
            first = diffusion.marginal(x0, grid[0])
            x_prev = pyro.sample(site_name(1), _event(ForwardTransition(first.loc, first.scale), event_dims))
            values[1] = x_prev
            for t in range(2, T + 1):
                q = diffusion.forward_transition(x_prev, grid[t - 2], grid[t - 1])
                x_prev = pyro.sample(site_name(t), _event(q, event_dims))
                values[t] = x_prev
    return values


def reverse_model(diffusion, x0: torch.Tensor | None, num_samples: int | None, grid: torch.Tensor):
    """Sample the reverse chain on ``grid`` as Pyro sites (x_0 observed when given); returns x_0."""
    event_dims = diffusion.event_dims
    n = x0.shape[0] if x0 is not None else num_samples
    T = grid.shape[0]
    dtype = x0.dtype if x0 is not None else torch.get_default_dtype()
    with pyro.plate(diffusion.plate_name, n):
        zeros = torch.zeros((n, *diffusion.event_shape), dtype=dtype, device=diffusion.device)
        x_t = pyro.sample(site_name(T), _event(dist.Normal(zeros, 1.0 + zeros), event_dims))
        for t in range(T, 1, -1):
            p, _ = diffusion.reverse_step(x_t, grid[t - 2], grid[t - 1])
            x_t = pyro.sample(site_name(t - 1), _event(p, event_dims))
        decoder = diffusion.decoder_distribution(x_t, diffusion.levels(grid[0], x_t))
        return pyro.sample(site_name(0), _event(decoder, event_dims), obs=x0)


# ---------------------------------------------------------------------------- step-restricted forms
def _scaled(weight: torch.Tensor, dtype):
    return poutine.scale(scale=weight.to(dtype))


def _masked(mask: torch.Tensor | None):
    return poutine.mask(mask=mask) if mask is not None else poutine.mask(mask=True)


def step_guide(diffusion, x0: torch.Tensor, levels: StepLevels, draw: StepDraw | None = None) -> torch.Tensor:
    """The forward chain restricted to one step per datum (module docstring); returns x_t.
    ``draw``: the :class:`StepDraw` the levels come from (its step coefficients are shared)."""
    event_dims = diffusion.event_dims
    with pyro.plate(diffusion.plate_name, x0.shape[0]):
        pyro.sample("x_T", _event(diffusion.marginal(x0, levels.gamma_T), event_dims))
        with _scaled(levels.weight, x0.dtype):
            upper = diffusion.marginal(x0, levels.gamma_t)
            x_t = pyro.sample("x_t", _event(upper, event_dims))
            eps = (x_t - upper.loc) / upper.scale  # the noise that took x_0 to x_t
            if levels.gamma_s is None:
                q = InfinitesimalStep(x_t, eps, broadcast(levels.rate, x_t))
            else:
                coefficients = draw.coefficients(x0) if draw is not None else None
                q = diffusion.forward_step(
                    x0, x_t, levels.gamma_s, levels.gamma_t, eps=eps, coefficients=coefficients
                )
            with _masked(None if levels.on_decoder is None else ~levels.on_decoder):
                pyro.sample("x_s", _event(q, event_dims))
        if levels.on_decoder is None:
            pyro.sample("x_1", _event(diffusion.marginal(x0, levels.gamma_1), event_dims))
    return x_t


def step_model(
    diffusion, x0: torch.Tensor, levels: StepLevels, detach_mean: bool = False, draw: StepDraw | None = None
) -> torch.Tensor:
    """The reverse chain restricted to one step per datum (module docstring); returns x_0.
    ``draw`` as in :func:`step_guide`."""
    event_dims = diffusion.event_dims
    with pyro.plate(diffusion.plate_name, x0.shape[0]):
        zeros = torch.zeros_like(x0)
        pyro.sample("x_T", _event(dist.Normal(zeros, 1.0 + zeros), event_dims))
        with _scaled(levels.weight, x0.dtype):
            x_t = pyro.sample("x_t", _event(diffusion.marginal(x0, levels.gamma_t), event_dims))
            if levels.gamma_s is None:
                prediction, variance_output = diffusion.predict(x_t, levels.gamma_t)
                eps_hat = prediction.eps.detach() if detach_mean else prediction.eps
                p = InfinitesimalStep(x_t, eps_hat, broadcast(levels.rate, x_t))
            else:
                p, (prediction, variance_output) = diffusion.reverse_step(
                    x_t,
                    levels.gamma_s,
                    levels.gamma_t,
                    detach_mean=detach_mean,
                    coefficients=draw.coefficients(x0) if draw is not None else None,
                )
            pyro.deterministic("eps_hat", prediction.eps, event_dim=event_dims)
            with _masked(None if levels.on_decoder is None else ~levels.on_decoder):
                pyro.sample("x_s", _event(p, event_dims))
            if levels.on_decoder is not None:
                # the decoder's term counts only where the step is the decoder; elsewhere its
                # location is x_0 itself, so the masked-out terms stay finite (far-off
                # locations give a discretized log-mass with NaN gradients in float32)
                on_decoder = levels.on_decoder.reshape((-1,) + (1,) * event_dims)
                located = Prediction(torch.where(on_decoder, prediction.x0, x0), prediction.eps)
                decoder = diffusion.decoder_distribution(
                    x_t,
                    diffusion.levels(levels.gamma_1, x_t),
                    located,
                    variance_output,
                    detach_mean=detach_mean,
                )
                with poutine.mask(mask=levels.on_decoder):
                    pyro.sample("x_0", _event(decoder, event_dims), obs=x0)
        if levels.on_decoder is None:
            x_1 = pyro.sample("x_1", _event(diffusion.marginal(x0, levels.gamma_1), event_dims))
            decoder = diffusion.decoder_distribution(
                x_1, diffusion.levels(levels.gamma_1, x_1), detach_mean=detach_mean
            )
            pyro.sample("x_0", _event(decoder, event_dims), obs=x0)
    return x0


# ---------------------------------------------------------------------------- reading traces
def per_site_kl(model_trace, guide_trace) -> dict[str, torch.Tensor]:
    """The analytic KL(guide ‖ model) at each latent site, per datum, scaled and masked as the
    guide site says (what ``TraceMeanField_ELBO`` sums); sites without one are left out."""
    out = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if name not in guide_trace.nodes:
            continue
        guide_site = guide_trace.nodes[name]
        try:
            kl = kl_divergence(guide_site["fn"], site["fn"])
        except NotImplementedError:
            continue
        out[name] = scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
    return out


# ---------------------------------------------------------------------------- nn.Module forms
class ReverseChain(PyroModule):
    """The model as an ``nn.Module``: ``forward(x0=None, **kwargs)`` runs ``diffusion.model``
    under ``pyro.settings`` ``module_local_params=True``, so the diffusion's parameters stay
    ordinary module parameters and nothing enters Pyro's param store.  Its parameters are the
    diffusion's, so ``loss(ReverseChain(d), ForwardChain(d))`` is an ``ELBOModule`` that a plain
    PyTorch (or Lightning, or DDP) loop optimizes with a torch optimizer."""

    def __init__(self, diffusion) -> None:
        super().__init__()
        self.diffusion = diffusion

    def forward(self, x0=None, **kwargs):
        with pyro.settings.context(module_local_params=True):
            return self.diffusion.model(x0, **kwargs)


class ForwardChain(PyroModule):
    """The guide as an ``nn.Module`` with no parameters of its own (the diffusion is held, not
    registered): ``forward(x0, **kwargs)`` runs ``diffusion.guide`` in ``order``, with
    module-local parameters like :class:`ReverseChain`."""

    def __init__(self, diffusion, order: str = "posterior") -> None:
        super().__init__()
        if order not in GUIDE_ORDERS:
            raise ValueError(f"order: expected one of {GUIDE_ORDERS}, got {order!r}")
        object.__setattr__(self, "_diffusion", diffusion)
        self.order = order

    def forward(self, x0=None, **kwargs):
        kwargs.setdefault("order", self.order)
        with pyro.settings.context(module_local_params=True):
            return self._diffusion.guide(x0, **kwargs)
