"""Helpers for the tests of pyro_diffusion.inference: diffusions whose reverse chain is
linear-Gaussian on any grid, so that p_θ(x_0) and p_θ(x_0 | y) are known exactly.

* :func:`linear_diffusion` — a DDPM (``GaussianDiffusion``, tabulated schedule) with a linear
  ε-predictor indexed by its steps (so it is defined on the model's grid and every sub-grid).
* :func:`learned_gaussian_diffusion` — a continuous-time model with a learned schedule
  (``LearnedGamma`` with a non-linear shape) whose denoiser is the exact posterior mean of
  Gaussian data, ``E[x | z]`` at any noise level γ, so the chain on any K-level grid is linear.
"""

import torch
from torch import nn
from torch.distributions import kl_divergence

from _helpers import linear_denoiser
from pyro_diffusion import Diffusion, GaussianDiffusion, LearnedGamma, NoiseSchedule


def linear_diffusion(event_shape=(2,), betas=(0.05, 0.1, 0.2, 0.3, 0.4), seed=0, name="diffusion"):
    """A GaussianDiffusion with a linear ε-predictor indexed by its steps: every reverse step
    is affine in x_t, so the whole chain (and its conditionals) is Gaussian."""
    schedule = NoiseSchedule(torch.tensor(betas, dtype=torch.float64))
    return GaussianDiffusion(
        linear_denoiser(event_shape, schedule, seed=seed), schedule, event_shape, variance="small", name=name
    )


DATA_MEAN = (0.5, -0.3)
DATA_COVARIANCE = ((0.5, 0.2), (0.2, 0.3))


class GaussianPosteriorDenoiser(nn.Module):
    """The exact ε̂ for data x ~ N(m, S) at noise level γ: with z = α x + σ ε,
    E[x | z] = m + α S (α² S + σ² I)⁻¹ (z − α m) and ε̂ = (z − α E[x | z]) / σ, computed in
    S's eigenbasis (float64 inside)."""

    def __init__(self, mean=DATA_MEAN, covariance=DATA_COVARIANCE):
        super().__init__()
        covariance = torch.tensor(covariance, dtype=torch.float64)
        values, vectors = torch.linalg.eigh(covariance)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64))
        self.register_buffer("values", values)
        self.register_buffer("vectors", vectors)

    def forward(self, z, gamma):
        z64 = z.reshape(z.shape[0], -1).to(torch.float64)
        gamma = gamma.to(torch.float64)[:, None]
        a2, s2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)
        alpha = a2.sqrt()
        rotated = (z64 - alpha * self.mean) @ self.vectors  # in S's eigenbasis
        x_hat = self.mean + (alpha * self.values / (a2 * self.values + s2) * rotated) @ self.vectors.T
        return ((z64 - alpha * x_hat) / s2.sqrt()).to(z.dtype).reshape(z.shape)


def gaussian_ddpm(num_steps=100, variance="large", name="ddpm"):
    """A DDPM (GaussianDiffusion, DDPM's linear β range at T levels, its Gaussian decoder)
    with the exact denoiser of Gaussian data: its chain is linear on the T-level grid and on
    every respaced sub-grid."""
    schedule = NoiseSchedule.linear(num_steps)
    return GaussianDiffusion(GaussianPosteriorDenoiser(), schedule, (2,), variance=variance, name=name)


def learned_gaussian_diffusion(decoder="plain", num_steps=1000, name="learned"):
    """A continuous-time Diffusion with a learned schedule (non-linear shape, endpoints
    γ(0) = −6, γ(1) = 6), variance "small", the exact denoiser of Gaussian data."""
    torch.manual_seed(0)
    schedule = LearnedGamma(-6.0, 6.0, hidden=8)
    with torch.no_grad():
        schedule.raw_out_weight.fill_(0.5)  # a shape far from linear
    return Diffusion(
        GaussianPosteriorDenoiser(), schedule, (2,), decoder=decoder, num_steps=num_steps, name=name
    )


@torch.no_grad()
def linear_chain_marginal(diffusion, num_steps=None):
    """(mean, covariance) of p_θ(x_0) for a diffusion whose steps are affine on the grid
    ``diffusion.grid(num_steps)``: x_{k-1} = M_k x_k + b_k + s_k z, propagated from
    x_K ~ N(0, I) in float64 with the core's reverse steps and decoder."""
    d = diffusion.event_size
    shape = diffusion.event_shape
    grid = diffusion.grid(num_steps).detach().to(torch.float64)
    K = grid.shape[0]
    mean = torch.zeros(d, dtype=torch.float64)
    cov = torch.eye(d, dtype=torch.float64)
    points = torch.cat([torch.zeros(1, d), torch.eye(d)]).to(torch.float64).reshape(-1, *shape)
    for k in range(K, 0, -1):
        if k > 1:
            step, _ = diffusion.reverse_step(points, grid[k - 2], grid[k - 1])
        else:
            step = diffusion.decoder_distribution(points, grid[0])
        loc = step.loc.reshape(d + 1, d)
        b = loc[0]
        M = (loc[1:] - b).T  # column i = μ(e_i) − b
        var = step.scale.reshape(d + 1, d)[0] ** 2
        mean = M @ mean + b
        cov = M @ cov @ M.T + torch.diag(var)
    return mean, cov


