r"""Posterior problems with a closed-form answer in any dimension: Gaussian-mixture priors with
diagonal components, their exact denoiser, and the exact posterior mixture under a linear
Gaussian observation.

The prior is ``p(x) = Σ_c w_c N(x; m_c, diag(s_c²))`` in ``d`` dimensions.  At noise level γ
(``z = α x + σ ε``, α² = sigmoid(−γ), σ² = sigmoid(γ)) the noised marginal is again a mixture,
``p(z | c) = N(α m_c, diag(α² s_c² + σ²))``, so

.. math::

    \mathbb E[x \mid z] = \sum_c r_c(z)\,\Big(m_c + \frac{α s_c^2}{α^2 s_c^2 + σ^2}(z − α m_c)\Big),
    \qquad \hat ε(z) = \frac{z − α\,\mathbb E[x \mid z]}{σ},

with responsibilities ``r_c(z) ∝ w_c p(z | c)``: :class:`MixtureDenoiser` is this ε̂ as a
network (cost ``O(B · C · d)`` per call), and :func:`mixture_diffusion` a diffusion around it
(T = 1000 levels of a linear γ schedule).  Under
``y = A x + σ_y η`` the posterior is the mixture

.. math::

    p(x \mid y) = \sum_c π_c\, \mathcal N(x;\ μ_c, Σ_c),\quad
    S_c = A D_c A^\top + σ_y^2 I,\quad μ_c = m_c + D_c A^\top S_c^{-1}(y − A m_c),

    Σ_c = D_c − D_c A^\top S_c^{-1} A D_c,\quad π_c ∝ w_c\,\mathcal N(y;\ A m_c, S_c),

(``D_c = diag(s_c²)``): :func:`mixture_posterior`.  :func:`random_problem` draws a prior, a
dense A with unit-norm rows, a datum and its observation; :func:`sliced_wasserstein` and
:func:`mode_weights` are the metrics the posterior study reports (the latter the posterior
responsibilities averaged over draws, whose expectation under the exact posterior is π).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch import nn

from .observations import LinearObservation

__all__ = [
    "DiagonalMixture",
    "MixtureDenoiser",
    "mixture_diffusion",
    "mixture_posterior",
    "MixtureProblem",
    "random_mixture",
    "random_problem",
    "sliced_wasserstein",
    "mode_weights",
    "mode_weight_error",
]


@dataclass
class DiagonalMixture:
    """``Σ_c w_c N(m_c, diag(s_c²))``: ``weights`` (C,), ``means`` (C, d), ``scales`` (C, d), float64."""

    weights: torch.Tensor
    means: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.scales = torch.as_tensor(self.scales, dtype=torch.float64)
        if self.means.dim() != 2 or self.scales.shape != self.means.shape:
            raise ValueError(
                f"means, scales: expected two tensors of shape (C, d), got {tuple(self.means.shape)} "
                f"and {tuple(self.scales.shape)}"
            )
        if self.weights.shape != self.means.shape[:1] or (self.weights < 0).any():
            raise ValueError(f"weights: expected {self.means.shape[0]} non-negative weights")
        if not (self.scales > 0).all():
            raise ValueError("scales: expected positive component scales")
        self.weights = self.weights / self.weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def distribution(self) -> dist.MixtureSameFamily:
        components = dist.Normal(self.means, self.scales).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(probs=self.weights), components)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        index = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[index] + self.scales[index] * noise


class MixtureDenoiser(nn.Module):
    """The exact ε̂(z, γ) of a :class:`DiagonalMixture` (module docstring), float64 inside."""

    def __init__(self, mixture: DiagonalMixture) -> None:
        super().__init__()
        self.register_buffer("log_weights", mixture.weights.log())
        self.register_buffer("means", mixture.means)
        self.register_buffer("variances", mixture.scales**2)

    def posterior_mean(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """E[x | z] at levels ``gamma`` (B,), for z (B, d); float64.  Written with matrix
        products over the components (B · C · d flops in BLAS), one level at a time."""
        z = z.to(torch.float64)
        gamma = gamma.to(torch.float64).reshape(-1)
        if gamma.numel() == 1 or bool((gamma == gamma[0]).all()):
            return self._posterior_mean(z, gamma[0])
        return torch.cat([self._posterior_mean(z[i : i + 1], gamma[i]) for i in range(z.shape[0])])

    def _posterior_mean(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        a2, s2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)
        alpha = a2.sqrt()
        inv = 1.0 / (a2 * self.variances + s2)  # (C, d)
        m = self.means
        # log N(z; α m_c, diag(1/inv_c)) up to a constant, expanded in z
        const = -0.5 * (a2 * (m * m * inv).sum(-1) - inv.log().sum(-1)) + self.log_weights
        log_p = -0.5 * (z * z) @ inv.T + alpha * z @ (m * inv).T + const  # (B, C)
        resp = torch.softmax(log_p, -1)
        gain = self.variances * inv  # (C, d): v_c / (α² v_c + σ²)
        return resp @ (m - a2 * gain * m) + alpha * z * (resp @ gain)

    def forward(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        shape = z.shape
        flat = z.reshape(shape[0], -1)
        x_hat = self.posterior_mean(flat, gamma)
        g = gamma.to(torch.float64)[:, None]
        eps = (flat.to(torch.float64) - torch.sigmoid(-g).sqrt() * x_hat) / torch.sigmoid(g).sqrt()
        return eps.to(z.dtype).reshape(shape)


def mixture_diffusion(
    mixture: DiagonalMixture,
    num_steps: int = 1000,
    variance: str = "small",
    gamma_range: tuple[float, float] = (-12.0, 10.0),
):
    """A continuous-time :class:`~pyro_diffusion.diffusion.Diffusion` whose network is the
    exact denoiser of ``mixture``: a linear γ schedule over ``gamma_range`` (so a K-level
    sub-grid, ``num_steps=K`` in the samplers, is evenly spaced in log SNR), ``num_steps``
    levels of its own, the network's x̂ as the decoder's location (``decoder="ddpm"``)."""
    from ..diffusion import Diffusion
    from ..schedules import LinearGamma

    return Diffusion(
        MixtureDenoiser(mixture),
        LinearGamma(*gamma_range),
        (mixture.dim,),
        variance=variance,
        decoder="ddpm",
        num_steps=num_steps,
        name="mixture",
    )


def mixture_posterior(
    mixture: DiagonalMixture, observation: LinearObservation, y: torch.Tensor
) -> dist.MixtureSameFamily:
    """The exact p(x | y) of ``mixture`` under ``observation`` (scalar noise), a mixture of
    MultivariateNormal components, float64 (module docstring)."""
    if tuple(observation.event_shape) != (mixture.dim,):
        raise ValueError(
            f"observation: expected event_shape ({mixture.dim},), got {tuple(observation.event_shape)}"
        )
    observation.check_y(y)
    if y.dim() != 1:
        raise ValueError(f"y: expected one observation of shape (m,), got {tuple(y.shape)}")
    A = observation.matrix.to(torch.float64)
    y = y.to(torch.float64)
    noise_var = float(observation.noise_scale) ** 2
    D = mixture.scales**2  # (C, d)
    AD = A[None] * D[:, None, :]  # (C, m, d): A D_c
    S = AD @ A.T + noise_var * torch.eye(A.shape[0], dtype=torch.float64)  # (C, m, m)
    S = 0.5 * (S + S.transpose(-1, -2))
    gain = torch.linalg.solve(S, AD).transpose(-1, -2)  # (C, d, m): D_c Aᵀ S_c⁻¹
    resid = y - mixture.means @ A.T  # (C, m)
    means = mixture.means + (gain @ resid[..., None]).squeeze(-1)
    cov = torch.diag_embed(D) - gain @ AD
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    log_evidence = dist.MultivariateNormal(mixture.means @ A.T, covariance_matrix=S).log_prob(y)
    logits = log_evidence + mixture.weights.log()
    return dist.MixtureSameFamily(
        dist.Categorical(logits=logits), dist.MultivariateNormal(means, covariance_matrix=cov)
    )


@dataclass
class MixtureProblem:
    """One posterior problem: the prior, the observation, the datum it came from and y."""

    mixture: DiagonalMixture
    observation: LinearObservation
    x: torch.Tensor
    y: torch.Tensor

    def posterior(self) -> dist.MixtureSameFamily:
        return mixture_posterior(self.mixture, self.observation, self.y)


def random_mixture(
    dim: int, num_components: int = 20, generator: torch.Generator | None = None
) -> DiagonalMixture:
    """A random prior of ``num_components`` components in ``dim`` dimensions: means N(0, I),
    Dirichlet(1, …, 1) weights, per-coordinate scales log-uniform in [0.1, 0.4] (so the data
    have about unit variance per coordinate, the scale a DDPM expects)."""
    for name, value in (("dim", dim), ("num_components", num_components)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    means = torch.randn(num_components, dim, dtype=torch.float64, generator=generator)
    u = torch.rand(num_components, dim, dtype=torch.float64, generator=generator)
    scales = torch.exp(math.log(0.1) + u * math.log(4.0))
    weights = -torch.rand(num_components, dtype=torch.float64, generator=generator).log()
    return DiagonalMixture(weights, means, scales)


def random_problem(
    dim: int,
    num_observations: int,
    noise_scale: float,
    *,
    num_components: int = 20,
    seed: int = 0,
) -> MixtureProblem:
    """A random :class:`MixtureProblem`: :func:`random_mixture`, a dense Gaussian A of shape
    ``(num_observations, dim)`` with unit-norm rows, a datum x from the prior and
    ``y = A x + noise_scale · η``; all from ``seed``."""
    if (
        isinstance(num_observations, bool)
        or not isinstance(num_observations, int)
        or not 1 <= num_observations
    ):
        raise ValueError(f"num_observations: expected a positive int, got {num_observations!r}")
    generator = torch.Generator().manual_seed(seed)
    mixture = random_mixture(dim, num_components, generator)
    A = torch.randn(num_observations, dim, dtype=torch.float64, generator=generator)
    A = A / A.norm(dim=1, keepdim=True)
    observation = LinearObservation(A.to(torch.get_default_dtype()), (dim,), noise_scale)
    x = mixture.sample(1, generator)[0]
    y = A @ x + noise_scale * torch.randn(num_observations, dtype=torch.float64, generator=generator)
    return MixtureProblem(mixture, observation, x, y.to(torch.get_default_dtype()))


def sliced_wasserstein(
    x: torch.Tensor,
    reference: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    num_projections: int = 500,
    seed: int = 0,
    maximum: bool = False,
) -> float:
    """The sliced 2-Wasserstein distance (POT's ``ot.sliced_wasserstein_distance``; with
    ``maximum`` its ``ot.max_sliced_wasserstein_distance``) between draws ``x`` (n, d), weighted
    by ``weights`` (n,) when given, and equally weighted ``reference`` draws (n', d)."""
    import ot

    xs = x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu().numpy()
    xt = reference.detach().reshape(reference.shape[0], -1).to(torch.float64).cpu().numpy()
    a = None
    if weights is not None:
        w = weights.detach().to(torch.float64).cpu()
        a = (w / w.sum()).numpy()
    if maximum:
        return float(
            ot.max_sliced_wasserstein_distance(xs, xt, a=a, n_projections=num_projections, seed=seed)
        )
    return float(ot.sliced_wasserstein_distance(xs, xt, a=a, n_projections=num_projections, seed=seed))


def mode_weights(
    posterior: dist.MixtureSameFamily, x: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The estimated component weights of ``posterior`` from draws ``x`` (n, d): the mean over
    draws (weighted by ``weights``) of the posterior responsibilities r_c(x), whose expectation
    under the exact posterior is its mixing weights π."""
    comp = posterior.component_distribution
    x = x.detach().to(torch.float64).reshape(x.shape[0], 1, -1)
    log_r = comp.log_prob(x) + posterior.mixture_distribution.logits  # (n, C)
    r = torch.softmax(log_r, -1)
    if weights is None:
        return r.mean(0)
    w = weights.detach().to(torch.float64)
    return (w[:, None] * r).sum(0) / w.sum()


def mode_weight_error(
    posterior: dist.MixtureSameFamily, x: torch.Tensor, weights: torch.Tensor | None = None
) -> float:
    """Total variation ``½ Σ_c |π̂_c − π_c|`` between :func:`mode_weights` and the exact π."""
    exact = posterior.mixture_distribution.probs
    return 0.5 * (mode_weights(posterior, x, weights) - exact).abs().sum().item()
