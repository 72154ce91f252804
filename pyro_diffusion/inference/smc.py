r"""Twisted sequential Monte Carlo over the reverse chain (Wu et al., 2023: the twisted
diffusion sampler, TDS), as an explicit batched particle loop.

Target: the model's conditional p_θ(x_{0:K} | y) ∝ p_θ(x_{0:K}) p(y | x_0) for a
:class:`~pyro_diffusion.inference.observations.LinearObservation` ``y = A x_0 + σ_y ε``, on a
grid of K noise levels γ_1 < … < γ_K of any :class:`~pyro_diffusion.diffusion.Diffusion`
(its own grid, or a sub-grid: ``num_steps``).  N particles walk the reverse chain; at level k
each carries a *twisting function*

.. math::

    \tilde p_k(y \mid x_k) = \mathcal N\big(y;\ A\,\hat x_0(x_k),\ (σ_y^2 + r_k) I\big),
    \qquad \tilde p_0(y \mid x_0) = p(y \mid x_0),

with x̂_0 the denoiser's estimate of x_0 at level γ_k and ``r_k = σ_k² = sigmoid(γ_k)``
(= 1 − ᾱ_k) an allowance for its error (the ΠGDM choice; ``twist_variance="none"`` gives
r_k = 0 as in TDS; ``"analytic"`` the estimated mean conditional variance of x_0 given x_k,
(σ_k²/α_k²)(1 − Γ_k), from :func:`~pyro_diffusion.inference.variances.analytic_variances`).
Particles move by the twisted proposal and are reweighted:

.. math::

    x_{k-1} \sim \mathcal N\big(μ_θ(x_k) + s_k^2 ∇_{x_k}\log\tilde p_k(y\mid x_k),\ s_k^2 I\big),
    \qquad
    w_{k-1} = \frac{p_θ(x_{k-1}\mid x_k)\,\tilde p_{k-1}(y\mid x_{k-1})}
                   {\tilde p_k(y\mid x_k)\, q(x_{k-1}\mid x_k, y)} ,

with μ_θ, s_k the reverse step ``diffusion.reverse_step(x_k, γ_{k−1}, γ_k)``, starting from
x_K ~ N(0, I) with weight p̃_K(y | x_K).  The last step (the decoder
``p_θ(x_0 | x_1) = N(μ, diag v)``, or the continuous relaxation of a discretized one) uses the
exact conditional proposal ``p(x_0 | x_1, y) ∝ N(x_0; μ, diag v) N(y; A x_0, σ_y² I)``, drawn
by Matheron's rule (no D × D matrix), with weight
``N(y; A μ, A diag(v) Aᵀ + σ_y² I) / p̃_1(y | x_1)``.  Because the last twist is the exact
likelihood, the weighted particles are consistent for p_θ(x_0 | y) as N → ∞ whatever the
twists (they only affect the variance), and the product of mean weights is an unbiased
estimate of the evidence p_θ(y).

With ``tempering`` the twists are raised to powers λ_k ∈ [0, 1] that increase towards the data
end: the level-k twist is p̃_k(y | x_k)^{λ_k}, in the proposal's drift (λ_k s_k² ∇ log p̃_k) and
in the weights alike, and the last step's likelihood p(y | x_0) is not tempered (λ_0 = 1), so the
target and the consistency above are unchanged.  A fixed schedule is
``λ_k = ((K − k + 1)/K)^p`` (p = 1: ``"linear"``; λ_1 = 1); ``"adaptive"`` picks each λ_k, after
x_k is drawn, as the largest value in [λ_{k+1}, 1] whose incremental weights keep the conditional
ESS (Σ_n w̄_n G_n)² / Σ_n w̄_n G_n² at or above ``tempering_ess`` (bisection; no network calls).

``twist_covariance="projected"`` replaces the twist's covariance (σ_y² + r_k) I by
σ_y² I + A diag(r_k) Aᵀ, the covariance of A x_0 given x_k when Cov[x_0 | x_k] ≈ diag(r_k) (the
ΠGDM form; r_k per coordinate with the analytic twist variance on per-coordinate estimates): the
same for a mask, whose A Aᵀ = I, and much closer to p(y | x_k) for a dense A whose rows are not
orthonormal.

``proposal="gaussian"`` draws x_{k−1} from the reverse step times the level-(k − 1) twist
linearized about the step's mean μ, ``N(y; A x̂_0(x_k) + A diag(c_{k−1}) (x − μ), R_{k−1})``
with c the Jacobian ∂x̂_0/∂x ≈ α r / σ² that the twist's own covariance implies and R the twist's
covariance.  This Gaussian product is drawn exactly (Matheron's rule, like the last step) and its
normalizer Z gives the weight ``Z p̃_{k−1}(y | x_{k−1}) / (p̃_k(y | x_k) · factor(x_{k−1}))``; no
gradient of the network is taken and no drift cap is needed.  For a Gaussian prior whose
conditional covariances the twist gets right (unit variance with ΠGDM; any diagonal one with the
analytic variances) and a chain with the analytic reverse variances, every weight is the same
and the evidence estimate is exact.

After every reweighting the effective sample size ESS = 1/Σ w̄² is recorded and the particles
are resampled (systematic resampling) when it falls below ``ess_threshold · N``.  With
``reverse_variance`` the chain's step and decoder variances are the per-level estimates of
:func:`~pyro_diffusion.inference.variances.analytic_variances` instead of the model's.
Densities are :mod:`pyro.distributions` objects.  Cost: one network call per level for all N
particles, K in all (with its gradient for the default ``proposal="gradient"``).
"""

