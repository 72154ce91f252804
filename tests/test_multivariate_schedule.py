"""A per-dimension learned schedule (MultivariateLearnedGamma): a diagonal forward process.

The checks: it starts as the scalar linear schedule and with all dimensions equal every path
(bound, vlb_terms, DiffusionELBO and its gradients, samplers) gives the scalar schedule's
numbers; Pyro's TraceMeanField_ELBO on the step programs is DiffusionELBO; the per-step KLs
agree with Monte Carlo over the densities; the K-level bound tends to the continuous one as
O(1/K); for Gaussian data with independent dimensions and the Bayes-optimal denoiser the
continuous bound has its closed form; every γ_d is increasing; training moves the
per-dimension endpoints apart on data whose dimensions have different scales.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch import nn
from torch.distributions import kl_divergence

from pyro_diffusion import Diffusion, DiffusionELBO, LinearGamma, MLPDenoiser, StepDraw
from pyro_diffusion.bound import bound_samples, decoder_term, prior_term, vlb_terms
from pyro_diffusion.chains import InfinitesimalStep
from pyro_diffusion.parameterization import broadcast
from pyro_diffusion.schedules import SCHEDULES, GammaAt, MultivariateLearnedGamma, Schedule


def _randomized(event_shape, seed=0, bins=4, tied=False) -> MultivariateLearnedGamma:
    """A per-dimension schedule with non-trivial shapes and endpoints (all dimensions equal
    when ``tied``)."""
    schedule = MultivariateLearnedGamma(event_shape, -8.0, 5.0, bins=bins)
    g = torch.Generator().manual_seed(seed)
    size = (1,) if tied else tuple(event_shape)
    with torch.no_grad():
        schedule.log_slopes.copy_(
            torch.randn((*size, bins), generator=g, dtype=torch.float64).expand_as(schedule.log_slopes)
        )
        schedule.gamma_min.add_(
            torch.randn(size, generator=g, dtype=torch.float64).expand_as(schedule.gamma_min)
        )
        schedule.gamma_max.add_(
            torch.randn(size, generator=g, dtype=torch.float64).expand_as(schedule.gamma_max)
        )
    return schedule


class FirstDimension(Schedule):
    """The scalar schedule γ(t) = γ_0(t) of a per-dimension schedule's first dimension."""

    def __init__(self, schedule: MultivariateLearnedGamma) -> None:
        super().__init__()
        self.inner = schedule

    def evaluate(self, t):
        at = self.inner.evaluate(t)
        first = (slice(None),) + (0,) * len(self.inner.event_shape)
        return GammaAt(at.gamma[first], at.derivative[first])


def _pair(decoder="plain", variance="small", mean="eps", num_levels=None, seed=0):
    """Two diffusions with the same network: the per-dimension schedule with tied dimensions,
    and the scalar schedule of its first dimension."""
    event_shape = (2,)
    torch.manual_seed(seed)
    net = MLPDenoiser(event_shape, hidden=16, depth=1, learned_variance=variance == "learned")
    multi = _randomized(event_shape, seed=seed, tied=True)
    kwargs = dict(decoder=decoder, variance=variance, mean=mean, num_levels=num_levels, num_steps=12)
    return Diffusion(net, multi, event_shape, **kwargs), Diffusion(
        net, FirstDimension(multi), event_shape, **kwargs
    )


def _data(n=6, seed=0, num_levels=None):
    g = torch.Generator().manual_seed(seed)
    if num_levels:
        return torch.randint(0, num_levels, (n, 2), generator=g).float() / (num_levels - 1) * 2 - 1
    return torch.randn(n, 2, generator=g) * torch.tensor([0.3, 1.0])


