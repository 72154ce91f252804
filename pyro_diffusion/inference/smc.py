r"""Twisted sequential Monte Carlo over the reverse chain (Wu et al., 2023: the twisted
diffusion sampler, TDS), built on :class:`pyro.infer.SMCFilter`.

Target: the model's conditional p_θ(x_{0:T} | y) ∝ p_θ(x_{0:T}) p(y | x_0) for a
:class:`~pyro_diffusion.inference.observations.LinearObservation` ``y = A x_0 + σ_y ε``.
K particles walk the reverse chain; at step t each carries a *twisting function*

.. math::

    \tilde p_t(y \mid x_t) = \mathcal N\big(y;\ A\,\hat x_0(x_t),\ (σ_y^2 + r_t) I\big),
    \qquad \tilde p_0(y \mid x_0) = p(y \mid x_0),

with x̂_0 the denoiser's estimate of x_0 and ``r_t = 1 − ᾱ_t`` an allowance for its error
(the ΠGDM choice; ``twist_variance="none"`` gives r_t = 0 as in TDS).  Particles move by the
twisted proposal and are reweighted:

.. math::

    x_{t-1} \sim \mathcal N\big(μ_θ(x_t, t) + σ_t^2 ∇_{x_t}\log\tilde p_t(y\mid x_t),\ σ_t^2 I\big),
    \qquad
    w_{t-1} = \frac{p_θ(x_{t-1}\mid x_t)\,\tilde p_{t-1}(y\mid x_{t-1})}
                   {\tilde p_t(y\mid x_t)\, q(x_{t-1}\mid x_t, y)} ,

starting from x_T ~ N(0, I) with weight p̃_T(y | x_T).  The last step (Gaussian decoder
``p_θ(x_0 | x_1) = N(μ, σ_1² I)``) uses the exact conditional proposal
``p(x_0 | x_1, y) ∝ N(x_0; μ, σ_1² I) N(y; A x_0, σ_y² I)`` with weight
``N(y; A μ, σ_1² A Aᵀ + σ_y² I) / p̃_1(y | x_1)``.  Because the last twist is the exact
likelihood, the weighted particles are consistent for p_θ(x_0 | y) as K → ∞ whatever the
twists (they only affect the variance), and the product of mean weights is an unbiased
estimate of the evidence p_θ(y).

In Pyro terms: the model's ``step`` samples ``x_{t-1}`` from the reverse chain and adds the
twist ratio with ``pyro.factor``; the guide's ``step`` samples the proposal; SMCFilter
computes ``log p − log q`` per particle and resamples (systematic) when the effective sample
size ESS = 1/Σ w̄² falls below ``ess_threshold · K``.  Cost: one network call (with its
gradient) per step for all K particles.

Assumes the diffusion's decoder is Gaussian (use ``decoder="gaussian"``-relaxed models for
K-level data: the particles are then continuous x_0).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SMCFilter
from tqdm.auto import tqdm

from ..diffusion import GaussianDiffusion
from .observations import LinearObservation, check_conditioning
from .prior import frozen, reverse_step_and_x0

__all__ = ["twisted_smc", "SMCResult", "TWIST_VARIANCES"]

TWIST_VARIANCES = ("pigdm", "none")


@dataclass
class SMCResult:
    """What :func:`twisted_smc` returns.

    Attributes:
        particles: final particles x_0, ``(K, *event_shape)``.
        log_weights: their normalized log weights, ``(K,)`` (logsumexp = 0).
        ess: effective sample size after each reweighting, before any resampling,
            ``(T + 1,)``: entry 0 after initializing x_T, entry T − t + 1 after drawing x_{t-1}.
        resampled: bool ``(T + 1,)``, whether the particles were resampled after that entry.
        log_evidence: the SMC estimate of log p_θ(y) (its exponential is unbiased).
        seconds: wall-clock time.
        network_calls: denoiser evaluations (each on a batch of K, with a gradient).
    """

    particles: torch.Tensor
    log_weights: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    log_evidence: float
    seconds: float
    network_calls: int
    extra: dict = field(default_factory=dict)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Equally weighted draws from the weighted particles (multinomial resampling)."""
        index = torch.multinomial(self.log_weights.exp(), num_samples, replacement=True, generator=generator)
        return self.particles[index]


def _twist_variance(diffusion: GaussianDiffusion, t: int, kind: str) -> float:
    if kind == "none":
        return 0.0
    return float(diffusion.schedule.one_minus_alphas_cumprod[t - 1])