from __future__ import annotations

import math
import time

import pyro
import pyro.distributions as dist
import torch
from tqdm.auto import tqdm

from ..diffusion import Diffusion
from .observations import LinearObservation, check_conditioning
from .prior import frozen, inference_grid, relaxed
from .result import PosteriorResult
from .variances import ReverseVariances, check_variances

__all__ = [
    "twisted_smc",
    "systematic_resample",
    "resample",
    "tempering_schedule",
    "RESAMPLING",
    "TWIST_VARIANCES",
    "TEMPERING",
    "PROPOSALS",
    "TWIST_COVARIANCES",
]

TWIST_VARIANCES = ("pigdm", "none", "analytic")

#: the twist's covariance in y: (σ_y² + r_k) I or σ_y² I + A diag(r_k) Aᵀ
TWIST_COVARIANCES = ("isotropic", "projected")

#: the proposals of the moves x_k → x_{k−1}
PROPOSALS = ("gradient", "gaussian")

#: the named tempering options (besides None and a float exponent)
TEMPERING = ("linear", "adaptive")


def check_tempering(tempering, tempering_ess) -> float | str | None:
    """``tempering`` as None, ``"adaptive"`` or a float exponent p ≥ 0 (``"linear"``: 1.0)."""
    if tempering is not None:
        if isinstance(tempering, str):
            if tempering not in TEMPERING:
                raise ValueError(
                    f"tempering: expected None, {TEMPERING[0]!r}, {TEMPERING[1]!r} or an exponent >= 0, "
                    f"got {tempering!r}"
                )
            tempering = 1.0 if tempering == "linear" else tempering
        elif (
            isinstance(tempering, bool)
            or not isinstance(tempering, (int, float))
            or not math.isfinite(tempering)
            or tempering < 0
        ):
            raise ValueError(
                f"tempering: expected None, {TEMPERING[0]!r}, {TEMPERING[1]!r} or an exponent >= 0, "
                f"got {tempering!r}"
            )
        else:
            tempering = float(tempering)
    if (
        isinstance(tempering_ess, bool)
        or not isinstance(tempering_ess, (int, float))
        or not 0 < tempering_ess <= 1
    ):
        raise ValueError(f"tempering_ess: expected a number in (0, 1], got {tempering_ess!r}")
    return tempering