def gaussian_conditional(mean, cov, A, noise_var, y):
    """p(x | y) for x ~ N(mean, cov), y = A x + N(0, noise_var I): (mean, cov, log p(y))."""
    S = A @ cov @ A.T + noise_var * torch.eye(A.shape[0], dtype=cov.dtype)
    K = cov @ A.T @ torch.linalg.inv(S)
    post_mean = mean + K @ (y - A @ mean)
    post_cov = cov - K @ A @ cov
    log_evidence = torch.distributions.MultivariateNormal(A @ mean, S).log_prob(y)
    return post_mean, post_cov, log_evidence.item()


def exact_conditional(diffusion, observation, y, num_steps=None):
    """(mean, covariance, log p_θ(y)) of the exact p_θ(x_0 | y) of a linear chain on the grid
    ``num_steps``, for a LinearObservation with scalar noise."""
    mean, cov = linear_chain_marginal(diffusion, num_steps)
    noise_var = float(observation.noise_scale) ** 2
    return gaussian_conditional(mean, cov, observation.matrix.double(), noise_var, y.double())


def exact_elbo(diffusion, x0, num_steps=None):
    """ELBO_θ(x_0) ``(B,)`` of a linear chain on the grid ``num_steps``, its expectations over
    q(x_k | x_0) exact: every term is quadratic in the noise ε of x_k, so the mean over the 2D
    sigma points ±√D e_i is its expectation.  KLs between plain Normals (not the core's
    registered forms); float64."""
    import pyro.distributions as dist

    grid = diffusion.grid(num_steps).detach().to(torch.float64)
    K, D = grid.shape[0], diffusion.event_size
    x0 = x0.to(torch.float64)
    points = torch.cat([torch.eye(D), -torch.eye(D)]).to(torch.float64) * D**0.5  # (2D, D)
    z = x0[:, None, :] + 0 * points  # (B, 2D, D)
    eps = points.expand_as(z)
    x0s = x0[:, None, :].expand_as(z)

    def level(k):
        g = grid[k - 1]
        return torch.sigmoid(-g).sqrt() * x0s + torch.sigmoid(g).sqrt() * eps

    prior = diffusion.marginal(x0, grid[-1])
    total = -kl_divergence(dist.Normal(prior.loc, prior.scale), dist.Normal(0.0, 1.0)).sum(-1)
    for k in range(K, 1, -1):
        x_k = level(k)
        q = diffusion.forward_step(x0s, x_k, grid[k - 2], grid[k - 1])
        p, _ = diffusion.reverse_step(x_k, grid[k - 2], grid[k - 1])
        kl = kl_divergence(dist.Normal(q.loc, q.scale), dist.Normal(p.loc, p.scale))
        total = total - kl.sum(-1).mean(1)
    decoder = diffusion.decoder_distribution(level(1), grid[0])
    return total + dist.Normal(decoder.loc, decoder.scale).log_prob(x0s).sum(-1).mean(1)


def mean_field_optimum(diffusion, observation, y, num_steps=None):
    """The optimum of ``svi_conditional``'s objective over mean-field Normals q(x_0) =
    N(μ, diag s²), for a linear chain: with ELBO_θ(x_0) = −½ x_0ᵀ P x_0 + hᵀ x_0 + c and
    Λ = P + AᵀA/σ_y², b = h + Aᵀy/σ_y², μ = Λ⁻¹ b and s_i = Λ_ii^{−1/2}.  Returns
    (μ, s, the optimal −ELBO)."""
    import math

    D = diffusion.event_size
    zero = torch.zeros(1, D, dtype=torch.float64)
    c = exact_elbo(diffusion, zero, num_steps)[0]
    h = torch.autograd.functional.jacobian(lambda x: exact_elbo(diffusion, x, num_steps).sum(), zero)[0]
    P = -torch.autograd.functional.hessian(lambda x: exact_elbo(diffusion, x[None], num_steps)[0], zero[0])
    A = observation.matrix.double()
    noise_var = float(observation.noise_scale) ** 2
    y = y.double()
    Lam = P + A.T @ A / noise_var
    b = h + A.T @ y / noise_var
    mu = torch.linalg.solve(Lam, b)
    s = Lam.diagonal().rsqrt()
    m = A.shape[0]
    log_lik_const = -0.5 * m * math.log(2 * math.pi * noise_var) - 0.5 * (y @ y) / noise_var
    objective = (
        c
        + log_lik_const
        + b @ mu
        - 0.5 * mu @ Lam @ mu
        - 0.5 * (Lam.diagonal() * s**2).sum()
        + (0.5 * torch.log(2 * math.pi * math.e * s**2)).sum()
    )
    return mu, s, -objective.item()