class _TwistedChain:
    """Shared state computations for the model and guide programs."""

    def __init__(self, diffusion, observation, y, twist_variance, max_drift):
        self.max_drift = max_drift
        self.diffusion = diffusion
        self.observation = observation
        self.y = y
        self.twist_variance = twist_variance
        self.event_dims = diffusion.event_dims
        self.network_calls = 0

    def twist(self, x_t: torch.Tensor, t: int) -> dict[str, torch.Tensor]:
        """μ_θ, σ_t, log p̃_t(y | x_t) and its gradient at x_t (one network call)."""
        with torch.enable_grad(), frozen(self.diffusion):
            x = x_t.detach().requires_grad_(True)
            loc, log_var, x0_hat = reverse_step_and_x0(self.diffusion, x, t)
            noise_var = float(self.observation.noise_scale) ** 2
            scale = math.sqrt(noise_var + _twist_variance(self.diffusion, t, self.twist_variance))
            log_twist = self.observation.log_prob(self.y, x0_hat, noise_scale=scale)
            (grad,) = torch.autograd.grad(log_twist.sum(), x)
        self.network_calls += 1
        scale = torch.exp(0.5 * log_var).detach()
        drift = scale**2 * grad
        if self.max_drift is not None:  # a trust region on the proposal: ‖drift‖ ≤ c σ_t √D
            dims = tuple(range(1, drift.dim()))
            limit = self.max_drift * scale.pow(2).sum(dims, keepdim=True).sqrt()
            norm = drift.pow(2).sum(dims, keepdim=True).sqrt()
            drift = drift * (limit / norm.clamp(min=torch.finfo(norm.dtype).tiny)).clamp(max=1.0)
        return {
            "x": x_t.detach(),
            "loc": loc.detach(),
            "scale": scale,
            "log_twist": log_twist.detach(),
            "drift": torch.nan_to_num(drift),
        }

    def final_proposal(self, state) -> tuple[dist.Distribution, torch.Tensor]:
        """p(x_0 | x_1, y) for the Gaussian decoder (flattened, a MultivariateNormal) and the
        log of its normalizer N(y; A μ, σ_1² A Aᵀ + σ_y² I)."""
        loc = state["loc"].reshape(state["loc"].shape[0], -1)
        var = state["scale"].reshape(loc.shape)[0, 0] ** 2  # σ_1² is the same for every entry
        A = self.observation.matrix.to(loc.dtype)
        noise_var = float(self.observation.noise_scale) ** 2
        eye_d = torch.eye(A.shape[1], dtype=loc.dtype)
        precision = eye_d / var + A.T @ A / noise_var
        covariance = torch.linalg.inv(precision)
        covariance = 0.5 * (covariance + covariance.T)
        mean = (loc / var + (self.y.to(loc.dtype) @ A) / noise_var) @ covariance
        marginal = var * A @ A.T + noise_var * torch.eye(A.shape[0], dtype=loc.dtype)
        log_norm = dist.MultivariateNormal(loc @ A.T, covariance_matrix=marginal).log_prob(self.y)
        return dist.MultivariateNormal(mean, covariance_matrix=covariance), log_norm


class _Model:
    def __init__(self, chain: _TwistedChain) -> None:
        self.chain = chain

    def init(self, state):
        d = self.chain.diffusion
        zeros = torch.zeros(d.event_shape)
        x_T = pyro.sample(f"x_{d.num_steps}", dist.Normal(zeros, 1.0).to_event(d.event_dims))
        new = self.chain.twist(x_T, d.num_steps)
        pyro.factor("twist", new["log_twist"])
        state.update(new)

    def step(self, state, t: int):
        chain = self.chain
        if t > 1:
            p = dist.Normal(state["loc"], state["scale"]).to_event(chain.event_dims)
            x_prev = pyro.sample(f"x_{t - 1}", p)
            new = chain.twist(x_prev, t - 1)
            pyro.factor("twist", new["log_twist"] - state["log_twist"])
            state.update(new)
        else:
            loc = state["loc"].reshape(state["loc"].shape[0], -1)
            scale = state["scale"].reshape(loc.shape)
            x0 = pyro.sample("x_0", dist.Normal(loc, scale).to_event(1))
            pyro.sample("y", chain.observation.distribution(x0.reshape(state["x"].shape)), obs=chain.y)
            pyro.factor("twist", -state["log_twist"])
            state["x"] = x0.reshape(state["x"].shape)


class _Guide:
    def __init__(self, chain: _TwistedChain) -> None:
        self.chain = chain

    def init(self, state):
        d = self.chain.diffusion
        zeros = torch.zeros(d.event_shape)
        pyro.sample(f"x_{d.num_steps}", dist.Normal(zeros, 1.0).to_event(d.event_dims))

    def step(self, state, t: int):
        chain = self.chain
        if t > 1:
            loc = state["loc"] + state["drift"]
            pyro.sample(f"x_{t - 1}", dist.Normal(loc, state["scale"]).to_event(chain.event_dims))
        else:
            proposal, _ = chain.final_proposal(state)
            pyro.sample("x_0", proposal)


