r"""Variational inference for p_θ(x_0 | y): a guide over x_0, the forward chain over the rest.

The joint model is the diffusion prior (:class:`~pyro_diffusion.inference.prior.DiffusionPrior`,
frozen) followed by the observation, ``x_{0:T} ~ p_θ``, ``y ~ p(y | x_0)``.  The guide is

.. math::

    q_φ(x_{0:K}) = q_φ(x_0)\; q(x_K \mid x_0) \prod_{k=K}^{2} q(x_{k-1} \mid x_k, x_0),

a learnable guide over x_0 (by default a mean-field Normal) followed by the diffusion's own
forward chain in posterior order (:func:`chain_guide`, no parameters).  Its ELBO

.. math::

    \mathbb E_{q_φ(x_0)}\big[\log p(y \mid x_0) + \mathrm{ELBO}_θ(x_0) − \log q_φ(x_0)\big]
    \le \log p_θ(y)

holds ELBO_θ(x_0) ≤ log p_θ(x_0) inside (the diffusion's own variational bound on the same
grid), so maximizing
it over φ fits q_φ(x_0) to p_θ(x_0 | y) (mode-seeking, as any KL(q‖p) fit).  With
:class:`pyro.infer.TraceMeanField_ELBO` the chain's sites get their analytic per-step KLs
(each guide site ``x_{k-1}`` depends only on ``x_k`` and ``x_0``, both drawn before it, and
the model's only on ``x_k``); the ``x_0`` site has no analytic KL (the model's x_0 depends
on x_1, drawn *after* it in the guide), so the guide's x_0 distribution is a
:class:`MonteCarloNormal` for which ``kl_divergence`` refuses and the estimator uses
``log p − log q`` there.  The chain lives on a grid of K levels of any
:class:`~pyro_diffusion.diffusion.Diffusion` (its own, or a sub-grid: ``num_steps``).  Cost:
K − 1 network calls per ELBO evaluation (one batched call per step for all particles), one
more when the decoder uses the network.

**Guides over the chain's noises** (``guide="noise-normal"`` or ``"noise-lowrank"``).  The
model is then the non-centred chain :func:`~pyro_diffusion.inference.nuts.noise_model` (one
site ``x/noise`` ~ N(0, I) of shape ``(K + 1, *event_shape)``, x_0 its deterministic image
down the chain), and the guide an autoguide over that site: Pyro's
:class:`~pyro.infer.autoguide.AutoNormal` (diagonal Normal, analytic KL to the prior with
:class:`~pyro.infer.TraceMeanField_ELBO`) or
:class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal` (``rank``, with
:class:`~pyro.infer.Trace_ELBO`).  Its ELBO, ``E_q[log p(y | x_0(z))] − KL(q(z) ‖ N(0, I))``,
bounds log p_θ(y) of the K-level chain directly (no inner diffusion bound), and q(x_0) is a
Gaussian pushed through the reverse chain, so it is not Gaussian; it is still a KL(q‖p) fit
and tends to sit in one mode of a multi-modal posterior.  The particles are vectorized
(``vectorize_particles=True``): K − 1 batched network calls (with their gradient) per step.
"""

from __future__ import annotations

import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal, init_to_value
from pyro.optim import ClippedAdam
from torch.distributions import constraints, register_kl
from tqdm.auto import tqdm

from ..chains import site_name
from ..diffusion import Diffusion
from .observations import LinearObservation, check_conditioning
from .prior import DiffusionPrior, check_diffusion, inference_grid
from .result import PosteriorResult

__all__ = ["MonteCarloNormal", "chain_guide", "svi_conditional", "GUIDES"]

#: the guides of :func:`svi_conditional` (module docstring)
GUIDES = ("mean-field", "noise-normal", "noise-lowrank")


class MonteCarloNormal(dist.Normal):
    """A Normal for which ``kl_divergence(MonteCarloNormal, Normal)`` raises
    ``NotImplementedError``, so analytic-KL estimators use ``log p − log q`` at its site."""

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return MonteCarloNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape))


@register_kl(MonteCarloNormal, dist.Normal)
def _refuse_kl(p, q):
    raise NotImplementedError("the guide's x_0 site is estimated by Monte Carlo")


