r"""Variational inference for p_θ(x_0 | y): a guide over x_0, the forward chain over the rest.

The joint model is the diffusion prior (:class:`~pyro_diffusion.inference.prior.DiffusionPrior`,
frozen) followed by the observation, ``x_{0:T} ~ p_θ``, ``y ~ p(y | x_0)``.  The guide is

.. math::

    q_φ(x_{0:T}) = q_φ(x_0)\; q(x_T \mid x_0) \prod_{t=T}^{2} q(x_{t-1} \mid x_t, x_0),

a learnable guide over x_0 (by default a mean-field Normal) followed by the diffusion's own
forward chain in posterior order (:func:`chain_guide`, no parameters).  Its ELBO

.. math::

    \mathbb E_{q_φ(x_0)}\big[\log p(y \mid x_0) + \mathrm{ELBO}_θ(x_0) − \log q_φ(x_0)\big]
    \le \log p_θ(y)

holds ELBO_θ(x_0) ≤ log p_θ(x_0) inside, the diffusion bound of DESIGN.md §2, so maximizing
it over φ fits q_φ(x_0) to p_θ(x_0 | y) (mode-seeking, as any KL(q‖p) fit).  With
:class:`pyro.infer.TraceMeanField_ELBO` the chain's sites get their analytic per-step KLs
(each guide site ``x_{t-1}`` depends only on ``x_t`` and ``x_0``, both drawn before it, and
the model's only on ``x_t``); the ``x_0`` site has no analytic KL (the model's x_0 depends
on x_1, drawn *after* it in the guide), so the guide's x_0 distribution is a
:class:`MonteCarloNormal` for which ``kl_divergence`` refuses and the estimator uses
``log p − log q`` there.  Cost: T network calls per ELBO evaluation (one batched call per
step for all particles).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import ClippedAdam
from torch.distributions import constraints, register_kl
from tqdm.auto import tqdm

from ..chains import forward_marginal, forward_posterior, site_name
from ..diffusion import GaussianDiffusion
from .observations import LinearObservation, check_conditioning
from .prior import DiffusionPrior

__all__ = ["MonteCarloNormal", "chain_guide", "svi_conditional", "SVIResult"]


class MonteCarloNormal(dist.Normal):
    """A Normal for which ``kl_divergence(MonteCarloNormal, Normal)`` raises
    ``NotImplementedError``, so analytic-KL estimators use ``log p − log q`` at its site."""

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return MonteCarloNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape))


@register_kl(MonteCarloNormal, dist.Normal)
def _refuse_kl(p, q):
    raise NotImplementedError("the guide's x_0 site is estimated by Monte Carlo")


def _steps_for(diffusion: GaussianDiffusion, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1, *diffusion.event_shape)
    return flat, torch.full((flat.shape[0],), t, dtype=torch.long, device=flat.device)


def chain_guide(diffusion: GaussianDiffusion, x0: torch.Tensor, name: str) -> torch.Tensor:
    r"""The forward chain in posterior order as guide sites for a :class:`DiffusionPrior`
    called with the same ``name``: ``{name}/x_T ~ q(x_T | x_0)``, then for t = T..2
    ``{name}/x_{t-1} ~ q(x_{t-1} | x_t, x_0)``.  ``x0``: ``(*batch, *event_shape)``, batch
    dimensions laid out as the caller's plates lay them out.  No parameters.  Returns x_1."""
    schedule = diffusion.schedule
    event_dims = diffusion.event_dims
    T = diffusion.num_steps
    flat0, steps = _steps_for(diffusion, x0, T)
    q = forward_marginal(schedule, flat0, steps)
    x_t = pyro.sample(
        site_name(T, f"{name}/"),
        dist.Normal(q.loc.reshape(x0.shape), q.scale.reshape(x0.shape)).to_event(event_dims),
    )
    for t in range(T, 1, -1):
        flat_t, steps = _steps_for(diffusion, x_t, t)
        q = forward_posterior(schedule, flat0, flat_t, steps)
        x_t = pyro.sample(
            site_name(t - 1, f"{name}/"),
            dist.Normal(q.loc.reshape(x0.shape), q.scale.reshape(x0.shape)).to_event(event_dims),
        )
    return x_t


@dataclass
class SVIResult:
    """What :func:`svi_conditional` returns.

    Attributes:
        loc, scale: the fitted mean-field q_φ(x_0), each ``event_shape``.
        losses: the loss (−ELBO estimate, nats) at every step.
        seconds, network_calls: cost of the fit.
    """

    loc: torch.Tensor
    scale: torch.Tensor
    losses: list[float]
    seconds: float
    network_calls: int
    extra: dict = field(default_factory=dict)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws from q_φ(x_0), ``(num_samples, *event_shape)``."""
        noise = torch.randn((num_samples, *self.loc.shape), generator=generator)
        return self.loc + self.scale * noise


def svi_conditional(
    diffusion: GaussianDiffusion,
    observation: LinearObservation,
    y: torch.Tensor,
    *,
    num_steps: int = 500,
    num_particles: int = 16,
    lr: float = 0.02,
    init_scale: float = 0.3,
    seed: int = 0,
    progress: bool = False,
) -> SVIResult:
    """Fit a mean-field Normal q_φ(x_0) to p_θ(x_0 | y) by SVI (see the module docstring).

    Args:
        diffusion: the trained diffusion (a discretized decoder is relaxed to a Gaussian).
        observation, y: the observation model and one observation ``(m,)``.
        num_steps: optimizer steps; num_particles: draws per ELBO estimate (a plate).
        lr: Adam's learning rate; init_scale: initial standard deviation of q_φ(x_0).
    """
    check_conditioning(diffusion, observation, y)
    for arg, value in (("num_steps", num_steps), ("num_particles", num_particles)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    prior = DiffusionPrior(diffusion, decoder="gaussian")
    shape = diffusion.event_shape
    scale_factor = 1.0 / num_particles

    def model():
        with poutine.scale(scale=scale_factor), pyro.plate("particles", num_particles, dim=-1):
            x0 = prior("x")
            pyro.sample("y", observation.distribution(x0), obs=y)

    def guide():
        loc = pyro.param("q_x0.loc", lambda: torch.zeros(shape))
        scale = pyro.param(
            "q_x0.scale", lambda: torch.full(shape, init_scale), constraint=constraints.positive
        )
        with poutine.scale(scale=scale_factor), pyro.plate("particles", num_particles, dim=-1):
            x0 = pyro.sample(site_name(0, "x/"), MonteCarloNormal(loc, scale).to_event(len(shape)))
            chain_guide(diffusion, x0, "x")

    calls = [0]

    def count(module, args, output):
        calls[0] += 1

    handle = diffusion.denoiser.register_forward_hook(count)
    start = time.perf_counter()
    svi = SVI(model, guide, ClippedAdam({"lr": lr, "clip_norm": 10.0}), TraceMeanField_ELBO())
    try:
        with warnings.catch_warnings():
            # x_0 comes first in the guide and last in the model; the mean-field check is
            # sufficient, not necessary, and the x_0 site is Monte Carlo (module docstring)
            warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
            losses = [
                svi.step() for _ in tqdm(range(num_steps), desc="SVI", disable=not progress, leave=False)
            ]
    finally:
        handle.remove()
    store = pyro.get_param_store()
    result = SVIResult(
        loc=store["q_x0.loc"].detach().clone(),
        scale=store["q_x0.scale"].detach().clone(),
        losses=losses,
        seconds=time.perf_counter() - start,
        network_calls=calls[0],
        extra={"num_particles": num_particles, "lr": lr},
    )
    pyro.clear_param_store()
    return result