class _RecordingSMCFilter(SMCFilter):
    """SMCFilter that also records the ESS before each resampling decision and accumulates
    the log-evidence estimate Σ_t log Σ_k w̄_{t-1,k} exp(Δ_{t,k})."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ess_trace: list[float] = []
        self.resampled: list[bool] = []
        self.log_evidence = 0.0

    @torch.no_grad()
    def _update_weights(self, model_trace, guide_trace):
        before = self.state._log_weights.clone()
        super()._update_weights(model_trace, guide_trace)  # adds log p − log q, subtracts the max
        # recover the increment up to the (unknown) constant by recomputing it
        increment = torch.zeros_like(before)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                increment += site["log_prob"].reshape(self.num_particles, -1).sum(-1)
            elif name in guide_trace.nodes:
                increment += site["log_prob"].reshape(self.num_particles, -1).sum(-1)
                increment -= guide_trace.nodes[name]["log_prob"].reshape(self.num_particles, -1).sum(-1)
        normalized = before - before.logsumexp(-1)
        self.log_evidence += (normalized + increment).logsumexp(-1).item()

    def _maybe_importance_resample(self):
        logp = self.state._log_weights - self.state._log_weights.logsumexp(-1)
        probs = logp.exp()
        ess = probs.dot(probs).reciprocal().item()
        self.ess_trace.append(ess)
        self.resampled.append(bool(ess < self.ess_threshold * self.num_particles))
        super()._maybe_importance_resample()


def twisted_smc(
    diffusion: GaussianDiffusion,
    observation: LinearObservation,
    y: torch.Tensor,
    *,
    num_particles: int = 256,
    ess_threshold: float = 0.5,
    twist_variance: str = "pigdm",
    max_drift: float | None = 1.0,
    seed: int | None = None,
    progress: bool = False,
) -> SMCResult:
    r"""Sample p_θ(x_0 | y) by twisted SMC over the reverse chain (see the module docstring).

    Args:
        diffusion: a trained diffusion with a Gaussian decoder.
        observation: the linear observation model; its ``noise_scale`` must be a scalar.
        y: one observation, shape ``(m,)``.
        num_particles: K.
        ess_threshold: resample when ESS < ess_threshold · K.
        twist_variance: ``"pigdm"`` (r_t = 1 − ᾱ_t) or ``"none"`` (r_t = 0).
        max_drift: cap the proposal's shift ``σ_t² ∇ log p̃_t`` at ``max_drift · σ_t √D`` in
            norm (None: no cap).  At high noise a learned denoiser's x̂_0 can be very
            sensitive to x_t (its Jacobian carries 1/√ᾱ_t), and an uncapped shift throws
            particles out of the data's range.  The weights use the proposal actually drawn
            from, so the cap changes the variance of the estimate, not its target.
        seed: seed for Pyro's and torch's generators (None: leave them as they are).
        progress: progress bar over the T steps.

    Returns:
        an :class:`SMCResult` with the weighted particles, ESS per step and log p̂_θ(y).
    """
    check_conditioning(diffusion, observation, y)
    if diffusion.decoder != "gaussian":
        raise ValueError(
            f"diffusion: twisted SMC needs a Gaussian decoder (continuous x_0), got decoder={diffusion.decoder!r}"
        )
    if isinstance(observation.noise_scale, torch.Tensor) and observation.noise_scale.numel() != 1:
        raise ValueError("observation: twisted_smc needs a scalar noise_scale")
    if y.dim() != 1:
        raise ValueError(f"y: expected one observation of shape (m,), got {tuple(y.shape)}")
    if not isinstance(num_particles, int) or num_particles < 2:
        raise ValueError(f"num_particles: expected an int K >= 2, got {num_particles!r}")
    if twist_variance not in TWIST_VARIANCES:
        raise ValueError(f"twist_variance: expected one of {TWIST_VARIANCES}, got {twist_variance!r}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    start = time.perf_counter()
    chain = _TwistedChain(diffusion, observation, y, twist_variance, max_drift)
    smc = _RecordingSMCFilter(
        _Model(chain), _Guide(chain), num_particles, max_plate_nesting=0, ess_threshold=ess_threshold
    )
    smc.init()
    for t in tqdm(range(diffusion.num_steps, 0, -1), desc="twisted SMC", disable=not progress, leave=False):
        smc.step(t)
    log_weights = smc.state._log_weights - smc.state._log_weights.logsumexp(-1)
    return SMCResult(
        particles=smc.state["x"].clone(),
        log_weights=log_weights.clone(),
        ess=torch.tensor(smc.ess_trace),
        resampled=torch.tensor(smc.resampled),
        log_evidence=smc.log_evidence,
        seconds=time.perf_counter() - start,
        network_calls=chain.network_calls,
        extra={"num_particles": num_particles, "twist_variance": twist_variance},
    )
