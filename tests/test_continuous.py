"""Schedules that are functions of time: the discrete and continuous-time bounds, the losses
(low-discrepancy times, the variance gradient for a learned shape), the Pyro model/guide pair.

Most tests use Gaussian data x ~ N(0, v I) with the Bayes-optimal denoiser
ε̂(z, γ) = σ z / (α² v + σ²), for which the bound has a closed form:

    E‖ε − ε̂‖² = D v SNR / (v SNR + 1)
    L_∞ = D/2 [log(1 + v e^{−γ_min}) − log(1 + v e^{−γ_max})]
    L_T = Σ_{i=2..T} ½ expm1(γ_i − γ_{i−1}) · D v SNR_i / (v SNR_i + 1)   (T levels).
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import Adam
from torch import nn
from torch.distributions import kl_divergence

from _helpers import (
    OptimalGaussianDenoiser,
    assert_agree,
    independent_reverse,
    independent_step_kl,
    linear_denoiser,
    mean_and_se,
)
from pyro_diffusion import (
    CosineGamma,
    Diffusion,
    DiffusionELBO,
    GaussianDiffusion,
    LearnedGamma,
    LinearGamma,
    MLPDenoiser,
    NoiseSchedule,
    SimplifiedLoss,
    StepDraw,
    bound,
)
from pyro_diffusion.bound import decoder_term, prior_term
from pyro_diffusion.chains import InfinitesimalStep, low_discrepancy_times
from pyro_diffusion.parameterization import broadcast

VARIANCE = 0.25
DIM = 4


def gaussian_diffusion(schedule, num_levels=None, **kwargs) -> Diffusion:
    return Diffusion(OptimalGaussianDenoiser(VARIANCE), schedule, (DIM,), num_levels=num_levels, **kwargs)


def gaussian_data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return math.sqrt(VARIANCE) * torch.randn(n, DIM, generator=g, dtype=torch.float64)


def analytic_continuous(gamma_min: float, gamma_max: float) -> float:
    v = VARIANCE
    return DIM / 2 * (math.log1p(v * math.exp(-gamma_min)) - math.log1p(v * math.exp(-gamma_max)))


def analytic_discrete(schedule, num_steps: int) -> float:
    gamma = schedule.grid(num_steps)
    snr = torch.exp(-gamma[1:])
    error = DIM * VARIANCE * snr / (VARIANCE * snr + 1)
    return (0.5 * torch.expm1(gamma[1:] - gamma[:-1]) * error).sum().item()


def per_datum(loss, d, x):
    """One draw of the loss's per-datum estimate."""
    return loss.per_datum(*loss.traces(d.model, d.guide, (x,), {})).detach()


# ---------------------------------------------------------------------------- the γ form of a DDPM step
def test_ddpm_step_kl_is_the_snr_form():
    """On a DDPM grid with ε-prediction and σ_t² = β̃_t, KL(q ‖ p_θ) written from the βs equals
    ½ expm1(γ_t − γ_{t−1}) ‖ε − ε̂‖² (and the library computes it)."""
    schedule = NoiseSchedule.linear(40)
    d = GaussianDiffusion(linear_denoiser((DIM,), schedule), schedule, (DIM,), variance="small")
    x0 = gaussian_data(64)
    t = torch.randint(2, 41, (64,), generator=torch.Generator().manual_seed(1))
    gamma = schedule.gammas
    z = d.marginal(x0, gamma[t - 1]).rsample()
    eps = d.noise_of(x0, z, gamma[t - 1])
    output = d.denoiser.network(z, t)  # ε̂, by step
    loc, log_var = independent_reverse(schedule.betas, "eps", "small", output, z, t)
    expected = independent_step_kl(schedule.betas, x0, z, t, loc, log_var)
    snr_form = 0.5 * torch.expm1(gamma[t - 1] - gamma[t - 2]) * ((eps - output) ** 2).sum(1)
    torch.testing.assert_close(snr_form, expected, rtol=1e-7, atol=1e-9)
    step, _ = d.reverse_step(z, gamma[t - 2], gamma[t - 1])
    got = kl_divergence(d.forward_step(x0, z, gamma[t - 2], gamma[t - 1]), step).sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------- the bounds