def tempering_schedule(num_steps: int, exponent: float = 1.0) -> torch.Tensor:
    """The fixed schedule ``λ_k = ((K − k + 1)/K)^p``, k = 1 … K, as a float64 tensor ``(K,)``
    whose entry k − 1 is λ_k: λ_1 = 1 at the data end, λ_K = K^{-p} at the noise end
    (p = 0: no tempering)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected an int K >= 1, got {num_steps!r}")
    if (
        isinstance(exponent, bool)
        or not isinstance(exponent, (int, float))
        or not math.isfinite(exponent)
        or exponent < 0
    ):
        raise ValueError(f"exponent: expected a number >= 0, got {exponent!r}")
    k = torch.arange(1, num_steps + 1, dtype=torch.float64)
    return ((num_steps - k + 1) / num_steps) ** exponent


def conditional_ess(log_weights: torch.Tensor, increment: torch.Tensor) -> float:
    """(Σ_n w̄_n G_n)² / Σ_n w̄_n G_n² ∈ [0, 1] for normalized ``log_weights`` log w̄ and
    incremental log-weights log G (0 when every G is zero)."""
    g = torch.nan_to_num(increment.to(torch.float64), nan=-math.inf)
    first = (log_weights + g).logsumexp(-1)
    second = (log_weights + 2 * g).logsumexp(-1)
    value = (2 * first - second).exp().item()
    return value if math.isfinite(value) else 0.0


def adaptive_temperature(log_weights, base, log_twist, low: float, target: float, iterations: int = 40):
    """The largest λ in [low, 1] whose incremental weights ``base + λ · log_twist`` keep the
    conditional ESS at or above ``target`` (``low`` if none does; bisection)."""

    def ok(lam):
        return conditional_ess(log_weights, base + lam * log_twist) >= target

    if ok(1.0):
        return 1.0
    if not ok(low):
        return low
    lo, hi = low, 1.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def systematic_resample(log_weights: torch.Tensor) -> torch.Tensor:
    """Ancestor indices ``(N,)`` by systematic resampling of normalized-or-not ``log_weights``
    ``(N,)``: one uniform shift, N evenly spaced points through the weights' CDF (keeps more
    distinct particles than multinomial resampling)."""
    probs = (log_weights - log_weights.logsumexp(-1)).exp()
    n = probs.shape[-1]
    points = (
        torch.rand((), dtype=probs.dtype, device=probs.device)
        + torch.arange(n, dtype=probs.dtype, device=probs.device)
    ) / n
    cdf = probs.cumsum(-1)
    cdf[-1] = 1.0  # guard against rounding: every point lands on a particle
    return torch.searchsorted(cdf, points).clamp(max=n - 1)


RESAMPLING = ("systematic", "stratified", "multinomial")


def resample(log_weights: torch.Tensor, scheme: str = "systematic") -> torch.Tensor:
    """Ancestor indices ``(N,)`` from ``log_weights`` ``(N,)`` by ``scheme``: ``"systematic"``
    (one uniform shift), ``"stratified"`` (one uniform per stratum) or ``"multinomial"``."""
    if scheme == "systematic":
        return systematic_resample(log_weights)
    probs = (log_weights - log_weights.logsumexp(-1)).exp()
    n = probs.shape[-1]
    if scheme == "multinomial":
        return torch.multinomial(probs, n, replacement=True)
    if scheme != "stratified":
        raise ValueError(f"scheme: expected one of {RESAMPLING}, got {scheme!r}")
    points = (
        torch.rand(n, dtype=probs.dtype, device=probs.device)
        + torch.arange(n, dtype=probs.dtype, device=probs.device)
    ) / n
    cdf = probs.cumsum(-1)
    cdf[-1] = 1.0
    return torch.searchsorted(cdf, points).clamp(max=n - 1)


class _TwistedChain:
    """The per-level computations: the reverse step (or decoder) at x_k and the twist."""

    def __init__(
        self,
        diffusion: Diffusion,
        observation,
        y,
        grid,
        twist_variance,
        max_drift,
        variances=None,
        proposal="gradient",
        twist_covariance="isotropic",
    ):
        self.diffusion = diffusion
        self.proposal = proposal
        self.twist_covariance = twist_covariance
        self._covariances = {}
        self.variances = variances
        self.observation = observation
        self.y = y
        self.grid = grid
        self.twist_variance = twist_variance
        self.max_drift = max_drift
        self.event_dims = diffusion.event_dims
        self.noise_var = float(observation.noise_scale) ** 2
        self.network_calls = 0

    def twist_allowance(self, k: int) -> float:
        """r_k: σ_k² (``"pigdm"``), 0 (``"none"``) or the estimated mean conditional variance of
        x_0 given x_k, (σ_k²/α_k²)(1 − Γ_k) (``"analytic"``, from the reverse variances)."""
        if self.twist_variance == "pigdm":
            return float(torch.sigmoid(self.grid[k - 1]))
        if self.twist_variance == "analytic":
            spread = (1.0 - self.variances.gamma_hat[k - 1].to(torch.float64)).clamp(min=0.0).mean()
            return float(torch.exp(self.grid[k - 1]).cpu() * spread)
        return 0.0

    def allowance_vector(self, k: int, dtype, device) -> torch.Tensor:
        """r_k per coordinate ``(D,)``: with ``"analytic"`` and per-coordinate variances the
        estimates (σ_k²/α_k²)(1 − Γ_{k,i}), otherwise r_k for every coordinate."""
        size = self.observation.matrix.shape[1]
        if self.twist_variance == "analytic" and self.variances.gamma_hat[k - 1].numel() == size:
            spread = (1.0 - self.variances.gamma_hat[k - 1].to(torch.float64)).clamp(min=0.0).reshape(-1)
            return (torch.exp(self.grid[k - 1]).cpu().to(torch.float64) * spread).to(
                device=device, dtype=dtype
            )
        return torch.full((size,), self.twist_allowance(k), dtype=dtype, device=device)

    def twist(self, x_k: torch.Tensor, k: int, drift: bool = True) -> dict:
        """At level k: the move's distribution (the reverse step to k − 1, or the decoder at
        k = 1), log p̃_k(y | x_k) and the drift s_k² ∇ log p̃_k, capped (one network call, with
        its gradient); ``drift=False``: the uncapped shift as ``score`` instead, for
        :meth:`drift`.  With the Gaussian proposal no gradient: A x̂_0(x_k) as ``mean_y``."""
        d, grid = self.diffusion, self.grid
        gradient = self.proposal == "gradient"
        with torch.enable_grad() if gradient else torch.no_grad(), frozen(d):
            x = x_k.detach().requires_grad_(gradient)
            if k > 1:
                step, (prediction, _) = d.reverse_step(x, grid[k - 2], grid[k - 1])
            else:
                prediction, variance_output = d.predict(x, grid[0], grid[0].new_tensor(-math.inf))
                step = relaxed(d.decoder_distribution(x, grid[0], prediction, variance_output))
            mean_y = self.observation.mean(prediction.x0)
            log_twist = self.twist_distribution(k, mean_y).log_prob(self.y)
            if gradient:
                (grad,) = torch.autograd.grad(log_twist.sum(), x)
        self.network_calls += 1
        loc, scale = step.loc.detach(), step.scale.detach()
        if self.variances is not None:
            scale = self.variances.scale(k, loc)
        state = {"loc": loc, "scale": scale, "log_twist": log_twist.detach()}
        if not gradient:
            state["mean_y"] = mean_y
            return state
        score = scale**2 * grad
        if drift:
            state["drift"] = self.drift(score, scale)
        else:
            state["score"] = score
        return state

    def drift(self, score: torch.Tensor, scale: torch.Tensor, temperature: float | None = None):
        """The proposal's shift: ``temperature · score`` (``score`` if None), capped."""
        drift = score if temperature is None else temperature * score
        if self.max_drift is not None:  # a trust region on the proposal: ‖drift‖ ≤ c s_k √D
            dims = tuple(range(1, drift.dim()))
            limit = self.max_drift * scale.pow(2).sum(dims, keepdim=True).sqrt()
            norm = drift.pow(2).sum(dims, keepdim=True).sqrt()
            drift = drift * (limit / norm.clamp(min=torch.finfo(norm.dtype).tiny)).clamp(max=1.0)
        return torch.nan_to_num(drift)

    def twist_covariance_matrix(self, k: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The twist's covariance at level k, ``(m, m)``, and its Cholesky factor (computed once
        per level): σ_y² I + r_k I (``"isotropic"``) or σ_y² I + A diag(r_k) Aᵀ (``"projected"``:
        the conditional covariance of x_0 seen through A; per coordinate with the analytic twist
        variance on per-coordinate estimates)."""
        key = (k, dtype, device)
        if key not in self._covariances:
            A = self.observation.matrix.to(device=device, dtype=dtype)
            eye = torch.eye(A.shape[0], dtype=dtype, device=device)
            if self.twist_covariance == "projected":
                cov = (A * self.allowance_vector(k, dtype, device)) @ A.T + self.noise_var * eye
                cov = 0.5 * (cov + cov.T)
            else:
                cov = (self.noise_var + self.twist_allowance(k)) * eye
            self._covariances[key] = (cov, torch.linalg.cholesky(cov))
        return self._covariances[key]

    def twist_distribution(self, k: int, mean_y: torch.Tensor) -> dist.Distribution:
        """p̃_k(y | x_k) as a distribution over y given A x̂_0(x_k) = ``mean_y`` ``(n, m)``."""
        if self.twist_covariance == "isotropic":
            scale = math.sqrt(self.noise_var + self.twist_allowance(k))
            return dist.Normal(mean_y, scale).to_event(1)
        _, tril = self.twist_covariance_matrix(k, mean_y.dtype, mean_y.device)
        return dist.MultivariateNormal(mean_y, scale_tril=tril)

    def jacobian_scale(self, k: int, dtype, device) -> torch.Tensor:
        """c_k ``(D,)``: the diagonal standing in for the Jacobian ∂x̂_0/∂x_k of the denoiser at
        level k, α_k r_k / σ_k² (the Jacobian α_k Cov[x_0 | x_k] / σ_k² with Cov[x_0 | x_k] ≈
        diag(r_k); r_k per coordinate as in the projected twist covariance, else its mean)."""
        gamma = self.grid[k - 1].to(torch.float64).cpu()
        alpha = float(torch.sigmoid(-gamma).sqrt())
        if self.twist_covariance == "projected":
            r = self.allowance_vector(k, dtype, device)
        else:
            r = torch.full(
                (self.observation.matrix.shape[1],), self.twist_allowance(k), dtype=dtype, device=device
            )
        return alpha * r / float(torch.sigmoid(gamma))

    def gaussian_move(
        self, loc, var, mean_y, gain, noise_cov: torch.Tensor, likelihood: bool = False, noise_tril=None
    ):
        """Draws from N(x; μ, diag v) · N(y; A m + A diag(c) (x − μ), R) / Z per particle
        (Matheron's rule: no D × D matrix), with ``loc`` μ ``(n, D)``, ``var`` v ``(n, D)``,
        ``mean_y`` A m ``(n, m)``, ``gain`` c (a number or ``(D,)``) and ``noise_cov`` R
        ``(m, m)`` (``noise_tril``: its Cholesky factor, if known).  Returns the draws,
        log Z = log N(y; A m, A diag(c² v) Aᵀ + R) and, with ``likelihood``, the log of the
        Gaussian factor at the draws."""
        n = loc.shape[0]
        A = self.observation.matrix.to(device=loc.device, dtype=loc.dtype)
        m = A.shape[0]
        shared = bool((var == var[:1]).all())  # the same variance for every particle
        v = var[:1] if shared else var
        cov_y = (A * (gain**2 * v)[:, None, :]) @ A.T + noise_cov  # (1 or n, m, m)
        cov_y = 0.5 * (cov_y + cov_y.transpose(-1, -2))
        y = self.y.to(loc.dtype)
        log_norm = dist.MultivariateNormal(mean_y, covariance_matrix=cov_y).log_prob(y)
        # Matheron: x' ~ N(μ, diag v), y' = A m + c A (x' − μ) + √R η, x = x' + c diag(v) Aᵀ S⁻¹ (y − y')
        x_prior = loc + var.sqrt() * torch.randn_like(loc)
        if noise_tril is None:
            noise_tril = torch.linalg.cholesky(noise_cov)
        y_prior = (
            mean_y
            + (gain * (x_prior - loc)) @ A.T
            + torch.randn(n, m, dtype=loc.dtype, device=loc.device) @ noise_tril.T
        )
        solve = torch.linalg.solve(cov_y, (y - y_prior).unsqueeze(-1)).squeeze(-1)  # (n, m)
        x = x_prior + gain * var * (solve @ A)
        if not likelihood:
            return x, log_norm
        mean = mean_y + (gain * (x - loc)) @ A.T
        factor = dist.MultivariateNormal(mean, scale_tril=noise_tril).log_prob(y)
        return x, log_norm, factor

    def final_move(self, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A draw of x_0 from p(x_0 | x_1, y) ∝ N(x_0; μ, diag v) N(y; A x_0, σ_y² I) per
        particle (Matheron's rule) and the log of its normalizer N(y; A μ, A diag(v) Aᵀ + σ_y² I)."""
        n = state["loc"].shape[0]
        loc = state["loc"].reshape(n, -1)
        var = state["scale"].reshape(n, -1) ** 2
        m = self.observation.num_observations
        noise_cov = self.noise_var * torch.eye(m, dtype=loc.dtype, device=loc.device)
        x0, log_norm = self.gaussian_move(loc, var, self.observation.mean(state["loc"]), 1.0, noise_cov)
        return x0.reshape(state["loc"].shape), log_norm

    def linearized_move(self, state: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """From x_k (``state``) a draw of x_{k−1} from the reverse step times the level-(k − 1)
        twist linearized about the step's mean, N(y; A x̂_0(x_k) + A diag(c_{k−1}) (x − μ),
        R_{k−1}) with R the twist's covariance, and log p_θ(x_{k−1} | x_k) − log q(x_{k−1}) =
        log Z − log of that factor."""
        n = state["loc"].shape[0]
        loc = state["loc"].reshape(n, -1)
        var = state["scale"].reshape(n, -1) ** 2
        gain = self.jacobian_scale(k - 1, loc.dtype, loc.device)
        noise_cov, noise_tril = self.twist_covariance_matrix(k - 1, loc.dtype, loc.device)
        x, log_norm, factor = self.gaussian_move(
            loc, var, state["mean_y"], gain, noise_cov, likelihood=True, noise_tril=noise_tril
        )
        return x.reshape(state["loc"].shape), log_norm - factor


def twisted_smc(
    diffusion: Diffusion,
    observation: LinearObservation,
    y: torch.Tensor,
    *,
    num_particles: int = 256,
    num_steps: int | None = None,
    ess_threshold: float = 0.5,
    twist_variance: str = "pigdm",
    max_drift: float | None = 1.0,
    reverse_variance: ReverseVariances | None = None,
    tempering: str | float | None = None,
    tempering_ess: float = 0.5,
    proposal: str = "gradient",
    twist_covariance: str = "isotropic",
    seed: int | None = None,
    progress: bool = False,
) -> PosteriorResult:
    r"""Sample p_θ(x_0 | y) by twisted SMC over the reverse chain (see the module docstring).

    Args:
        diffusion: a trained diffusion; a discretized decoder is replaced by its continuous
            relaxation (the particles are continuous x_0).
        observation: the linear observation model; its ``noise_scale`` must be a scalar.
        y: one observation, shape ``(m,)``.
        num_particles: N.
        num_steps: the grid: None (default) the model's own, K a K-level grid
            (``diffusion.grid(K)``, respaced for a tabulated schedule).
        ess_threshold: resample when ESS < ess_threshold · N.
        twist_variance: ``"pigdm"`` (r_k = sigmoid(γ_k) = 1 − ᾱ_k), ``"none"`` (r_k = 0) or
            ``"analytic"`` (r_k = (σ_k²/α_k²)(1 − Γ_k), the mean conditional variance of x_0
            given x_k estimated by ``reverse_variance``, which it needs).
        max_drift: cap the proposal's shift ``s_k² ∇ log p̃_k`` at ``max_drift · s_k √D`` in
            norm (None: no cap).  At high noise a learned denoiser's x̂_0 can be very
            sensitive to x_k (its Jacobian carries 1/α_k), and an uncapped shift throws
            particles out of the data's range.  The weights use the proposal actually drawn
            from, so the cap changes the variance of the estimate, not its target.
        reverse_variance: None (the model's reverse variances) or per-level variances from
            :func:`~pyro_diffusion.inference.variances.analytic_variances` on the same grid:
            they replace the variances of the reverse steps and of the decoder, i.e. the chain
            p_θ whose conditional is targeted.
        tempering: None (default: the twists as they are), ``"linear"`` or a float exponent
            p ≥ 0 (the fixed schedule λ_k = ((K − k + 1)/K)^p of :func:`tempering_schedule`;
            ``"linear"`` is p = 1, p = 0 gives the untempered sampler) or ``"adaptive"``
            (each λ_k chosen by bisection from the particles' weights): the twist at level k is
            p̃_k^{λ_k}; the final likelihood is exact, so the target is unchanged.
        tempering_ess: with ``"adaptive"``, the smallest conditional ESS, as a fraction of N,
            that a step's incremental weights may leave.
        proposal: ``"gradient"`` (default: the reverse step shifted by s_k² ∇ log p̃_k, capped
            by ``max_drift``) or ``"gaussian"`` (the reverse step times the linearized twist,
            drawn exactly; needs ``twist_variance`` ``"pigdm"`` or ``"analytic"``, not with
            ``tempering``; ``max_drift`` unused).
        twist_covariance: ``"isotropic"`` (default: (σ_y² + r_k) I) or ``"projected"``
            (σ_y² I + A diag(r_k) Aᵀ).
        seed: seed for Pyro's and torch's generators (None: leave them as they are).
        progress: progress bar over the K levels.

    Returns:
        a :class:`~pyro_diffusion.inference.result.PosteriorResult` with the N weighted
        particles (``draws``, ``log_weights``) and ``diagnostics`` ``ess`` and ``resampled``
        ``(K + 1,)`` (entry 0 after initializing x_K, entry K − k + 1 after drawing x_{k−1};
        ESS before any resampling), ``log_evidence`` (the SMC estimate of log p_θ(y), whose
        exponential is unbiased), ``num_particles``, ``twist_variance``, ``ess_threshold``;
        with ``tempering`` also ``tempering`` and ``temperatures`` ``(K,)`` (entry k − 1: λ_k).
    """
    check_conditioning(diffusion, observation, y)
    if isinstance(observation.noise_scale, torch.Tensor) and observation.noise_scale.numel() != 1:
        raise ValueError("observation: twisted_smc needs a scalar noise_scale")
    if y.dim() != 1:
        raise ValueError(f"y: expected one observation of shape (m,), got {tuple(y.shape)}")
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 2:
        raise ValueError(f"num_particles: expected an int N >= 2, got {num_particles!r}")
    if twist_variance not in TWIST_VARIANCES:
        raise ValueError(f"twist_variance: expected one of {TWIST_VARIANCES}, got {twist_variance!r}")
    if (
        not isinstance(ess_threshold, (int, float))
        or isinstance(ess_threshold, bool)
        or not 0 <= ess_threshold <= 1
    ):
        raise ValueError(f"ess_threshold: expected a number in [0, 1], got {ess_threshold!r}")
    if max_drift is not None and not max_drift > 0:
        raise ValueError(f"max_drift: expected None or a positive number, got {max_drift!r}")
    tempering = check_tempering(tempering, tempering_ess)
    if twist_covariance not in TWIST_COVARIANCES:
        raise ValueError(f"twist_covariance: expected one of {TWIST_COVARIANCES}, got {twist_covariance!r}")
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal: expected one of {PROPOSALS}, got {proposal!r}")
    if proposal == "gaussian" and tempering is not None:
        raise ValueError(
            "tempering: only with proposal='gradient' (the Gaussian proposal uses the untempered twist)"
        )
    if proposal == "gaussian" and twist_variance == "none":
        raise ValueError(
            "twist_variance: proposal='gaussian' needs a twist variance ('pigdm' or 'analytic'): with r_k = 0 "
            "the twist says nothing about the denoiser's Jacobian"
        )
    grid = inference_grid(diffusion, num_steps)
    variances = check_variances(diffusion, reverse_variance, grid)
    if twist_variance == "analytic" and variances is None:
        raise ValueError("twist_variance: 'analytic' needs reverse_variance (from analytic_variances)")
    if seed is not None:
        pyro.set_rng_seed(seed)
    start = time.perf_counter()
    K = grid.shape[0]
    N = num_particles
    event_dims = diffusion.event_dims
    dtype = torch.get_default_dtype()
    y = y.to(device=diffusion.device, dtype=dtype)
    chain = _TwistedChain(
        diffusion, observation, y, grid, twist_variance, max_drift, variances, proposal, twist_covariance
    )
    ess_trace: list[float] = []
    resampled: list[bool] = []
    log_evidence = 0.0
    log_weights = torch.full((N,), -math.log(N), dtype=torch.float64, device=diffusion.device)

    def reweight(increment: torch.Tensor):
        nonlocal log_weights, log_evidence
        if not torch.isfinite(increment).any():
            raise RuntimeError(
                "twisted_smc: every particle has weight zero (the observation is impossible under the model)"
            )
        updated = log_weights + torch.nan_to_num(increment.to(torch.float64), nan=-math.inf)
        log_evidence += updated.logsumexp(-1).item()  # Σ_n w̄_n exp(Δ_n), w̄ normalized before
        log_weights = updated - updated.logsumexp(-1)
        probs = log_weights.exp()
        ess = (1.0 / (probs * probs).sum()).item()
        ess_trace.append(ess)
        resample = ess < ess_threshold * N
        resampled.append(bool(resample))
        return systematic_resample(log_weights) if resample else None

    # tempering: λ_k per level (a fixed schedule, or chosen when x_k is drawn)
    schedule = tempering_schedule(K, tempering) if isinstance(tempering, float) else None
    temperatures: list[float] = []  # λ_K, …, λ_1 in the order used

    def temperature(k: int, base: torch.Tensor, log_twist: torch.Tensor, low: float) -> float:
        if schedule is not None:
            return float(schedule[k - 1])
        return adaptive_temperature(log_weights, base, log_twist, low, float(tempering_ess))

    # x_K ~ N(0, I): the proposal is the prior, the weight the first twist
    zeros = torch.zeros((N, *diffusion.event_shape), dtype=dtype, device=diffusion.device)
    x = dist.Normal(zeros, 1.0).to_event(event_dims).sample()
    if tempering is None:
        state = chain.twist(x, K)
        index = reweight(state["log_twist"])
    else:
        state = chain.twist(x, K, drift=False)
        lam = temperature(K, torch.zeros_like(state["log_twist"]), state["log_twist"], 0.0)
        state["drift"] = chain.drift(state.pop("score"), state["scale"], lam)
        temperatures.append(lam)
        index = reweight(lam * state["log_twist"])
    if index is not None:
        x, state = x[index], {key: value[index] for key, value in state.items()}
        log_weights = torch.full_like(log_weights, -math.log(N))
    for k in tqdm(range(K, 0, -1), desc="twisted SMC", disable=not progress, leave=False):
        if k > 1 and proposal == "gaussian":
            x, log_ratio = chain.linearized_move(state, k)
            new = chain.twist(x, k - 1)
            increment = log_ratio + new["log_twist"] - state["log_twist"]
            state = new
        elif k > 1:
            prior = dist.Normal(state["loc"], state["scale"]).to_event(event_dims)
            move = dist.Normal(state["loc"] + state["drift"], state["scale"]).to_event(event_dims)
            x = move.sample()
            if tempering is None:
                new = chain.twist(x, k - 1)
                increment = prior.log_prob(x) - move.log_prob(x) + new["log_twist"] - state["log_twist"]
            else:  # the same sums with the twists to the powers λ_{k−1}, λ_k
                new = chain.twist(x, k - 1, drift=False)
                base = prior.log_prob(x) - move.log_prob(x)
                lam_new = temperature(k - 1, base - lam * state["log_twist"], new["log_twist"], lam)
                increment = base + lam_new * new["log_twist"] - lam * state["log_twist"]
                new["drift"] = chain.drift(new.pop("score"), new["scale"], lam_new)
                lam = lam_new
                temperatures.append(lam)
            state = new
        else:
            x, log_norm = chain.final_move(state)
            if tempering is None:
                increment = log_norm - state["log_twist"]
            else:  # the likelihood itself (λ_0 = 1)
                increment = log_norm - lam * state["log_twist"]
        index = reweight(increment)
        if index is not None:
            x, state = x[index], {key: value[index] for key, value in state.items()}
            log_weights = torch.full_like(log_weights, -math.log(N))
    extra = {}
    if tempering is not None:
        extra = {
            "tempering": tempering if isinstance(tempering, str) else float(tempering),
            "temperatures": torch.tensor(temperatures[::-1], dtype=torch.float64),
        }
    return PosteriorResult(
        draws=x.detach().clone(),
        log_weights=log_weights.to(dtype),
        diagnostics={
            "ess": torch.tensor(ess_trace),
            "resampled": torch.tensor(resampled),
            "log_evidence": log_evidence,
            "num_particles": N,
            "twist_variance": twist_variance,
            "proposal": proposal,
            "twist_covariance": twist_covariance,
            "ess_threshold": float(ess_threshold),
            "reverse_variance": "model" if variances is None else variances.estimator,
            **extra,
        },
        seconds=time.perf_counter() - start,
        network_calls=chain.network_calls,
        method="twisted_smc",
        num_steps=K,
    )
