"""Helpers for the tests of pyro_diffusion.inference: a linear-Gaussian diffusion whose
marginal p_θ(x_0) and conditional p_θ(x_0 | y) are known exactly."""

import torch

from _helpers import LinearDenoiser
from pyro_diffusion import GaussianDiffusion, NoiseSchedule
from pyro_diffusion.inference.prior import reverse_step


def linear_diffusion(event_shape=(2,), betas=(0.05, 0.1, 0.2, 0.3, 0.4), seed=0, name="diffusion"):
    """A GaussianDiffusion with a linear ε-predictor: every reverse step is affine in x_t, so
    the whole chain (and its conditionals) is Gaussian."""
    schedule = NoiseSchedule(torch.tensor(betas, dtype=torch.float64))
    denoiser = LinearDenoiser(event_shape, len(betas), seed=seed)
    return GaussianDiffusion(denoiser, schedule, event_shape, variance="small", name=name)


@torch.no_grad()
def linear_chain_marginal(diffusion):
    """(mean, covariance) of p_θ(x_0) for a diffusion whose steps are affine:
    x_{t-1} = M_t x_t + b_t + σ_t z, propagated from x_T ~ N(0, I) in float64."""
    d = diffusion.event_size
    shape = diffusion.event_shape
    mean = torch.zeros(d, dtype=torch.float64)
    cov = torch.eye(d, dtype=torch.float64)
    for t in range(diffusion.num_steps, 0, -1):
        points = torch.cat([torch.zeros(1, d), torch.eye(d)]).to(torch.float64)
        loc, log_var = reverse_step(diffusion, points.reshape(-1, *shape), t)
        loc = loc.reshape(d + 1, d)
        b = loc[0]
        M = (loc[1:] - b).T  # column i = μ(e_i) − b
        var = log_var.reshape(d + 1, d)[0].exp()
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
