r"""The two chains as Pyro programs over the same sites ``x_T … x_1`` (and ``x_0``).

**Guide** — the forward (noising) chain q(x_{1:T} | x_0), no parameters, two factorizations
of the same joint (DESIGN.md §1):

* posterior order (default): ``x_T ~ q(x_T | x_0)``, then for t = T..2
  ``x_{t-1} ~ q(x_{t-1} | x_t, x_0)``.  Its sites come in the model's order and each depends
  on the same variables as the model's, which is the condition under which
  :class:`pyro.infer.TraceMeanField_ELBO` is exact: at ``x_{t-1}`` it takes
  KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)), at ``x_T`` KL(q(x_T|x_0) ‖ N(0, I)).
* forward order: for t = 1..T ``x_t ~ q(x_t | x_{t-1})``.  Same joint, but an analytic
  per-site KL against the model would compare the wrong conditionals.  The transition
  kernels are therefore :class:`ForwardTransitionNormal`, for which ``kl_divergence``
  against a Normal is deliberately *not* available: ``TraceMeanField_ELBO`` falls back on
  the Monte Carlo term ``log p − log q`` at every such site (the ``Trace_ELBO`` estimate),
  which is unbiased for the true ELBO.  With Pyro's validation on it also warns that the
  site orders differ.  No pairing returns a wrong value.

**Model** — the reverse chain p_θ(x_{0:T}): ``x_T ~ N(0, I)``, ``x_{t-1} ~ p_θ(x_{t-1} | x_t)``
for t = T..2 and ``x_0 ~`` decoder, observed when data is given.

All sites live in one ``pyro.plate`` over the batch and have event shape ``event_shape``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence, register_kl

from .schedule import NoiseSchedule

__all__ = [
    "site_name",
    "ForwardTransitionNormal",
    "forward_marginal",
    "forward_posterior",
    "forward_transition",
    "forward_guide",
    "reverse_model",
    "ForwardChain",
    "ReverseChain",
]

GUIDE_ORDERS = ("posterior", "forward")


def site_name(t: int, prefix: str = "") -> str:
    """The Pyro site of x_t: ``"x_{t}"`` with the paper's 1-based t (``x_0`` is data)."""
    return f"{prefix}x_{t}"


class ForwardTransitionNormal(dist.Normal):
    """A forward kernel q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t).  A plain Normal, except that
    ``kl_divergence(ForwardTransitionNormal, Normal)`` raises ``NotImplementedError`` so that
    analytic-KL estimators fall back on Monte Carlo at these sites (see module docstring)."""

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return ForwardTransitionNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape))


@register_kl(ForwardTransitionNormal, torch.distributions.Normal)
def _no_analytic_kl_for_forward_order(p, q):
    raise NotImplementedError(
        "q(x_t | x_{t-1}) from the forward-order guide has no per-site KL against the model's "
        "p(x_t | x_{t+1}); the estimator must use log p - log q at this site"
    )


def _event(distribution, event_dims: int):
    return distribution.to_event(event_dims) if event_dims else distribution