# ---------------------------------------------------------------------------- the schedule
def test_starts_as_the_scalar_linear_schedule_exactly():
    schedule = MultivariateLearnedGamma((1, 3, 2), -13.3, 5.0)
    linear = LinearGamma(-13.3, 5.0)
    t = torch.cat([torch.rand(50, dtype=torch.float64), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)])
    at, ref = schedule(t), linear(t)
    assert at.gamma.shape == at.derivative.shape == (53, 1, 3, 2)
    assert torch.equal(at.gamma, ref.gamma.reshape(-1, 1, 1, 1).expand_as(at.gamma))
    assert torch.equal(at.derivative, ref.derivative.reshape(-1, 1, 1, 1).expand_as(at.gamma))
    assert schedule.grid(7).shape == (7, 1, 3, 2)
    low, high = schedule.endpoint_levels()
    assert torch.equal(low, torch.full((1, 3, 2), -13.3, dtype=torch.float64))
    assert torch.equal(high, torch.full((1, 3, 2), 5.0, dtype=torch.float64))
    # endpoints(): scalars, the means (what the network sees at the two ends; engine logs)
    assert [v.item() for v in schedule.endpoints()] == pytest.approx([-13.3, 5.0], abs=1e-12)
    assert schedule.is_learned and not at.shape_outputs


def test_every_dimension_is_increasing_with_the_closed_form_derivative():
    schedule = _randomized((3, 2), seed=1, bins=5)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    at = schedule(t)
    assert (at.gamma[1:] > at.gamma[:-1]).all()
    assert (at.derivative > 0).all()
    assert torch.allclose(at.gamma[0], schedule.gamma_min) and torch.allclose(
        at.gamma[-1], schedule.gamma_max
    )
    # central differences away from the bins' edges
    inner = torch.tensor([0.05, 0.33, 0.5 + 0.03, 0.71, 0.93], dtype=torch.float64)
    h = 1e-6
    numeric = (schedule.gamma(inner + h) - schedule.gamma(inner - h)) / (2 * h)
    assert torch.allclose(schedule(inner).derivative, numeric, rtol=1e-6)


def test_registry_and_bad_arguments():
    schedule = SCHEDULES["learned-multivariate"](
        100, event_shape=(1, 8, 8), gamma_min=-2.0, gamma_max=4.0, hidden=8
    )
    assert isinstance(schedule, MultivariateLearnedGamma) and schedule.bins == 8
    assert schedule.event_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="event_shape"):
        SCHEDULES["learned-multivariate"](100)
    with pytest.raises(ValueError, match="bins"):
        MultivariateLearnedGamma((2,), bins=0)
    with pytest.raises(ValueError, match="gamma_min, gamma_max"):
        MultivariateLearnedGamma((2,), 3.0, 1.0)
    with pytest.raises(ValueError, match="schedule"):
        Diffusion(MLPDenoiser(3), MultivariateLearnedGamma((2,)), (3,))