@pytest.mark.parametrize(
    "num_steps, times",
    [(0, "low-discrepancy"), (0, "uniform"), (8, "low-discrepancy"), (8, "uniform")],
)
def test_losses_are_unbiased_for_the_analytic_bounds(num_steps, times):
    """DiffusionELBO in continuous time and on an 8-level grid averages to the closed-form
    L_∞, L_8 (+ prior, + plain decoder) within 4 standard errors."""
    torch.manual_seed(2)
    schedule = CosineGamma(-6.0, 6.0)
    d = gaussian_diffusion(schedule)
    x = gaussian_data(4096, seed=3)
    expected_diffusion = analytic_continuous(-6.0, 6.0) if num_steps == 0 else analytic_discrete(schedule, 8)
    loss = DiffusionELBO(num_steps=num_steps, times=times)
    draws = torch.cat([per_datum(loss, d, x) for _ in range(4)])
    gamma_1, gamma_T = schedule.endpoints()
    other = (decoder_term(d, x, gamma_1) + prior_term(d, x, gamma_T)).mean().item()
    mean, se = mean_and_se(draws)
    # the decoder and prior terms are nearly deterministic here; their mean enters both
    assert abs(mean - other - expected_diffusion) < 4 * se + 0.02 * abs(other) + 1e-3, (
        mean - other,
        expected_diffusion,
        se,
    )


def _step_kl(d, x, noise, gamma_s, gamma_t):
    """The library's KL of the step γ_t → γ_s at z_t = α_t x + σ_t ε for the given ε."""
    m = d.marginal(x, gamma_t)
    z = m.loc + m.scale * noise
    return kl_divergence(d.forward_step(x, z, gamma_s, gamma_t), d.reverse_step(z, gamma_s, gamma_t)[0]).sum(
        1
    )


def _rate_kl(d, x, noise, times):
    """The library's continuous-time rate ½ γ'(t) ‖ε − ε̂‖² at z_t = α_t x + σ_t ε."""
    at = d.schedule(times)
    m = d.marginal(x, at.gamma)
    z = m.loc + m.scale * noise
    eps_hat = d.predict(z, at.gamma)[0].eps
    rate = broadcast(at.derivative, z)
    return kl_divergence(InfinitesimalStep(z, noise, rate), InfinitesimalStep(z, eps_hat, rate)).sum(1)


