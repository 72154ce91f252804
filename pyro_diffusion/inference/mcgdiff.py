r"""SMC whose proposals use the observation in the noised space (MCGdiff: Cardoso et al.,
ICLR 2024), for linear Gaussian observations, on any grid of noise levels.

Write ``A = U diag(s) V_hᵀ`` (:meth:`~pyro_diffusion.inference.observations.LinearObservation.svd`)
and work in the coordinates ``x̄ = V_h vec(x)``, where the observation says
``ȳ_i = x̄_{0,i} + τ_i η_i`` (τ_i = σ_y / s_i) for the first r = rank(A) coordinates and nothing
about the rest.  A datum noised to level γ_k is ``x_k = α_k x_0 + σ_k ε``, so the observation
seen from x_k, *if x_0 given x_k were uninformative*, is the potential

.. math::

    g_k(x_k) = \prod_{i \le r} \mathcal N\big(\bar x_{k,i};\ α_k \bar y_i,\ σ_k^2 + α_k^2 τ_i^2\big),
    \qquad g_0(x_0) = p(y \mid x_0)\ \text{(up to a constant)} .

N particles walk the reverse chain ``p_θ(x_{k-1} | x_k) = N(μ_θ(x_k), s_k²)``; each step draws
from the Gaussian product ``q(x_{k-1} | x_k) ∝ N(x_{k-1}; μ_θ, s̄_k² I) g_{k-1}(x_{k-1})``
(s̄_k² the mean of the step's variances, exact for an isotropic step; diagonal in the V basis)
and reweights by ``p_θ(x_{k-1} | x_k) g_{k-1}(x_{k-1}) / (g_k(x_k) q(x_{k-1} | x_k))``, starting
from ``x_K ∝ N(0, I) g_K``.  Because g_0 is the exact likelihood, the weighted particles are
consistent for the model's p_θ(x_0 | y) on the grid, and the product of mean weights is an
unbiased estimate of p_θ(y).  No gradient of the network is needed: one batched call per level
without autograd, so many particles are cheap.

``num_runs`` independent particle systems are run in the same batched calls; they are combined
with weights proportional to their evidence estimates (which keeps the estimate consistent), and
their disagreement is the diagnostic that the ESS of one system is not: the ``run`` entry of the
diagnostics says which system each draw came from, ``log_evidence_runs`` their evidence.
"""

from __future__ import annotations

import math
import time

import pyro
import torch
from tqdm.auto import tqdm

from ..diffusion import Diffusion
from ..schedules import check_num_steps
from .observations import LinearObservation, check_conditioning
from .prior import frozen, inference_grid, relaxed
from .result import PosteriorResult
from .smc import RESAMPLING, resample
from .variances import ReverseVariances, check_variances

__all__ = ["mcgdiff"]

_LOG_2PI = math.log(2 * math.pi)


def _normal_log_prob(x, loc, var):
    return -0.5 * ((x - loc) ** 2 / var + var.log() + _LOG_2PI)