# ---------------------------------------------------------------------------- the scalar special case
@pytest.mark.parametrize(
    "decoder, variance, mean, num_levels",
    [
        ("plain", "small", "eps", None),
        ("network", "large", "v", None),
        ("ddpm", "learned", "x0", 17),
        ("network", "small", "eps", 17),
    ],
)
def test_tied_dimensions_give_the_scalar_schedules_numbers(decoder, variance, mean, num_levels):
    multi, scalar = _pair(decoder, variance, mean, num_levels)
    x = _data(num_levels=num_levels)
    results = []
    for d in (multi, scalar):
        out = {}
        torch.manual_seed(3)
        out["vlb"] = vlb_terms(d, x)
        torch.manual_seed(3)
        out["vlb8"] = vlb_terms(d, x, num_steps=8)
        torch.manual_seed(3)
        out["continuous"] = bound_samples(d, x, num_steps=0, num_times=4)
        torch.manual_seed(3)
        out["grid"] = bound_samples(d, x, num_steps=None, num_times=4)
        for name, loss in (
            ("elbo0", DiffusionELBO(0)),
            ("elbo0-ld", DiffusionELBO(0, "low-discrepancy")),
            ("elbo", DiffusionELBO()),
            ("elbo6", DiffusionELBO(6, "low-discrepancy")),
        ):
            d.zero_grad()
            pyro.clear_param_store()
            torch.manual_seed(4)
            value = loss.differentiable_loss(d.model, d.guide, x)
            value.backward()
            out[name] = value.detach()
            out[name + "-net"] = torch.cat([p.grad.reshape(-1) for p in d.denoiser.parameters()])
            inner = d.schedule if isinstance(d.schedule, MultivariateLearnedGamma) else d.schedule.inner
            # tied dimensions: the scalar schedule's gradient is the sum over the dimensions
            grads = [inner.gamma_min.grad, inner.gamma_max.grad, inner.log_slopes.grad]
            out[name + "-schedule"] = torch.cat(
                [g.sum(0).reshape(-1) if d is multi else g[0].reshape(-1) for g in grads]
            )
        torch.manual_seed(5)
        out["ancestral"] = d.sample(5)
        torch.manual_seed(5)
        out["ddim"] = d.sample(5, num_steps=6, method="ddim", eta=0.3)
        results.append(out)
    for key in results[0]:
        a, b = results[0][key], results[1][key]
        assert a.shape == b.shape, key
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), (key, (a - b).abs().max())


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # an InfinitesimalStep has no density
def test_trace_mean_field_elbo_on_the_step_programs_is_diffusion_elbo():
    torch.manual_seed(0)
    event_shape = (1, 2, 2)
    d = Diffusion(
        MLPDenoiser(event_shape, hidden=16, depth=1),
        _randomized(event_shape, 2),
        event_shape,
        num_steps=10,
        decoder="network",
    )
    x = torch.randn(5, *event_shape)
    for num_steps, draw in (
        (0, lambda: StepDraw(times_values=torch.rand(5, dtype=torch.float64))),
        (None, lambda: StepDraw(index=torch.tensor([1, 2, 5, 9, 10]))),
        (7, lambda: StepDraw(index=torch.tensor([1, 3, 4, 6, 7]))),
    ):
        fixed = draw()
        seed = 11
        torch.manual_seed(seed)
        pyro.clear_param_store()
        loss = DiffusionELBO(num_steps)
        ours = loss.per_datum(*loss.traces(d.model, d.guide, (x,), {}, draw=fixed)).sum()
        # the same draw again, through Pyro's own ELBO
        again = draw() if num_steps != 0 else StepDraw(times_values=fixed.fixed_times.clone())
        torch.manual_seed(seed)
        pyro.clear_param_store()
        theirs = TraceMeanField_ELBO().differentiable_loss(
            d.model, d.guide, x, steps=again, num_steps=num_steps
        )
        assert torch.allclose(ours, theirs, rtol=1e-5), (num_steps, ours, theirs)


def test_step_prior_and_decoder_terms_match_monte_carlo_of_the_densities():
    """KL(q(z_s|z_t,x) ‖ p(z_s|z_t)) of a step with per-dimension levels, for the posterior and
    the transition variance, against the mean of log q − log p over draws of q; the prior term
    against Monte Carlo; the decoder term is −log p(x | z_1) of the per-dimension decoder."""
    event_shape = (3,)
    torch.manual_seed(1)
    schedule = _randomized(event_shape, 3)
    grid = schedule.grid(6).detach()
    x = torch.randn(4, 3, dtype=torch.float64)
    for variance in ("small", "large"):
        torch.manual_seed(2)
        d = Diffusion(
            MLPDenoiser(event_shape, hidden=8, depth=1).double(), schedule, event_shape, variance=variance
        )
        gamma_s, gamma_t = grid[2], grid[3]
        z_t = d.marginal(x, gamma_t).sample()
        q = d.forward_step(x, z_t, gamma_s, gamma_t)
        p, _ = d.reverse_step(z_t, gamma_s, gamma_t)
        analytic = kl_divergence(q, p).sum(-1)
        draws = q.sample((200_000,))
        monte_carlo = (
            (q.log_prob(draws) - torch.distributions.Normal(p.loc, p.scale).log_prob(draws)).sum(-1).mean(0)
        )
        assert torch.allclose(analytic, monte_carlo, atol=0.02, rtol=0.02), (variance, analytic, monte_carlo)
        # per dimension, with the posterior variance: ½ expm1(γ_t,d − γ_s,d)(ε_d − ε̂_d)²
        if variance == "small":
            eps = d.noise_of(x, z_t, gamma_t)
            expected = 0.5 * torch.expm1(gamma_t - gamma_s) * (eps - p.eps_hat) ** 2
            assert torch.allclose(kl_divergence(q, p), expected, rtol=1e-10)
    prior = prior_term(d, x, grid[-1])
    m = d.marginal(x, grid[-1])
    draws = m.sample((200_000,))
    standard = torch.distributions.Normal(0.0, 1.0)
    mc = (m.log_prob(draws) - standard.log_prob(draws)).sum(-1).mean(0)
    assert torch.allclose(prior, mc, atol=0.01, rtol=0.01)
    torch.manual_seed(7)
    ours = decoder_term(d, x, grid[0])
    torch.manual_seed(7)
    z_1 = d.marginal(x, grid[0]).rsample()
    alpha, sigma = torch.sigmoid(-grid[0]).sqrt(), torch.sigmoid(grid[0]).sqrt()
    direct = -torch.distributions.Normal(z_1 / alpha, sigma / alpha).log_prob(x).sum(-1)
    assert torch.allclose(ours, direct)


