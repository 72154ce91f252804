"""Shared helpers for the tests, written independently of the package's own code paths: the
DDPM quantities from the βs alone, Bayes-optimal denoisers, and small statistics."""

import math

import torch
from torch import nn

from pyro_diffusion.nets import StepIndexed


class LinearDenoiser(nn.Module):
    """A tiny deterministic step-indexed network ``net(x_t, t)`` (t a LongTensor of 1-based
    steps): a linear map of x_t plus a per-step bias, any event shape.  Give it to a diffusion
    through :class:`~pyro_diffusion.nets.StepIndexed` (:func:`linear_denoiser`)."""

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
        if t.dtype != torch.long:
            raise TypeError(f"t: expected a LongTensor of 1-based steps, got {t.dtype}")
        flat = x.reshape(x.shape[0], -1)
        out = flat @ self.weight.T.to(x.dtype) + self.bias.to(x.dtype)[t - 1]
        if self.learned_variance:
            mean, var = out.chunk(2, dim=1)
            shape = (x.shape[0],) + self.event_shape
            return torch.cat([mean.reshape(shape), torch.tanh(var).reshape(shape)], dim=1)
        return out.reshape(x.shape)


def linear_denoiser(event_shape, schedule, learned_variance=False, seed=0) -> StepIndexed:
    """A :class:`LinearDenoiser` on ``schedule``'s T steps, called with noise levels."""
    net = LinearDenoiser(event_shape, schedule.num_steps, learned_variance, seed)
    return StepIndexed(net, schedule, long=True)


# ---------------------------------------------------------------------------- DDPM from the βs
def ddpm_tables(betas: torch.Tensor) -> dict:
    """α_t, ᾱ_t, ᾱ_{t−1}, β̃_t (t = 1..T, float64) from the βs by the DDPM formulas."""
    betas = betas.double()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return {
        "betas": betas,
        "alphas": alphas,
        "abar": abar,
        "abar_prev": abar_prev,
        "tilde": betas * (1 - abar_prev) / (1 - abar),
        "coef_x0": abar_prev.sqrt() * betas / (1 - abar),
        "coef_xt": alphas.sqrt() * (1 - abar_prev) / (1 - abar),
    }


def _at(values, t, like):
    return values[t - 1].reshape(-1, *[1] * (like.dim() - 1))


def independent_reverse(betas, mean, variance, output, x_t, t, variance_output=None):
    """(loc, log variance) of DDPM's p_θ(x_{t−1} | x_t) for steps ``t`` ≥ 2 ``(B,)`` from the
    network's raw output, by the DDPM formulas (float64)."""
    k = ddpm_tables(betas)
    x_t, output = x_t.double(), output.double()
    if mean == "eps":
        loc = (x_t - _at(k["betas"] / (1 - k["abar"]).sqrt(), t, x_t) * output) / _at(
            k["alphas"].sqrt(), t, x_t
        )
    elif mean == "x0":
        loc = _at(k["coef_x0"], t, x_t) * output + _at(k["coef_xt"], t, x_t) * x_t
    elif mean == "mu":
        loc = output
    else:
        raise ValueError(mean)
    log_small, log_large = _at(k["tilde"].log(), t, x_t), _at(k["betas"].log(), t, x_t)
    if variance == "small":
        log_var = log_small
    elif variance == "large":
        log_var = log_large
    else:
        v = (variance_output.double() + 1) / 2
        log_var = v * log_large + (1 - v) * log_small
    return loc, log_var.expand_as(x_t)


def independent_decoder(betas, mean, variance, output, x_1, variance_output=None):
    """(loc, log variance) of DDPM's decoder p_θ(x_0 | x_1): the network's x̂ with the clipped
    variance β̃_2 (learned: the interpolation between β_1 and β̃_2)."""
    k = ddpm_tables(betas)
    x_1, output = x_1.double(), output.double()
    if mean == "eps":
        loc = (x_1 - (1 - k["abar"][0]).sqrt() * output) / k["abar"][0].sqrt()
    else:  # "x0", and "mu" (at t = 1 the posterior mean is x_0 itself)
        loc = output
    log_small = k["tilde"][1].log()
    if variance == "learned":
        v = (variance_output.double() + 1) / 2
        log_var = v * k["betas"][0].log() + (1 - v) * log_small
    else:
        log_var = log_small.expand_as(x_1)
    return loc, log_var