def chain_guide(
    diffusion: Diffusion, x0: torch.Tensor, name: str, *, num_steps: int | None = None
) -> torch.Tensor:
    r"""The forward chain in posterior order as guide sites for a :class:`DiffusionPrior`
    called with the same ``name`` and ``num_steps``: ``{name}/x_K ~ q(x_K | x_0)``, then for
    k = K..2 ``{name}/x_{k-1} ~ q(x_{k-1} | x_k, x_0)`` on the grid ``diffusion.grid(num_steps)``
    (None: the model's own).  ``x0``: ``(*batch, *event_shape)``, batch dimensions laid out as
    the caller's plates lay them out.  No parameters.  Returns x_1."""
    check_diffusion(diffusion)
    event_dims = diffusion.event_dims
    if tuple(x0.shape[x0.dim() - event_dims :]) != tuple(diffusion.event_shape):
        raise ValueError(f"x0: expected trailing shape {tuple(diffusion.event_shape)}, got {tuple(x0.shape)}")
    grid = inference_grid(diffusion, num_steps)
    K = grid.shape[0]
    x_t = pyro.sample(site_name(K, f"{name}/"), diffusion.marginal(x0, grid[K - 1]).to_event(event_dims))
    for k in range(K, 1, -1):
        q = diffusion.forward_step(x0, x_t, grid[k - 2], grid[k - 1])
        x_t = pyro.sample(site_name(k - 1, f"{name}/"), dist.Normal(q.loc, q.scale).to_event(event_dims))
    return x_t