class OptimalIndependentDenoiser(nn.Module):
    """E[ε | z] for data x ~ N(0, diag(v)) under a per-dimension schedule: ε̂_d = σ_d z_d /
    (α_d² v_d + σ_d²), with γ_d recovered from the network's level (the mean of the γ_d, an
    increasing function of t, inverted by bisection)."""

    def __init__(self, schedule: MultivariateLearnedGamma, variances: torch.Tensor) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("variances", variances.double())

    def forward(self, z, level):
        level = level.double()
        low, high = torch.zeros_like(level), torch.ones_like(level)
        with torch.no_grad():
            for _ in range(60):
                mid = (low + high) / 2
                above = self.schedule.gamma(mid).reshape(mid.shape[0], -1).mean(1) > level
                high, low = torch.where(above, mid, high), torch.where(above, low, mid)
        gamma = self.schedule.gamma((low + high) / 2)
        alpha2, sigma2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)
        return (sigma2.sqrt() / (alpha2 * self.variances + sigma2) * z.double()).to(z.dtype)


def _rate_kl(d, x, noise, t):
    at = d.schedule(t)
    m = d.marginal(x, at.gamma)
    z = m.loc + m.scale * noise
    eps_hat = d.predict(z, at.gamma)[0].eps
    rate = broadcast(at.derivative, z)
    return kl_divergence(InfinitesimalStep(z, noise, rate), InfinitesimalStep(z, eps_hat, rate)).sum(1)


def test_continuous_bound_is_the_limit_of_the_grid_bounds_and_has_its_closed_form():
    """Gaussian data with independent dimensions of variances v_d, the Bayes-optimal denoiser:
    L_∞ = Σ_d ½[log(1 + v_d e^{−γ_min,d}) − log(1 + v_d e^{−γ_max,d})]; with common random
    numbers the K-level diffusion term exceeds it by a gap that halves when K − 1 doubles."""
    variances = torch.tensor([0.05**2, 0.25, 1.0], dtype=torch.float64)
    schedule = _randomized((3,), seed=5, bins=4).requires_grad_(False)
    d = Diffusion(OptimalIndependentDenoiser(schedule, variances), schedule, (3,))
    g = torch.Generator().manual_seed(4)
    n = 256
    x = variances.sqrt() * torch.randn(n, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 3, generator=g, dtype=torch.float64)
    m = 2048
    midpoints = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    with torch.no_grad():
        continuous = _rate_kl(d, x.repeat(m, 1), noise.repeat(m, 1), midpoints.repeat_interleave(n)).sum() / (
            m * n
        )
    low, high = schedule.endpoint_levels()
    closed = (
        0.5 * (torch.log1p(variances * torch.exp(-low)) - torch.log1p(variances * torch.exp(-high))).sum()
    )
    # the closed form, from fresh draws (1 in 64 of the times per datum, 8,192 data)
    big = variances.sqrt() * torch.randn(8192, 3, generator=g, dtype=torch.float64)
    times = (torch.arange(64, dtype=torch.float64) + torch.rand(64, generator=g, dtype=torch.float64)) / 64
    with torch.no_grad():
        fresh = _rate_kl(
            d,
            big.repeat(64, 1),
            torch.randn(64 * 8192, 3, generator=g, dtype=torch.float64),
            times.repeat_interleave(8192),
        )
    se = fresh.std().item() / math.sqrt(fresh.numel())
    assert abs(fresh.mean().item() - closed.item()) < 4 * se + 1e-3, (fresh.mean().item(), closed.item(), se)
    gaps = []
    for T in (9, 17, 33, 65, 129):
        grid = d.grid(T)
        k = T - 1
        with torch.no_grad():
            gamma_s = grid[:-1].repeat_interleave(n, 0)
            gamma_t = grid[1:].repeat_interleave(n, 0)
            xs, ns = x.repeat(k, 1), noise.repeat(k, 1)
            mt = d.marginal(xs, gamma_t)
            z_t = mt.loc + mt.scale * ns
            q = d.forward_step(xs, z_t, gamma_s, gamma_t, eps=ns)
            p, _ = d.reverse_step(z_t, gamma_s, gamma_t)
            gaps.append(kl_divergence(q, p).sum().item() / n - continuous.item())
    assert all(gap > 0 for gap in gaps), gaps
    ratios = [a / b for a, b in zip(gaps, gaps[1:])]
    assert 1.8 < ratios[-1] < 2.2, ratios