def test_discrete_bound_converges_to_continuous_as_one_over_T():
    """With common random numbers, L_T − L_∞ > 0 shrinks like 1/T: doubling T halves the gap."""
    schedule = LinearGamma(-6.0, 6.0)
    d = gaussian_diffusion(schedule)
    x = gaussian_data(512, seed=4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    midpoints = (torch.arange(4096, dtype=torch.float64) + 0.5) / 4096
    with torch.no_grad():
        rows = x.repeat(4096, 1)
        continuous = _rate_kl(d, rows, noise.repeat(4096, 1), midpoints.repeat_interleave(512)).mean().item()
    assert abs(continuous - analytic_continuous(-6, 6)) < 0.05 * analytic_continuous(-6, 6)
    gaps = []
    for T in (9, 17, 33, 65, 129):  # T levels: T − 1 = 8 … 128 steps
        grid = d.grid(T)
        n = T - 1
        with torch.no_grad():
            terms = _step_kl(
                d,
                x.repeat(n, 1),
                noise.repeat(n, 1),
                grid[:-1].repeat_interleave(512),
                grid[1:].repeat_interleave(512),
            )
        gaps.append(terms.sum().item() / 512 - continuous)
    assert all(gap > 0 for gap in gaps), gaps
    # O(1/T) with an O(1/T²) correction: gap_T / gap_2T decreases towards 2
    ratios = [a / b for a, b in zip(gaps, gaps[1:])]
    assert all(a > b for a, b in zip(ratios, ratios[1:])), ratios
    assert 1.9 < ratios[-1] < 2.15, ratios
    # the closed form: (T − 1)·(L_T − L_∞) tends to a constant, and the code's gaps follow it
    scaled = {
        T: (T - 1) * (analytic_discrete(schedule, T) - analytic_continuous(-6, 6))
        for T in (9, 129, 1025, 4097)
    }
    assert scaled[1025] == pytest.approx(scaled[4097], rel=0.01)
    assert gaps[0] * 8 == pytest.approx(scaled[9], rel=0.1)
    assert gaps[-1] * 128 == pytest.approx(scaled[129], rel=0.1)


def test_continuous_bound_invariant_to_schedule_shape():
    """Same endpoints, same denoiser as a function of γ: the same bound within 4 SE; a schedule
    with another endpoint is told apart (the test has power)."""
    torch.manual_seed(6)
    net = MLPDenoiser(2, hidden=32, depth=1, gamma_range=(-8.0, 8.0))
    x = (torch.rand(2048, 2) * 2 - 1) * 0.8
    wiggly = LearnedGamma(-5.0, 5.0, hidden=16)
    with torch.no_grad():
        wiggly.raw_out_weight.fill_(1.0)
    estimates = {}
    for label, schedule in (
        ("linear", LinearGamma(-5.0, 5.0)),
        ("cosine", CosineGamma(-5.0, 5.0)),
        ("learned", wiggly),
        ("other endpoint", LinearGamma(-3.0, 5.0)),
    ):
        d = Diffusion(net, schedule, (2,))
        estimates[label] = bound(d, x, num_steps=0, num_times=8, bits=False).dataset_mean()
    for label in ("cosine", "learned"):
        assert_agree(estimates[label], estimates["linear"], what=label)
    mean, se = estimates["other endpoint"]
    ref_mean, ref_se = estimates["linear"]
    assert abs(mean - ref_mean) > 4 * math.hypot(se, ref_se), estimates


# ---------------------------------------------------------------------------- learning
SHAPE = ("raw_slope", "raw_in_weight", "in_bias", "raw_out_weight")


def test_variance_gradient_goes_to_shape_and_bound_gradient_to_endpoints():
    """minimize_variance: the shape's gradient is that of Σ L² (L the per-datum estimate), every
    other parameter's that of Σ L, with L written out here from the guide's draws."""
    torch.manual_seed(7)
    schedule = LearnedGamma(-6.0, 6.0, hidden=8)
    d = Diffusion(MLPDenoiser(2, hidden=16, depth=1, gamma_range=(-8.0, 8.0)), schedule, (2,))
    x = torch.randn(32, 2, dtype=torch.float64) * 0.5
    d.double()
    u = low_discrepancy_times(32, generator=torch.Generator().manual_seed(1))

    def draw():
        return StepDraw("low-discrepancy", times_values=u)

    loss = DiffusionELBO(num_steps=0, times="low-discrepancy", minimize_variance=True)
    loss.make_draw = draw

    def grads(objective):
        d.zero_grad()
        pyro.set_rng_seed(8)
        objective().backward()
        return {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}

    def written_out():
        guide_trace = poutine.trace(d.guide).get_trace(x, steps=draw(), num_steps=0)
        at = schedule(u)
        gamma_1, gamma_T = schedule.endpoints()

        def point(site, gamma):  # the guide's draw, reparameterized through γ
            m = d.marginal(x, gamma)
            eps = ((guide_trace.nodes[site]["value"] - m.loc) / m.scale).detach()
            return m.loc + m.scale * eps, eps

        z, eps = point("x_t", at.gamma)
        eps_hat = d.predict(z, at.gamma)[0].eps
        diffusion = 0.5 * at.derivative * ((eps - eps_hat) ** 2).sum(1)
        z_1, _ = point("x_1", gamma_1)
        a2_1, a2_T = torch.sigmoid(-gamma_1), torch.sigmoid(-gamma_T)
        decoder = 0.5 * (
            ((x - z_1 / a2_1.sqrt()) ** 2) / gamma_1.exp() + gamma_1 + math.log(2 * math.pi)
        ).sum(1)
        s2_T = 1 - a2_T
        prior = 0.5 * (a2_T * x**2 + s2_T - torch.log(s2_T) - 1).sum(1)
        return diffusion + decoder + prior

    got = grads(lambda: loss.differentiable_loss(d.model, d.guide, x))
    plain = DiffusionELBO(num_steps=0, minimize_variance=False)
    plain.make_draw = draw
    pyro.set_rng_seed(8)
    total = plain.loss(d.model, d.guide, x)
    pyro.set_rng_seed(8)
    assert written_out().sum().item() == pytest.approx(total, rel=1e-10)
    bound_grads = grads(lambda: written_out().sum())
    second_moment = grads(lambda: (written_out() ** 2).sum())
    assert set(got) == set(bound_grads)
    for name, grad in got.items():
        reference = second_moment[name] if name.split(".")[-1] in SHAPE else bound_grads[name]
        torch.testing.assert_close(grad, reference, rtol=1e-8, atol=1e-10, msg=name)
    assert got["schedule.raw_in_weight"].abs().sum() > 0 and got["schedule.gamma_min"].abs() > 0


def test_learned_shape_lowers_the_estimators_variance():
    """Training only the shape with the variance gradient (fixed optimal denoiser) lowers the
    variance of the continuous-time estimator well below the linear schedule's, and leaves its
    expectation unchanged (within 4 SE)."""
    torch.manual_seed(9)
    schedule = LearnedGamma(-6.0, 6.0, hidden=16)
    d = gaussian_diffusion(schedule)
    loss = DiffusionELBO(num_steps=0, times="low-discrepancy")
    shape = [p for n, p in schedule.named_parameters() if n in SHAPE]
    optimizer = torch.optim.Adam(shape, lr=0.1)
    x = gaussian_data(128, seed=10)
    for _ in range(150):
        optimizer.zero_grad()
        loss.differentiable_loss(d.model, d.guide, x).backward()
        optimizer.step()
    test = gaussian_data(256, seed=11)
    learned = bound(d, test, num_steps=0, num_times=32, bits=False)
    linear = bound(
        gaussian_diffusion(LinearGamma(-6.0, 6.0), name="linear"), test, num_steps=0, num_times=32, bits=False
    )
    learned_var, linear_var = learned.variance.mean().item(), linear.variance.mean().item()
    assert learned_var < 0.5 * linear_var, (learned_var, linear_var)
    assert_agree(learned.dataset_mean(), linear.dataset_mean())


def test_low_discrepancy_times_are_uniform_and_evenly_spaced():
    g = torch.Generator().manual_seed(12)
    batches = torch.stack([low_discrepancy_times(16, generator=g) for _ in range(4000)])
    assert ((batches >= 0) & (batches < 1)).all()
    spacing = torch.sort(batches, 1).values.diff(1)
    torch.testing.assert_close(spacing, torch.full_like(spacing, 1 / 16))
    first = batches[:, 0]  # marginally U(0, 1): mean ½, variance 1/12
    assert abs(first.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / 4000)
    assert abs(first.var().item() - 1 / 12) < 0.01


def test_pyro_model_guide_give_the_discrete_bound():
    """TraceMeanField_ELBO on the full chains with T levels estimates the same −ELBO as
    DiffusionELBO on that grid; SVI on it trains the schedule's endpoints from Pyro's param store."""
    torch.manual_seed(13)
    schedule = LearnedGamma(-5.0, 5.0, hidden=8)
    d = gaussian_diffusion(schedule, num_levels=17, num_steps=5).double()
    x = torch.round(gaussian_data(256, seed=14).clamp(-1, 1) * 8) / 8
    elbo = TraceMeanField_ELBO()
    with torch.no_grad():
        trace_values = [elbo.loss(d.model, d.guide, x) / x.shape[0] for _ in range(60)]
        direct = torch.cat([per_datum(DiffusionELBO(), d, x) for _ in range(20)])
    assert_agree(mean_and_se(trace_values), mean_and_se(direct))
    before = schedule.gamma_min.item()
    svi = SVI(d.model, d.guide, Adam({"lr": 0.05}), elbo)
    svi.step(x)
    assert "diffusion$$$schedule.gamma_min" in pyro.get_param_store()
    assert schedule.gamma_min.item() != before
    samples = d.sample(5)
    assert samples.shape == (5, DIM) and ((samples * 8).round() == samples * 8).all()


def test_network_decoder_is_a_normalized_learned_decoder():
    """decoder="network": the K-level decoder's masses sum to 1 per pixel, its scale parameter
    is in the param store and gets a gradient from the bound."""
    torch.manual_seed(16)
    net = MLPDenoiser(2, hidden=16, depth=1)
    d = Diffusion(net, LinearGamma(-4.0, 4.0), (2,), num_levels=5, decoder="network")
    z1 = torch.randn(3, 2)
    decoder = d.decoder_distribution(z1, torch.full((3,), -4.0, dtype=torch.float64))
    levels = torch.linspace(-1, 1, 5)
    total = sum(decoder.log_prob(torch.full((3, 2), level.item())).exp() for level in levels)
    torch.testing.assert_close(total, torch.ones(3, 2), rtol=1e-5, atol=1e-5)
    x = torch.randint(0, 5, (16, 2)).float() / 2 - 1
    DiffusionELBO(num_steps=0).loss_and_grads(d.model, d.guide, x)
    assert d.decoder_log_scale.grad is not None and d.decoder_log_scale.grad.abs() > 0
    assert "diffusion$$$decoder_log_scale" in pyro.get_param_store()
    assert d.sample(4, num_steps=3).shape == (4, 2)


@pytest.mark.parametrize("num_steps", [0, 16])
def test_simplified_loss_trains_only_the_denoiser(num_steps):
    torch.manual_seed(15)
    schedule = LearnedGamma(-5.0, 5.0, hidden=8)
    net = MLPDenoiser(2, hidden=16, depth=1)
    d = Diffusion(net, schedule, (2,), num_steps=16)
    loss = SimplifiedLoss(num_steps=num_steps).differentiable_loss(d.model, d.guide, torch.randn(8, 2))
    loss.backward()
    assert net.input.weight.grad is not None and net.input.weight.grad.abs().sum() > 0
    for name, param in schedule.named_parameters():
        assert param.grad is None or param.grad.abs().sum() == 0, name


def test_network_sees_levels_from_the_schedules_own_gamma_min():
    """``anchor=a``: the network's input is γ − γ(0) + a, so with a fixed schedule whose γ(0) = a
    nothing changes, and with a learned schedule the input at t = 0 is exactly a wherever γ_min
    has moved, while the endpoints still get the bound's gradient."""
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLPDenoiser(2, hidden=16, depth=1, gamma_range=(-8.0, 8.0))

        def forward(self, z, level):
            seen.append(level.detach().clone())
            return self.net(z, level)

    x = (torch.rand(64, 2) * 2 - 1) * 0.8
    denoiser = Recorder()
    plain = Diffusion(denoiser, LinearGamma(-4.0, 2.0), (2,))
    anchored = Diffusion(denoiser, LinearGamma(-4.0, 2.0), (2,), anchor=-4.0, name="anchored")
    u = torch.rand(64, dtype=torch.float64)
    values = []
    for d in (plain, anchored):
        loss = DiffusionELBO(num_steps=0)
        loss.make_draw = lambda: StepDraw(times_values=u)
        pyro.set_rng_seed(0)
        values.append(loss.loss(d.model, d.guide, x))
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    learned = LearnedGamma(-4.0, 2.0, hidden=8)
    with torch.no_grad():
        learned.gamma_min.fill_(-3.5)
    d = Diffusion(denoiser, learned, (2,), anchor=-4.0, decoder="network", name="learned")
    seen.clear()
    d.decoder_distribution(x, learned.endpoints()[0])
    assert torch.allclose(seen[-1], torch.full((64,), -4.0))
    DiffusionELBO(num_steps=0).loss_and_grads(d.model, d.guide, x)
    assert learned.gamma_min.grad is not None and learned.gamma_max.grad is not None


# ---------------------------------------------------------------------------- validation
def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="gamma_min"):
        LinearGamma(3.0, 1.0)
    with pytest.raises(ValueError, match="gammas"):
        NoiseSchedule.from_gammas(torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match="num_steps"):
        DiffusionELBO(num_steps=-1)
    with pytest.raises(ValueError, match="times"):
        DiffusionELBO(num_steps=0, times="importance")
    with pytest.raises(ValueError, match="minimize_variance"):
        DiffusionELBO(num_steps=8, minimize_variance=True)
    with pytest.raises(TypeError, match="t:"):
        LinearGamma()(torch.tensor([1, 2]))
    d = gaussian_diffusion(LinearGamma())
    with pytest.raises(ValueError, match="x0"):
        DiffusionELBO(num_steps=0).loss(d.model, d.guide, torch.zeros(3, DIM + 1))
    with pytest.raises(TypeError, match="schedule"):
        Diffusion(OptimalGaussianDenoiser(VARIANCE), [0.1, 0.2], (DIM,))
    with pytest.raises(ValueError, match="decoder"):
        Diffusion(OptimalGaussianDenoiser(VARIANCE), LinearGamma(), (DIM,), decoder="denoiser")
    with pytest.raises(ValueError, match="num_levels"):
        Diffusion(OptimalGaussianDenoiser(VARIANCE), LinearGamma(), (DIM,), num_levels=1)
    with pytest.raises(ValueError, match="anchor"):
        Diffusion(OptimalGaussianDenoiser(VARIANCE), LinearGamma(), (DIM,), anchor=float("nan"))
    with pytest.raises(ValueError, match="mean"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Diffusion(OptimalGaussianDenoiser(VARIANCE), LinearGamma(), (DIM,), mean="mu").nll(
                torch.zeros(3, DIM), num_steps=0
            )
    bad = Diffusion(nn.Linear(DIM, DIM + 1), LinearGamma(), (DIM,))
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        bad.nll(torch.zeros(3, DIM), num_steps=4)