def svi_conditional(
    diffusion: Diffusion,
    observation: LinearObservation,
    y: torch.Tensor,
    *,
    num_iterations: int = 500,
    num_particles: int = 16,
    num_steps: int | None = None,
    lr: float = 0.02,
    init_scale: float = 0.3,
    num_draws: int = 1000,
    seed: int = 0,
    progress: bool = False,
    guide: str = "mean-field",
    rank: int = 8,
    reverse_variance=None,
) -> PosteriorResult:
    """Fit q_φ to p_θ(x_0 | y) by SVI (see the module docstring): by default a mean-field
    Normal q_φ(x_0) with the forward chain as the guide of x_{1:K}.

    Args:
        diffusion: the trained diffusion (a discretized decoder is relaxed to a Gaussian).
        observation, y: the observation model and one observation ``(m,)``.
        num_iterations: optimizer steps; num_particles: draws per ELBO estimate (a plate).
        num_steps: the grid: None (default) the model's own, K a K-level grid
            (``diffusion.grid(K)``, respaced for a tabulated schedule).
        lr: Adam's learning rate; init_scale: initial standard deviation of q_φ(x_0) (of
            the noises for the noise guides, whose location starts at 0, the prior's mean).
        num_draws: draws of the fitted q_φ(x_0) kept in the result's ``draws``
            (:meth:`~PosteriorResult.sample` draws afresh from q_φ).
        guide: ``"mean-field"`` (default), ``"noise-normal"`` or ``"noise-lowrank"``
            (module docstring).
        rank: the rank of ``"noise-lowrank"``'s covariance.
        reverse_variance: None (the model's reverse variances) or per-level variances from
            :func:`~pyro_diffusion.inference.variances.analytic_variances` on the K-level grid:
            the chain whose conditional is fitted (as in :class:`DiffusionPrior`).

    Returns:
        a :class:`~pyro_diffusion.inference.result.PosteriorResult` whose ``diagnostics``
        hold ``losses`` (the −ELBO estimate in nats at every step), ``seconds_per_step``,
        ``guide`` and, for the mean-field guide, the fitted ``loc`` and ``scale`` (each
        ``event_shape``).  ``network_calls`` counts batched denoiser calls.
    """
    check_conditioning(diffusion, observation, y)
    for arg, value in (
        ("num_iterations", num_iterations),
        ("num_particles", num_particles),
        ("num_draws", num_draws),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    for arg, value in (("lr", lr), ("init_scale", init_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{arg}: expected a positive number, got {value!r}")
    if guide not in GUIDES:
        raise ValueError(f"guide: expected one of {GUIDES}, got {guide!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    prior = DiffusionPrior(
        diffusion, num_steps=num_steps, decoder="gaussian", reverse_variance=reverse_variance
    )
    if guide != "mean-field":
        return _svi_noise(
            prior,
            observation,
            y,
            guide,
            rank,
            num_iterations,
            num_particles,
            lr,
            init_scale,
            num_draws,
            seed,
            progress,
        )
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    shape = diffusion.event_shape
    device = diffusion.device
    scale_factor = 1.0 / num_particles

    def model():
        with poutine.scale(scale=scale_factor), pyro.plate("particles", num_particles, dim=-1):
            x0 = prior("x")
            pyro.sample("y", observation.distribution(x0), obs=y)

    def x0_guide():
        loc = pyro.param("q_x0.loc", lambda: torch.zeros(shape, device=device))
        scale = pyro.param(
            "q_x0.scale",
            lambda: torch.full(shape, init_scale, device=device),
            constraint=constraints.positive,
        )
        with poutine.scale(scale=scale_factor), pyro.plate("particles", num_particles, dim=-1):
            x0 = pyro.sample(site_name(0, "x/"), MonteCarloNormal(loc, scale).to_event(len(shape)))
            chain_guide(diffusion, x0, "x", num_steps=num_steps)

    calls = [0]

    def count(module, args, output):
        calls[0] += 1

    handle = diffusion.denoiser.register_forward_hook(count)
    start = time.perf_counter()
    svi = SVI(model, x0_guide, ClippedAdam({"lr": lr, "clip_norm": 10.0}), TraceMeanField_ELBO())
    try:
        with warnings.catch_warnings():
            # x_0 comes first in the guide and last in the model; the mean-field check is
            # sufficient, not necessary, and the x_0 site is Monte Carlo (module docstring)
            warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
            losses = [
                svi.step() for _ in tqdm(range(num_iterations), desc="SVI", disable=not progress, leave=False)
            ]
    finally:
        handle.remove()
    store = pyro.get_param_store()
    loc = store["q_x0.loc"].detach().clone()
    scale = store["q_x0.scale"].detach().clone()
    pyro.clear_param_store()

    def sampler(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn((n, *loc.shape), generator=generator, dtype=loc.dtype, device=loc.device)
        return loc + scale * noise

    seconds = time.perf_counter() - start
    return PosteriorResult(
        draws=sampler(num_draws),
        diagnostics={
            "loc": loc,
            "scale": scale,
            "losses": losses,
            "num_particles": num_particles,
            "lr": lr,
            "guide": "mean-field",
            "seconds_per_step": seconds / num_iterations,
        },
        seconds=seconds,
        network_calls=calls[0],
        method="svi",
        num_steps=prior.num_steps,
        sampler=sampler,
    )


def _svi_noise(
    prior,
    observation,
    y,
    guide_name,
    rank,
    num_iterations,
    num_particles,
    lr,
    init_scale,
    num_draws,
    seed,
    progress,
) -> PosteriorResult:
    """SVI with an autoguide over the non-centred chain's noises of ``prior`` (module docstring)."""
    from .nuts import chain_x0, noise_model, noise_site

    diffusion = prior.diffusion
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    site = noise_site("x")
    shape = (prior.num_steps + 1, *diffusion.event_shape)
    start_values = {site: torch.zeros(shape, dtype=y.dtype, device=diffusion.device)}
    init_loc_fn = init_to_value(values=start_values)
    if guide_name == "noise-normal":
        guide = AutoNormal(noise_model, init_loc_fn=init_loc_fn, init_scale=init_scale)
        elbo = TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=0)
    else:
        guide = AutoLowRankMultivariateNormal(
            noise_model, init_loc_fn=init_loc_fn, init_scale=init_scale, rank=rank
        )
        elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=0)
    args = (prior, observation, y)
    svi = SVI(noise_model, guide, ClippedAdam({"lr": lr, "clip_norm": 10.0}), elbo)
    start = time.perf_counter()
    losses = [
        svi.step(*args) for _ in tqdm(range(num_iterations), desc="SVI", disable=not progress, leave=False)
    ]
    seconds = time.perf_counter() - start
    pyro.clear_param_store()
    calls_per_pass = prior.network_calls_per_chain

    @torch.no_grad()
    def sampler(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of q(x_0): noises from the guide (Pyro's generator: ``generator`` is not
        used), pushed down the chain."""
        with pyro.plate("draws", n, dim=-1):
            trace = poutine.trace(guide).get_trace(*args)
        return chain_x0(prior, trace.nodes[site]["value"].reshape(n, *shape))

    return PosteriorResult(
        draws=sampler(num_draws),
        diagnostics={
            "losses": losses,
            "num_particles": num_particles,
            "lr": lr,
            "guide": guide_name,
            "rank": rank if guide_name == "noise-lowrank" else None,
            "seconds_per_step": seconds / num_iterations,
        },
        seconds=seconds,
        network_calls=num_iterations * calls_per_pass,
        method="svi",
        num_steps=prior.num_steps,
        sampler=sampler,
    )