# ---------------------------------------------------------------------------- training
def test_training_moves_the_per_dimension_endpoints_apart():
    """Data with dimensions of scales 0.05 and 1: a few Adam steps on the continuous-time ELBO
    lower the loss and give the two dimensions different learned endpoints."""
    torch.manual_seed(0)
    pyro.clear_param_store()
    scales = torch.tensor([0.05, 1.0])
    data = torch.randn(2048, 2) * scales
    schedule = MultivariateLearnedGamma((2,), -6.0, 6.0, bins=4)
    start = {k: v.detach().clone() for k, v in schedule.named_parameters()}
    d = Diffusion(MLPDenoiser(2, hidden=32, depth=1), schedule, (2,), decoder="plain")
    optimizer = torch.optim.Adam(d.parameters(), lr=3e-2)
    loss = DiffusionELBO(0, "low-discrepancy")
    module = loss(d.model_module(), d.guide_module())
    with torch.no_grad():
        torch.manual_seed(1)
        before = sum(module(data[:512]).item() for _ in range(4))
    for _ in range(120):
        optimizer.zero_grad()
        value = module(data[torch.randint(0, 2048, (256,))])
        value.backward()
        optimizer.step()
    with torch.no_grad():
        torch.manual_seed(1)
        after = sum(module(data[:512]).item() for _ in range(4))
    assert after < before, (before, after)
    for name, value in schedule.named_parameters():
        assert not torch.equal(value, start[name]), name
    low, high = schedule.endpoint_levels()
    # the small dimension needs a larger SNR at the data end: its γ_min moves down faster
    assert low[0] < low[1] - 0.3, low
    assert (schedule.grid(50)[1:] > schedule.grid(50)[:-1]).all()


def test_train_config_builds_and_trains_the_per_dimension_schedule():
    from pyro_diffusion.training import DataShape, TrainConfig, build_diffusion, make_loss

    config = TrainConfig(
        schedule="learned-multivariate", loss_steps=0, times="low-discrepancy", gamma_min=-2.0, gamma_max=4.0
    )
    d = build_diffusion(config, DataShape((1, 8, 8), 17), device="cpu")
    assert isinstance(d.schedule, MultivariateLearnedGamma) and d.per_dimension
    assert d.schedule.event_shape == (1, 8, 8)
    x = torch.randint(0, 17, (8, 1, 8, 8)).float() / 8 - 1
    pyro.clear_param_store()
    value = make_loss(config).differentiable_loss(d.model, d.guide, x)
    value.backward()
    assert d.schedule.gamma_min.grad.abs().sum() > 0 and d.schedule.log_slopes.grad.abs().sum() > 0
    with poutine.block():
        assert d.sample(2, num_steps=5).shape == (2, 1, 8, 8)
    assert torch.isfinite(d.nll(x[:2], num_steps=20)).all()
    assert math.isfinite(d.nll(x[:2], num_steps=0, num_times=4).mean().item())
