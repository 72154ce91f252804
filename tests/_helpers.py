"""Shared helpers for the tests (independent of the package's own code paths)."""

import math

import torch
from torch import nn


class LinearDenoiser(nn.Module):
    """A tiny deterministic denoiser: a linear map of x_t plus a per-step bias, any event shape."""

    def __init__(self, event_shape, num_steps, learned_variance=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = math.prod(event_shape)
        out = d * (2 if learned_variance else 1)
        self.event_shape = tuple(event_shape)
        self.learned_variance = learned_variance
        self.weight = nn.Parameter(0.3 * torch.randn(out, d, generator=g, dtype=torch.float64))
        self.bias = nn.Parameter(0.1 * torch.randn(num_steps, out, generator=g, dtype=torch.float64))

    def forward(self, x, t):
        flat = x.reshape(x.shape[0], -1)
        out = flat @ self.weight.T.to(x.dtype) + self.bias.to(x.dtype)[t - 1]
        if self.learned_variance:
            mean, var = out.chunk(2, dim=1)
            shape = (x.shape[0],) + self.event_shape
            return torch.cat([mean.reshape(shape), torch.tanh(var).reshape(shape)], dim=1)
        return out.reshape(x.shape)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The (V-statistic) energy distance 2E|X−Y| − E|X−X'| − E|Y−Y'|."""
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def independent_step_kl(schedule, x0, x_t, t, model_loc, model_log_var):
    """KL(q(x_{t-1}|x_t,x_0) ‖ N(model_loc, exp(model_log_var))) per datum from DESIGN.md §1–2,
    written out from the betas alone (float64, no package helpers)."""
    betas = schedule.betas.double()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    i = t - 1
    coef0 = (abar_prev[i].sqrt() * betas[i] / (1 - abar[i])).reshape(-1, *[1] * (x0.dim() - 1))
    coeft = (alphas[i].sqrt() * (1 - abar_prev[i]) / (1 - abar[i])).reshape(coef0.shape)
    var_q = (betas[i] * (1 - abar_prev[i]) / (1 - abar[i])).reshape(coef0.shape)
    mu_q = coef0 * x0.double() + coeft * x_t.double()
    var_p = torch.exp(model_log_var.double())
    kl = 0.5 * (torch.log(var_p / var_q) + (var_q + (mu_q - model_loc.double()) ** 2) / var_p - 1)
    return kl.expand_as(x0).reshape(x0.shape[0], -1).sum(1)