# ---------------------------------------------------------------------------- forward pieces
def forward_marginal(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor) -> dist.Normal:
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), batch-shaped like ``x0``."""
    loc = schedule.at("sqrt_alphas_cumprod", t, x0) * x0
    scale = schedule.at("sqrt_one_minus_alphas_cumprod", t, x0).expand_as(x0)
    return dist.Normal(loc, scale)


def forward_posterior(schedule: NoiseSchedule, x0, x_t, t) -> dist.Normal:
    """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) for t ≥ 2 (β̃_1 = 0)."""
    loc = (
        schedule.at("posterior_mean_coef_x0", t, x_t) * x0
        + schedule.at("posterior_mean_coef_xt", t, x_t) * x_t
    )
    scale = schedule.at("posterior_variance", t, x_t).sqrt().expand_as(x_t)
    return dist.Normal(loc, scale)


def forward_transition(schedule: NoiseSchedule, x_prev, t) -> ForwardTransitionNormal:
    """q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t I)."""
    loc = schedule.at("alphas", t, x_prev).sqrt() * x_prev
    scale = schedule.at("betas", t, x_prev).sqrt().expand_as(x_prev)
    return ForwardTransitionNormal(loc, scale)


def _steps(t: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), t, dtype=torch.long, device=like.device)


def forward_guide(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    event_dims: int,
    order: str = "posterior",
    plate_name: str = "data",
    prefix: str = "",
) -> dict[int, torch.Tensor]:
    """Sample the forward chain as Pyro sites; returns ``{t: x_t}``."""
    if order not in GUIDE_ORDERS:
        raise ValueError(f"order: expected one of {GUIDE_ORDERS}, got {order!r}")
    T = schedule.num_steps
    values: dict[int, torch.Tensor] = {}
    with pyro.plate(plate_name, x0.shape[0]):
        if order == "posterior":
            x_t = pyro.sample(
                site_name(T, prefix), _event(forward_marginal(schedule, x0, _steps(T, x0)), event_dims)
            )
            values[T] = x_t
            for t in range(T, 1, -1):
                q = forward_posterior(schedule, x0, x_t, _steps(t, x0))
                x_t = pyro.sample(site_name(t - 1, prefix), _event(q, event_dims))
                values[t - 1] = x_t
        else:
            x_prev = x0
            for t in range(1, T + 1):
                q = forward_transition(schedule, x_prev, _steps(t, x0))
                x_prev = pyro.sample(site_name(t, prefix), _event(q, event_dims))
                values[t] = x_prev
    return values


# ---------------------------------------------------------------------------- reverse chain
def reverse_model(diffusion, x0: torch.Tensor | None, num_samples: int | None, prefix: str = ""):
    """Sample the reverse chain as Pyro sites (x_0 observed when ``x0`` is given); returns x_0.

    ``diffusion`` supplies ``schedule``, ``event_shape``, ``plate_name`` and
    ``reverse_distribution(x_t, t)`` (the batch-shaped p_θ(x_{t-1} | x_t), decoder at t = 1).
    """
    schedule = diffusion.schedule
    event_dims = len(diffusion.event_shape)
    n = x0.shape[0] if x0 is not None else num_samples
    T = schedule.num_steps
    device = schedule.betas.device
    dtype = x0.dtype if x0 is not None else torch.get_default_dtype()
    with pyro.plate(diffusion.plate_name, n):
        zeros = torch.zeros((n, *diffusion.event_shape), dtype=dtype, device=device)
        x_t = pyro.sample(site_name(T, prefix), _event(dist.Normal(zeros, 1.0 + zeros), event_dims))
        for t in range(T, 0, -1):
            p = diffusion.reverse_distribution(x_t, _steps(t, x_t), decode=t == 1)
            observed = x0 if t == 1 else None
            x_t = pyro.sample(site_name(t - 1, prefix), _event(p, event_dims), obs=observed)
    return x_t


# ---------------------------------------------------------------------------- nn.Module forms
class ReverseChain(PyroModule):
    """The model as an ``nn.Module``: ``forward(x0=None, num_samples=None)`` runs
    :meth:`GaussianDiffusion.model`.  Its parameters are the diffusion's (the denoiser's), so
    ``TraceMeanField_ELBO()(ReverseChain(d), ForwardChain(d))`` is an ``ELBOModule`` a plain
    PyTorch (or Lightning) loop can optimize."""

    def __init__(self, diffusion) -> None:
        super().__init__()
        self.diffusion = diffusion

    def forward(self, x0=None, num_samples=None):
        return self.diffusion.model(x0, num_samples=num_samples)


class ForwardChain(PyroModule):
    """The guide as an ``nn.Module`` (no parameters): ``forward(x0)`` runs the forward chain in
    ``order`` ("posterior" or "forward")."""

    def __init__(self, diffusion, order: str = "posterior") -> None:
        super().__init__()
        if order not in GUIDE_ORDERS:
            raise ValueError(f"order: expected one of {GUIDE_ORDERS}, got {order!r}")
        # hold the diffusion without registering it, so the guide owns no parameters
        object.__setattr__(self, "_diffusion", diffusion)
        self.order = order

    def forward(self, x0=None, num_samples=None):
        return self._diffusion.guide(x0, num_samples=num_samples, order=self.order)


def per_site_kl(model_trace, guide_trace) -> dict[str, torch.Tensor]:
    """The analytic KL(guide ‖ model) at each latent site, per datum (what
    ``TraceMeanField_ELBO`` sums); sites without an analytic KL are left out."""
    out = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if name not in guide_trace.nodes:
            continue
        try:
            out[name] = kl_divergence(guide_trace.nodes[name]["fn"], site["fn"])
        except NotImplementedError:
            continue
    return out