def independent_step_kl(betas, x0, x_t, t, model_loc, model_log_var):
    """KL(q(x_{t-1}|x_t,x_0) ‖ N(model_loc, exp(model_log_var))) per datum, written out from
    the βs alone (float64, no package helpers)."""
    k = ddpm_tables(betas)
    var_q = _at(k["tilde"], t, x0)
    mu_q = _at(k["coef_x0"], t, x0) * x0.double() + _at(k["coef_xt"], t, x0) * x_t.double()
    var_p = torch.exp(model_log_var.double())
    kl = 0.5 * (torch.log(var_p / var_q) + (var_q + (mu_q - model_loc.double()) ** 2) / var_p - 1)
    return kl.expand_as(x0).reshape(x0.shape[0], -1).sum(1)


def independent_prior_kl(betas, x0):
    """KL(q(x_T | x_0) ‖ N(0, I)) per datum from ᾱ_T."""
    abar = ddpm_tables(betas)["abar"][-1]
    m2 = abar * x0.double() ** 2
    return (0.5 * (m2 + (1 - abar) - torch.log(1 - abar) - 1)).reshape(x0.shape[0], -1).sum(1)


def gaussian_log_prob(x, loc, log_var):
    """log N(x; loc, exp(log_var)) summed over each datum's dimensions."""
    x, loc, log_var = x.double(), loc.double(), log_var.double()
    value = -0.5 * ((x - loc) ** 2 / log_var.exp() + log_var + math.log(2 * math.pi))
    return value.expand_as(x).reshape(x.shape[0], -1).sum(1)


# ---------------------------------------------------------------------------- exact denoisers
class OptimalGaussianDenoiser(nn.Module):
    """E[ε | z] for data x ~ N(0, v I): ε̂(z, γ) = σ z / (α² v + σ²), a function of γ alone."""

    def __init__(self, variance: float) -> None:
        super().__init__()
        self.variance = variance
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, z, gamma):
        g = gamma.to(torch.float64)
        alpha2, sigma2 = torch.sigmoid(-g), torch.sigmoid(g)
        weight = sigma2.sqrt() / (alpha2 * self.variance + sigma2)
        return weight.to(z.dtype).reshape(-1, *[1] * (z.dim() - 1)) * z + 0 * self.dummy


class OptimalPointsDenoiser(nn.Module):
    """E[ε | z] for data uniform on a finite set of points ``(N, D)``: x̂ is the posterior mean
    over the points, ε̂ = (z − α x̂)/σ."""

    def __init__(self, points: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("points", points.double())

    def forward(self, z, gamma):
        g = gamma.to(torch.float64)[:, None]
        alpha, sigma = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
        flat = z.reshape(z.shape[0], -1).double()
        d2 = ((flat[:, None, :] - alpha[:, :, None] * self.points[None]) ** 2).sum(-1)
        weights = torch.softmax(-0.5 * d2 / sigma**2, dim=1)
        x0 = weights @ self.points
        return ((flat - alpha * x0) / sigma).to(z.dtype).reshape(z.shape)


# ---------------------------------------------------------------------------- statistics
def mean_and_se(values) -> tuple[float, float]:
    """(mean, its standard error) of independent draws."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def assert_agree(a: tuple[float, float], b: tuple[float, float], z: float = 4.0, what: str = ""):
    """Two (mean, standard error) estimates of the same number agree within ``z`` joint SEs."""
    (m1, s1), (m2, s2) = a, b
    assert abs(m1 - m2) < z * math.hypot(s1, s2), (what, m1, s1, m2, s2)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The (V-statistic) energy distance 2E|X−Y| − E|X−X'| − E|Y−Y'|."""
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def fix_marginal_draws(monkeypatch, grid: torch.Tensor, values: dict):
    """Make every draw from q(x_t | x_0) at a level γ_t of ``grid`` return ``values[t]``
    (``(B, *event)``; row r of a batch of repeated data gets datum r mod B): the same x_t for
    the full chain, the batched bound and the step-restricted programs."""
    from pyro_diffusion.chains import ForwardMarginal

    levels = torch.nn.functional.logsigmoid(grid.detach().double())  # log σ_t²
    batch = next(iter(values.values())).shape[0]

    def rsample(self, sample_shape=torch.Size()):
        rows = self.loc.shape[0]
        log_var = torch.as_tensor(self.log_variance).detach().double().reshape(-1)
        log_var = log_var.expand(rows) if log_var.numel() == 1 else log_var
        steps = (log_var[:, None] - levels[None]).abs().argmin(1) + 1
        assert torch.allclose(levels[steps - 1], log_var, rtol=0, atol=1e-12), "a level off the grid"
        out = torch.stack([values[int(t)][r % batch] for r, t in enumerate(steps.tolist())])
        return out.to(self.loc.dtype)

    monkeypatch.setattr(ForwardMarginal, "rsample", rsample)