@torch.no_grad()
def mcgdiff(
    diffusion: Diffusion,
    observation: LinearObservation,
    y: torch.Tensor,
    *,
    num_particles: int = 1024,
    num_runs: int = 1,
    num_steps: int | None = None,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    reverse_variance: ReverseVariances | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> PosteriorResult:
    r"""Sample p_θ(x_0 | y) by SMC with the noised-observation proposals (module docstring).

    Args:
        diffusion: any diffusion with a flat or shaped event (a discretized decoder is relaxed).
        observation: a :class:`LinearObservation` with scalar noise (any A: mask, dense, blur).
        y: one observation ``(m,)``.
        num_particles: N per run.
        num_runs: R independent particle systems, batched together (R · N per network call).
        num_steps: the grid: None the model's own, K a K-level grid (``diffusion.grid(K)``).
        ess_threshold: resample a run when its ESS < ess_threshold · N.
        resampling: ``"systematic"``, ``"stratified"`` or ``"multinomial"``.
        reverse_variance: None (the model's) or per-level variances from
            :func:`~pyro_diffusion.inference.variances.analytic_variances` on the same grid.
        seed: seed for Pyro's and torch's generators (None: leave them).
        progress: a progress bar over the K levels.

    Returns:
        a :class:`~pyro_diffusion.inference.result.PosteriorResult` with the R · N weighted
        particles (run-major) and ``diagnostics``: ``ess`` (R, K + 1) before resampling,
        ``resampled`` (R, K + 1), ``log_evidence`` (the combined estimate of log p_θ(y)),
        ``log_evidence_runs`` (R,), ``run`` (R · N,) the run of each draw, the settings.
    """
    check_conditioning(diffusion, observation, y)
    if isinstance(observation.noise_scale, torch.Tensor) and observation.noise_scale.numel() != 1:
        raise ValueError("observation: mcgdiff needs a scalar noise_scale")
    if y.dim() != 1:
        raise ValueError(f"y: expected one observation of shape (m,), got {tuple(y.shape)}")
    N = check_num_steps(num_particles, "num_particles", 2)
    R = check_num_steps(num_runs, "num_runs")
    if (
        isinstance(ess_threshold, bool)
        or not isinstance(ess_threshold, (int, float))
        or not 0 <= ess_threshold <= 1
    ):
        raise ValueError(f"ess_threshold: expected a number in [0, 1], got {ess_threshold!r}")
    if resampling not in RESAMPLING:
        raise ValueError(f"resampling: expected one of {RESAMPLING}, got {resampling!r}")
    grid = inference_grid(diffusion, num_steps)
    variances = check_variances(diffusion, reverse_variance, grid)
    if seed is not None:
        pyro.set_rng_seed(seed)
    start = time.perf_counter()
    K = grid.shape[0]
    D = diffusion.event_size
    shape = diffusion.event_shape
    device = diffusion.device
    dtype = torch.get_default_dtype()
    noise_scale = float(observation.noise_scale)
    spectral = observation.svd()
    r = spectral.rank
    y_bar, tau, rest = spectral.project(y, noise_scale)
    y_bar, tau = y_bar.to(device), tau.to(device)
    Vh = spectral.Vh.to(device)  # (D, D), float64
    # the constant that turns log p(ȳ) into log p(y): the Jacobian of y → ȳ and the part of Uᵀy
    # outside A's range (pure noise)
    log_const = -spectral.singular_values.log().sum().item()
    if rest.numel():
        log_const += (-0.5 * (rest / noise_scale) ** 2 - math.log(noise_scale) - 0.5 * _LOG_2PI).sum().item()
    alphas = torch.sigmoid(-grid).sqrt()
    sigmas2 = torch.sigmoid(grid)

    def potential(k: int):
        """(centre (r,), variance (r,)) of g_k in the V basis; k = 0 the exact likelihood."""
        if k == 0:
            return y_bar, tau**2
        a, s2 = alphas[k - 1], sigmas2[k - 1]
        return a * y_bar, s2 + a * a * tau**2

    def log_g(x_bar: torch.Tensor, k: int) -> torch.Tensor:
        centre, var = potential(k)
        return _normal_log_prob(x_bar[:, :r], centre, var).sum(-1)

    def move(loc: torch.Tensor, scale: torch.Tensor, k: int):
        """Draw x_k from q ∝ N(loc, s̄² I) g_k and return (x (R·N, *shape), x̄, log p − log q + log g_k)."""
        loc64 = loc.reshape(R * N, D).to(torch.float64)
        var = scale.reshape(R * N, D).to(torch.float64) ** 2
        var_bar = var.mean(-1, keepdim=True)  # (R·N, 1)
        loc_bar = loc64 @ Vh.T
        centre, g_var = potential(k)
        q_var = var_bar.expand(-1, D).clone()
        q_loc = loc_bar.clone()
        post_var = 1.0 / (1.0 / var_bar + 1.0 / g_var)
        q_var[:, :r] = post_var
        q_loc[:, :r] = post_var * (loc_bar[:, :r] / var_bar + centre / g_var)
        x_bar = q_loc + q_var.sqrt() * torch.randn_like(q_loc)
        x = (x_bar @ Vh).to(dtype)
        x64 = x.to(torch.float64)
        x_bar = x64 @ Vh.T  # the coordinates of the point actually kept (after the cast)
        log_q = _normal_log_prob(x_bar, q_loc, q_var).sum(-1)
        log_p = _normal_log_prob(x64, loc64, var).sum(-1)
        return x.reshape(R * N, *shape), x_bar, log_p - log_q + log_g(x_bar, k)

    ess_trace: list[torch.Tensor] = []
    resampled: list[torch.Tensor] = []
    log_evidence = torch.zeros(R, dtype=torch.float64, device=device)
    log_w = torch.full((R, N), -math.log(N), dtype=torch.float64, device=device)
    offsets = (torch.arange(R, device=device) * N)[:, None]

    def reweight(increment: torch.Tensor):
        nonlocal log_w, log_evidence
        updated = log_w + torch.nan_to_num(increment.reshape(R, N), nan=-math.inf)
        total = updated.logsumexp(-1)
        if not torch.isfinite(total).all():
            raise RuntimeError("mcgdiff: every particle of a run has weight zero")
        log_evidence = log_evidence + total
        log_w = updated - total[:, None]
        ess = 1.0 / log_w.exp().pow(2).sum(-1)
        flags = ess < ess_threshold * N
        ess_trace.append(ess)
        resampled.append(flags)
        if not flags.any():
            return None
        index = torch.arange(R * N, device=device).reshape(R, N)
        for run in flags.nonzero().flatten().tolist():
            index[run] = resample(log_w[run], resampling) + offsets[run]
        log_w = torch.where(flags[:, None], torch.full_like(log_w, -math.log(N)), log_w)
        return index.reshape(-1)

    network_calls = 0
    zeros = torch.zeros(R * N, *shape, dtype=dtype, device=device)
    x, x_bar, increment = move(zeros, torch.ones_like(zeros), K)
    # x_K ~ N(0, I): p = the prior, the increment its normalizer with g_K
    index = reweight(increment)
    if index is not None:
        x, x_bar = x[index], x_bar[index]
    with frozen(diffusion):
        for k in tqdm(range(K, 0, -1), desc="MCGdiff", disable=not progress, leave=False):
            if k > 1:
                step, _ = diffusion.reverse_step(x, grid[k - 2], grid[k - 1])
            else:
                step = relaxed(diffusion.decoder_distribution(x, grid[0]))
            network_calls += int(k > 1 or diffusion.decoder_uses_network)
            scale = step.scale if variances is None else variances.scale(k, step.loc)
            log_g_prev = log_g(x_bar, k)
            x, x_bar, increment = move(step.loc, scale, k - 1)
            index = reweight(increment - log_g_prev)
            if index is not None:
                x, x_bar = x[index], x_bar[index]
    log_evidence = log_evidence + log_const
    combined = (log_w + log_evidence[:, None]).reshape(-1)
    total = combined.logsumexp(-1)
    return PosteriorResult(
        draws=x.detach().clone(),
        log_weights=(combined - total).to(dtype),
        diagnostics={
            "ess": torch.stack(ess_trace, -1).cpu(),
            "resampled": torch.stack(resampled, -1).cpu(),
            "log_evidence": (total - math.log(R)).item(),
            "log_evidence_runs": log_evidence.cpu(),
            "run": torch.arange(R).repeat_interleave(N),
            "num_particles": N,
            "num_runs": R,
            "ess_threshold": float(ess_threshold),
            "resampling": resampling,
            "reverse_variance": "model" if variances is None else variances.estimator,
        },
        seconds=time.perf_counter() - start,
        network_calls=network_calls,
        method="mcgdiff",
        num_steps=K,
    )
