"""Tests for pyro_diffusion.vdm: γ-schedules, the discrete and continuous-time bounds, the
losses (low-discrepancy times, variance gradient), the Pyro model/guide pair.

Most tests use Gaussian data x ~ N(0, v I) with the Bayes-optimal denoiser
ε̂(z, γ) = σ z / (α² v + σ²), for which the bound has a closed form:

    E‖ε − ε̂‖² = D v SNR / (v SNR + 1)
    L_∞ = D/2 [log(1 + v e^{−γ_min}) − log(1 + v e^{−γ_max})]
    L_T = Σ_i ½ expm1(γ_i − γ_{i−1}) · D v SNR_i / (v SNR_i + 1).
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import Adam
from torch import nn

from pyro_diffusion import GaussianDiffusion, NoiseSchedule
from pyro_diffusion.bound import prior_term as core_prior_term
from pyro_diffusion.bound import q_sample, step_terms
from pyro_diffusion.nets import MLPDenoiser
from pyro_diffusion.vdm import (
    ContinuousDiffusion,
    ContinuousSimplifiedLoss,
    ContinuousTimeELBO,
    CosineGamma,
    DiscreteTimeELBO,
    LearnedGamma,
    LinearGamma,
    NoiseLevelDenoiser,
    TabulatedGamma,
    alpha_sigma,
    low_discrepancy_times,
    snr_step_kl,
)

VARIANCE = 0.25
DIM = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests are many small tensor operations: one thread is faster on a shared box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class OptimalLinearDenoiser(nn.Module):
    """E[ε | z] for x ~ N(0, v I): σ z / (α² v + σ²), a function of γ alone."""

    def __init__(self, variance: float = VARIANCE) -> None:
        super().__init__()
        self.variance = variance
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, z, gamma):
        alpha, sigma = alpha_sigma(gamma.to(torch.float64))
        weight = sigma / (alpha**2 * self.variance + sigma**2)
        return (weight.to(z.dtype)[:, None] * z) + 0 * self.dummy


def gaussian_vdm(schedule, decoder_levels=None) -> ContinuousDiffusion:
    return ContinuousDiffusion(OptimalLinearDenoiser(), schedule, (DIM,), num_levels=decoder_levels)


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


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.to(torch.float64)
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


# ---------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("make", [lambda: NoiseSchedule.linear(200), lambda: NoiseSchedule.cosine(200)])
def test_tabulated_schedule_reproduces_noise_schedule(make):
    schedule = make()
    T = schedule.num_steps
    tabulated = TabulatedGamma.from_noise_schedule(schedule)
    grid = tabulated.grid(T - 1)  # step t at time (t-1)/(T-1)
    torch.testing.assert_close(grid, -schedule.log_snr, rtol=1e-12, atol=1e-12)
    alpha_sq = torch.sigmoid(-grid)
    torch.testing.assert_close(alpha_sq, schedule.alphas_cumprod, rtol=1e-10, atol=1e-14)
    # β_t = 1 − ᾱ_t/ᾱ_{t−1} and β̃_t = c σ_{t−1}² with c = −expm1(γ_{t−1} − γ_t), t ≥ 2
    torch.testing.assert_close(1 - alpha_sq[1:] / alpha_sq[:-1], schedule.betas[1:], rtol=1e-8, atol=1e-14)
    c = -torch.expm1(grid[:-1] - grid[1:])
    torch.testing.assert_close(
        c * torch.sigmoid(grid[:-1]), schedule.posterior_variance[1:], rtol=1e-8, atol=1e-14
    )
    # between grid points γ is linear, γ' the slope
    at = tabulated(torch.tensor([0.5 / (T - 1)], dtype=torch.float64))
    torch.testing.assert_close(at.gamma[0], grid[:2].mean())
    torch.testing.assert_close(at.derivative[0], (grid[1] - grid[0]) * (T - 1))


def test_schedule_derivatives_match_finite_differences():
    torch.manual_seed(0)
    learned = LearnedGamma(-7.0, 4.0, hidden=32)
    with torch.no_grad():  # a shape far from linear
        learned.raw_out_weight.fill_(0.5)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    for schedule in (LinearGamma(-7, 4), CosineGamma(-7, 4), learned):
        numeric = (schedule.gamma(t + h) - schedule.gamma(t - h)) / (2 * h)
        torch.testing.assert_close(schedule(t).derivative, numeric, rtol=1e-6, atol=1e-6)
        gamma0, gamma1 = schedule.endpoints()
        assert abs(gamma0.item() + 7) < 1e-9 and abs(gamma1.item() - 4) < 1e-9
        assert (schedule(t).derivative > 0).all()


def test_step_terms_match_core_through_snr():
    """The core's KL terms (ε-prediction, σ_t² = β̃_t) for steps 2..T and its prior term equal
    the SNR-written terms on the tabulated schedule with T − 1 steps, for the same network."""
    torch.manual_seed(1)
    schedule = NoiseSchedule.linear(40)
    T = schedule.num_steps
    net = MLPDenoiser(DIM, hidden=32, depth=1)
    core = GaussianDiffusion(net, schedule, (DIM,), mean="eps", variance="small")
    x0 = gaussian_data(64).float()
    t = torch.randint(2, T + 1, (64,))
    x_t, noise = q_sample(schedule, x0, t)
    expected = step_terms(core, x0, t, x_t)
    gamma = -schedule.log_snr
    eps_hat = core.predict_eps(x_t, t)
    got = snr_step_kl(gamma[t - 2], gamma[t - 1], noise, eps_hat)
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=1e-4)

    grid = gamma.float()

    class StepLookup(nn.Module):  # the same network, asked by γ instead of by step
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, z, g):
            step = (g[:, None] - grid[None]).abs().argmin(1) + 1
            return self.net(z, step)

    vdm = ContinuousDiffusion(StepLookup(), TabulatedGamma.from_noise_schedule(schedule), (DIM,))
    times = (t - 1).double() / (T - 1)
    terms, _ = vdm.diffusion_term(x0, times, num_steps=T - 1, noise=noise)
    torch.testing.assert_close(terms / (T - 1), expected, rtol=2e-4, atol=1e-4)
    torch.testing.assert_close(vdm.prior_term(x0), core_prior_term(schedule, x0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- the bounds
def test_losses_are_unbiased_for_the_analytic_bounds():
    """ContinuousTimeELBO and DiscreteTimeELBO average to the closed-form L_∞, L_T (+ prior,
    + Gaussian decoder) within 4 standard errors."""
    torch.manual_seed(2)
    pyro.clear_param_store()
    schedule = CosineGamma(-6.0, 6.0)
    vdm = gaussian_vdm(schedule)
    x = gaussian_data(4096, seed=3)
    for loss, expected_diffusion in (
        (ContinuousTimeELBO(), analytic_continuous(-6.0, 6.0)),
        (DiscreteTimeELBO(8), analytic_discrete(schedule, 8)),
        (DiscreteTimeELBO(8, low_discrepancy=False), analytic_discrete(schedule, 8)),
    ):
        draws = []
        for _ in range(4):
            draws.append(loss.per_datum(vdm, x).detach())
        draws = torch.cat(draws)
        terms = vdm.loss_terms(x, torch.rand(x.shape[0], dtype=torch.float64))
        other = (terms.decoder + terms.prior).mean().item()
        mean, se = mean_and_se(draws)
        # the decoder and prior terms are nearly deterministic here; their mean enters both
        assert abs(mean - other - expected_diffusion) < 4 * se + 0.02 * abs(other) + 1e-3, (
            type(loss).__name__,
            mean - other,
            expected_diffusion,
            se,
        )


def test_discrete_bound_converges_to_continuous_as_one_over_T():
    """With common random numbers, L_T − L_∞ > 0 shrinks like 1/T: doubling T halves the gap."""
    schedule = LinearGamma(-6.0, 6.0)
    vdm = gaussian_vdm(schedule)
    x = gaussian_data(512, seed=4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def diffusion_at(times, num_steps):
        rows = x.repeat(times.shape[0], 1)
        t = times.repeat_interleave(x.shape[0])
        terms, _ = vdm.diffusion_term(rows, t, num_steps, noise=noise.repeat(times.shape[0], 1))
        return terms.mean().item()

    midpoints = (torch.arange(4096, dtype=torch.float64) + 0.5) / 4096
    continuous = diffusion_at(midpoints, None)  # ½∫γ'(t) f(t) dt, midpoint rule
    assert abs(continuous - analytic_continuous(-6, 6)) < 0.05 * analytic_continuous(-6, 6)
    gaps = []
    for T in (8, 16, 32, 64, 128):
        grid_times = torch.arange(1, T + 1, dtype=torch.float64) / T
        gaps.append(diffusion_at(grid_times, T) - continuous)
    assert all(gap > 0 for gap in gaps), gaps
    # O(1/T) with an O(1/T²) correction: gap_T / gap_2T decreases towards 2
    ratios = [a / b for a, b in zip(gaps, gaps[1:])]
    assert all(a > b for a, b in zip(ratios, ratios[1:])), ratios
    assert 1.9 < ratios[-1] < 2.15, ratios
    # the closed form: T·(L_T − L_∞) tends to a constant, and the code's gaps follow it
    scaled = {
        T: T * (analytic_discrete(schedule, T) - analytic_continuous(-6, 6)) for T in (8, 128, 1024, 4096)
    }
    assert scaled[1024] == pytest.approx(scaled[4096], rel=0.01)
    assert gaps[0] * 8 == pytest.approx(scaled[8], rel=0.1)
    assert gaps[-1] * 128 == pytest.approx(scaled[128], rel=0.1)


def test_continuous_bound_invariant_to_schedule_shape():
    """Same endpoints, same denoiser as a function of SNR: the same bound within 4 SE; a schedule
    with another endpoint is told apart (the test has power)."""
    torch.manual_seed(6)
    net = NoiseLevelDenoiser(MLPDenoiser(2, hidden=32, depth=1), gamma_range=(-8.0, 8.0))
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
        vdm = ContinuousDiffusion(net, schedule, (2,))
        estimates[label] = vdm.nll(x, num_times=8, bits=False).dataset_mean()
    ref_mean, ref_se = estimates["linear"]
    for label in ("cosine", "learned"):
        mean, se = estimates[label]
        assert abs(mean - ref_mean) < 4 * math.hypot(se, ref_se), (label, estimates)
    mean, se = estimates["other endpoint"]
    assert abs(mean - ref_mean) > 4 * math.hypot(se, ref_se), estimates


# ---------------------------------------------------------------------------- learning
def test_variance_gradient_goes_to_shape_and_bound_gradient_to_endpoints():
    torch.manual_seed(7)
    schedule = LearnedGamma(-6.0, 6.0, hidden=8)
    net = NoiseLevelDenoiser(MLPDenoiser(2, hidden=16, depth=1), gamma_range=(-8.0, 8.0))
    vdm = ContinuousDiffusion(net, schedule, (2,))
    x = torch.randn(32, 2) * 0.5
    shape_names = ("raw_slope", "raw_in_weight", "in_bias", "raw_out_weight")

    def grads(objective):
        vdm.zero_grad()
        torch.manual_seed(8)
        objective().backward()
        return {n: p.grad.clone() for n, p in vdm.named_parameters() if p.grad is not None}

    def loss():
        return ContinuousTimeELBO(minimize_variance=True).differentiable_loss(vdm.model, vdm.guide, x)

    def terms():
        return vdm.loss_terms(x, low_discrepancy_times(32)).total

    got = grads(loss)
    bound = grads(lambda: terms().sum())
    second_moment = grads(lambda: (terms() ** 2).sum())
    for name, grad in got.items():
        short = name.split(".")[-1]
        reference = second_moment[name] if short in shape_names else bound[name]
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6, msg=name)
    assert got["schedule.raw_in_weight"].abs().sum() > 0


def test_learned_shape_lowers_the_estimators_variance():
    """Training only the shape with the variance gradient (fixed optimal denoiser) lowers the
    variance of the continuous-time estimator well below the linear schedule's, and leaves its
    expectation unchanged (within 4 SE)."""
    torch.manual_seed(9)
    pyro.clear_param_store()
    schedule = LearnedGamma(-6.0, 6.0, hidden=16)
    vdm = gaussian_vdm(schedule)
    loss = ContinuousTimeELBO()
    shape = [p for n, p in schedule.named_parameters() if n not in ("gamma_min", "gamma_max")]
    optimizer = torch.optim.Adam(shape, lr=0.1)
    x = gaussian_data(128, seed=10)
    for _ in range(150):
        optimizer.zero_grad()
        loss.differentiable_loss(vdm.model, vdm.guide, x).backward()
        optimizer.step()
    test = gaussian_data(256, seed=11)
    learned = vdm.nll(test, num_times=32, bits=False)
    linear = gaussian_vdm(LinearGamma(-6.0, 6.0)).nll(test, num_times=32, bits=False)
    learned_var, linear_var = learned.variance.mean().item(), linear.variance.mean().item()
    assert learned_var < 0.5 * linear_var, (learned_var, linear_var)
    (m1, s1), (m2, s2) = learned.dataset_mean(), linear.dataset_mean()
    assert abs(m1 - m2) < 4 * math.hypot(s1, s2)


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
    """TraceMeanField_ELBO on vdm.model/vdm.guide with T steps estimates the same −ELBO as
    DiscreteTimeELBO(T); SVI on it trains the schedule's endpoints from Pyro's param store."""
    torch.manual_seed(13)
    pyro.clear_param_store()
    schedule = LearnedGamma(-5.0, 5.0, hidden=8)
    vdm = ContinuousDiffusion(OptimalLinearDenoiser(), schedule, (DIM,), num_steps=4, num_levels=17)
    x = torch.round(gaussian_data(256, seed=14).clamp(-1, 1) * 8).float() / 8
    vdm.double()
    x = x.double()
    elbo = TraceMeanField_ELBO()
    trace_values = torch.tensor([elbo.loss(vdm.model, vdm.guide, x) / x.shape[0] for _ in range(60)])
    loss = DiscreteTimeELBO(4)
    direct = torch.cat([loss.per_datum(vdm, x).detach() for _ in range(20)])
    (m1, s1), (m2, s2) = mean_and_se(trace_values), mean_and_se(direct)
    assert abs(m1 - m2) < 4 * math.hypot(s1, s2), (m1, s1, m2, s2)
    before = schedule.gamma_min.item()
    svi = SVI(vdm.model, vdm.guide, Adam({"lr": 0.05}), elbo)
    svi.step(x)
    assert "vdm$$$schedule.gamma_min" in pyro.get_param_store()
    assert schedule.gamma_min.item() != before
    samples = vdm.sample(5)
    assert samples.shape == (5, DIM) and ((samples * 8).round() == samples * 8).all()


def test_denoiser_decoder_is_a_normalized_learned_decoder():
    """decoder="denoiser": the K-level decoder's masses sum to 1 per pixel, its scale parameter
    is in the param store and gets a gradient from the bound."""
    torch.manual_seed(16)
    pyro.clear_param_store()
    net = NoiseLevelDenoiser(MLPDenoiser(2, hidden=16, depth=1))
    vdm = ContinuousDiffusion(net, LinearGamma(-4.0, 4.0), (2,), num_levels=5, decoder="denoiser")
    z0 = torch.randn(3, 2)
    decoder = vdm.decoder_distribution(z0, torch.full((3,), -4.0, dtype=torch.float64))
    levels = torch.linspace(-1, 1, 5)
    total = sum(decoder.log_prob(torch.full((3, 2), level.item())).exp() for level in levels)
    torch.testing.assert_close(total, torch.ones(3, 2), rtol=1e-5, atol=1e-5)
    x = torch.randint(0, 5, (16, 2)).float() / 2 - 1
    ContinuousTimeELBO().loss_and_grads(vdm.model, vdm.guide, x)
    assert vdm.decoder_log_scale.grad is not None and vdm.decoder_log_scale.grad.abs() > 0
    assert "vdm$$$decoder_log_scale" in pyro.get_param_store()
    assert vdm.sample(4, 3).shape == (4, 2)


def test_simplified_loss_trains_only_the_denoiser():
    torch.manual_seed(15)
    schedule = LearnedGamma(-5.0, 5.0, hidden=8)
    net = NoiseLevelDenoiser(MLPDenoiser(2, hidden=16, depth=1))
    vdm = ContinuousDiffusion(net, schedule, (2,))
    loss = ContinuousSimplifiedLoss().differentiable_loss(vdm.model, vdm.guide, torch.randn(8, 2))
    loss.backward()
    assert schedule.gamma_min.grad is None and net.network.input.weight.grad is not None


# ---------------------------------------------------------------------------- validation
def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="gamma_min"):
        LinearGamma(3.0, 1.0)
    with pytest.raises(ValueError, match="values"):
        TabulatedGamma(torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match="num_steps"):
        DiscreteTimeELBO(0)
    with pytest.raises(TypeError, match="t:"):
        LinearGamma()(torch.tensor([1, 2]))
    vdm = gaussian_vdm(LinearGamma())
    with pytest.raises(ValueError, match="x0"):
        vdm.loss_terms(torch.zeros(3, DIM + 1), torch.rand(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="t:"):
        vdm.loss_terms(torch.zeros(3, DIM), torch.rand(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="schedule"):
        ContinuousDiffusion(OptimalLinearDenoiser(), NoiseSchedule.linear(10), (DIM,))
    with pytest.raises(ValueError, match="decoder"):
        ContinuousDiffusion(OptimalLinearDenoiser(), LinearGamma(), (DIM,), decoder="network")
    with pytest.raises(ValueError, match="num_levels"):
        ContinuousDiffusion(OptimalLinearDenoiser(), LinearGamma(), (DIM,), num_levels=1)
    other = gaussian_vdm(LinearGamma())
    with pytest.raises(ValueError, match="model, guide"):
        ContinuousTimeELBO().loss(vdm.model, other.guide, torch.zeros(3, DIM))
    bad = ContinuousDiffusion(nn.Linear(DIM, DIM + 1), LinearGamma(), (DIM,))
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        bad.loss_terms(torch.zeros(3, DIM), torch.rand(3, dtype=torch.float64))


def test_vdm_comparison_writes_results_and_reuses_runs(tmp_path):
    from pyro_diffusion.vdm.experiment import run_vdm_comparison

    settings = dict(steps=3, hidden=16, depth=1, eval_times=2, eval_steps=(4,), baselines=False)
    table = run_vdm_comparison(["learned", "tuned"], [0], tmp_path, **settings)
    assert "| learned | 1 |" in table and "| tuned | 1 |" in table
    assert (tmp_path / "results.md").exists() and (tmp_path / "learned_schedule_curves.png").exists()
    stamp = (tmp_path / "tuned_seed0.json").stat().st_mtime_ns
    run_vdm_comparison(["tuned"], [0], tmp_path, **settings)
    assert (tmp_path / "tuned_seed0.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="configs"):
        run_vdm_comparison(["fancy"], [0], tmp_path, **settings)


def test_experiment_passes_the_decoder_through():
    from pyro_diffusion.vdm.experiment import train_and_evaluate

    result = train_and_evaluate(
        "tuned",
        steps=2,
        hidden=8,
        depth=1,
        eval_times=2,
        eval_steps=(),
        decoder="denoiser",
        tuned=(-3.0, 4.0),
    )
    plain = train_and_evaluate(
        "tuned", steps=2, hidden=8, depth=1, eval_times=2, eval_steps=(), tuned=(-3.0, 4.0)
    )
    assert result["decoder"] == "denoiser" and result["decoder_bpd"] != plain["decoder_bpd"]


def test_experiment_validation_ema_weight_decay_and_paired_comparison():
    from pyro_diffusion.data import load_dataset
    from pyro_diffusion.vdm.experiment import paired_comparison, split_validation, train_and_evaluate

    dataset = load_dataset("digits")
    kept, held = split_validation(dataset.train, 50)
    assert kept.shape[0] + held.shape[0] == dataset.train.shape[0] and held.shape[0] == 50
    assert torch.equal(split_validation(dataset.train, 50)[1], held)  # the same split every call
    with pytest.raises(ValueError, match="val_size"):
        split_validation(dataset.train, dataset.train.shape[0])
    with pytest.raises(ValueError, match="eval_every"):
        train_and_evaluate("tuned", steps=1, hidden=8, depth=1, eval_times=2, eval_steps=(), eval_every=1)
    settings = dict(steps=4, hidden=8, depth=1, eval_times=3, eval_steps=(), decoder="denoiser")
    result = train_and_evaluate(
        "learned", val_size=40, eval_every=2, val_times=2, ema=0.9, weight_decay=1e-3, **settings
    )
    assert [row[0] for row in result["val_history"]] == [2, 4]
    assert result["val_bpd"] == min(row[1] for row in result["val_history"])
    assert result["best_step"] in (2, 4) and result["ema"] == 0.9 and result["weight_decay"] == 1e-3
    per_image = torch.tensor(result["test_per_image_bpd"], dtype=torch.float64)
    assert per_image.shape == (dataset.test.shape[0],)
    assert math.isclose(per_image.mean().item(), result["test_bpd_continuous"], rel_tol=1e-9)
    plain = train_and_evaluate("tuned", **settings)
    assert "val_bpd" not in plain and "ema" not in plain  # off by default
    paired = paired_comparison([result, {**result, "seed": 1}], dataset, num_components=5)
    from pyro_diffusion.baselines import CategoricalMixture

    fitted = CategoricalMixture(dataset.num_levels, 5, seed=0).fit(dataset.train)  # fitted once, reused
    again = paired_comparison([result, {**result, "seed": 1}], dataset, mixture=fitted)
    assert again["difference"] == pytest.approx(paired["difference"], abs=1e-12)
    assert paired["seeds"] == [0, 1] and paired["num_images"] == dataset.test.shape[0]
    assert math.isclose(paired["diffusion_bpd"], result["test_bpd_continuous"], rel_tol=1e-9)
    assert math.isclose(paired["difference"], paired["mixture_bpd"] - paired["diffusion_bpd"], abs_tol=1e-9)
    assert paired["difference_se"] > 0 and 0 < paired["mc_se"] < result["test_bpd_continuous_se"]
    from pyro_diffusion.vdm.experiment import paired_difference

    difference, se = paired_difference([1.0, 2.0, 4.0], [0.0, 1.0, 2.0])
    assert difference == pytest.approx(4 / 3) and se == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))


def test_experiment_optimizer_settings_reach_the_right_parameters():
    from pyro_diffusion.vdm.experiment import optim_args, train_and_evaluate

    settings = optim_args(2e-3, 1e-2, 1e-4)
    assert settings("vdm.schedule.gamma_min") == {"lr": 1e-2, "clip_norm": 10.0, "weight_decay": 0.0}
    assert settings("vdm.denoiser.network.input.weight")["weight_decay"] == 1e-4
    assert settings("vdm.decoder_log_scale") == {"lr": 2e-3, "clip_norm": 10.0, "weight_decay": 0.0}
    assert optim_args(2e-3)("vdm.schedule.gamma_min")["lr"] == 2e-3  # default: one learning rate
    run = dict(steps=3, hidden=8, depth=1, eval_times=2, eval_steps=(), tuned=(-3.0, 4.0))
    frozen = train_and_evaluate("learned", schedule_lr=0.0, **run)  # Pyro applies the setting
    moved = train_and_evaluate("learned", **run)
    assert (frozen["gamma_min"], frozen["gamma_max"]) == pytest.approx((-3.0, 4.0), abs=1e-6)
    assert abs(moved["gamma_min"] + 3.0) > 1e-4


def test_anchored_denoiser_sees_gamma_from_the_schedules_own_gamma_min():
    """``anchor=a``: the denoiser's input is γ − γ(0) + a, so (i) with a fixed schedule whose
    γ(0) = a nothing changes, (ii) with a learned schedule the input at t = 0 is exactly a
    wherever γ_min has moved, and the bound stays invariant to the shape (the input is a
    function of γ given the endpoints)."""
    torch.manual_seed(11)
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = NoiseLevelDenoiser(MLPDenoiser(2, hidden=16, depth=1), gamma_range=(-8.0, 8.0))

        def forward(self, z, level):
            seen.append(level.detach().clone())
            return self.net(z, level)

    x = (torch.rand(64, 2) * 2 - 1) * 0.8
    denoiser = Recorder()
    plain = ContinuousDiffusion(denoiser, LinearGamma(-4.0, 2.0), (2,))
    anchored = ContinuousDiffusion(denoiser, LinearGamma(-4.0, 2.0), (2,), anchor=-4.0)
    t = torch.rand(64, dtype=torch.float64)
    torch.manual_seed(0)
    a = plain.loss_terms(x, t).total
    torch.manual_seed(0)
    b = anchored.loss_terms(x, t).total
    assert torch.allclose(a, b)
    learned = LearnedGamma(-4.0, 2.0, hidden=8)
    with torch.no_grad():
        learned.gamma_min.fill_(-3.5)
    vdm = ContinuousDiffusion(denoiser, learned, (2,), anchor=-4.0, decoder="denoiser")
    seen.clear()
    vdm.decoder_term(x)
    assert torch.allclose(seen[-1], torch.full((64,), -4.0))
    terms = vdm.loss_terms(x, t)
    terms.total.sum().backward()
    assert learned.gamma_min.grad is not None and learned.gamma_max.grad is not None
    with pytest.raises(ValueError, match="anchor"):
        ContinuousDiffusion(denoiser, learned, (2,), anchor=float("nan"))
    from pyro_diffusion.vdm.experiment import CONFIGS, train_and_evaluate

    assert "learned-anchored" in CONFIGS
    result = train_and_evaluate(
        "learned-anchored", steps=3, hidden=8, depth=1, eval_times=2, eval_steps=(), tuned=(-3.0, 4.0)
    )
    assert result["config"] == "learned-anchored" and math.isfinite(result["test_bpd_continuous"])


def test_learned_shape_config_freezes_the_endpoints_and_trains_the_shape():
    from pyro_diffusion.vdm.experiment import CONFIGS, optim_args, train_and_evaluate

    assert "learned-shape" in CONFIGS
    frozen = optim_args(2e-3, None, 1.0, freeze_endpoints=True)
    assert frozen("vdm.schedule.gamma_min")["lr"] == 0.0 and frozen("vdm.schedule.gamma_max")["lr"] == 0.0
    assert frozen("vdm.schedule.raw_out_weight")["lr"] == 2e-3
    assert frozen("vdm.denoiser.network.input.weight") == {"lr": 2e-3, "clip_norm": 10.0, "weight_decay": 1.0}
    run = dict(steps=5, hidden=8, depth=1, eval_times=2, eval_steps=(), tuned=(-3.0, 4.0))
    result = train_and_evaluate("learned-shape", **run)
    assert (result["gamma_min"], result["gamma_max"]) == pytest.approx((-3.0, 4.0), abs=1e-9)
    still = train_and_evaluate("learned-shape", schedule_lr=0.0, **run)  # the shape does not move
    moved = torch.tensor(result["gamma_curve"]) - torch.tensor(still["gamma_curve"])
    assert moved.abs().max() > 1e-4


def test_learned_heldout_trains_only_the_endpoints_on_the_held_out_images():
    from pyro_diffusion.vdm.experiment import CONFIGS, _heldout_endpoint_step, train_and_evaluate

    assert "learned-heldout" in CONFIGS
    with pytest.raises(ValueError, match="val_size"):
        train_and_evaluate("learned-heldout", steps=2, hidden=8, depth=1, eval_times=2, eval_steps=())
    # one held-out step: the endpoints take one Adam step down the gradient of the bound on a
    # batch of the held-out images (the first Adam step is lr · sign(gradient)); nothing else moves
    pyro.clear_param_store()
    denoiser = NoiseLevelDenoiser(MLPDenoiser(2, hidden=16, depth=1), gamma_range=(-8.0, 8.0))
    vdm = ContinuousDiffusion(denoiser, LearnedGamma(-4.0, 2.0, hidden=8), (2,), anchor=-4.0)
    loss = ContinuousTimeELBO()
    val = (torch.rand(32, 2) * 2 - 1) * 0.8
    before = {n: p.detach().clone() for n, p in vdm.named_parameters()}
    rows = torch.randint(0, 32, (16,), generator=torch.Generator().manual_seed(10_000 + 7))
    with torch.random.fork_rng():
        torch.manual_seed(3)
        held = loss.differentiable_loss(vdm.model, vdm.guide, val[rows]) / 16
        expected = torch.autograd.grad(held, [vdm.schedule.gamma_min, vdm.schedule.gamma_max])
    step = _heldout_endpoint_step(vdm, loss, val, 16, 0.01, seed=7)
    torch.manual_seed(3)
    step()
    for name, param in vdm.named_parameters():
        moved = (param.detach() - before[name]).abs().max().item()
        if name.endswith(("gamma_min", "gamma_max")):
            grad = expected[0] if name.endswith("gamma_min") else expected[1]
            assert param.detach() - before[name] == pytest.approx(-0.01 * grad.sign().item(), rel=1e-3)
            assert param.grad is None  # left clean for SVI's next step
        else:
            assert moved == 0.0, name
    result = train_and_evaluate(
        "learned-heldout",
        steps=3,
        hidden=8,
        depth=1,
        eval_times=2,
        eval_steps=(),
        val_size=100,
        tuned=(-3.0, 4.0),
    )
    assert result["config"] == "learned-heldout" and (result["gamma_min"], result["gamma_max"]) != (-3.0, 4.0)
    still = train_and_evaluate(  # schedule_lr = 0: the held-out steps do not move the endpoints
        "learned-heldout", steps=3, hidden=8, depth=1, eval_times=2, eval_steps=(), val_size=100,
        tuned=(-3.0, 4.0), schedule_lr=0.0,
    )  # fmt: skip
    assert (still["gamma_min"], still["gamma_max"]) == pytest.approx((-3.0, 4.0), abs=1e-9)


def test_experiment_trains_and_selects_on_a_discrete_bound(monkeypatch):
    """``train_num_steps = T``: the loss is the T-step bound, checkpoints are selected on the
    T-step validation bound, and the per-image test bounds are kept for every evaluated T."""
    from pyro_diffusion.vdm import experiment as ex

    loss = ex.make_loss("learned-shape", 16)
    assert isinstance(loss, DiscreteTimeELBO) and loss.num_steps == 16 and not loss.minimize_variance
    assert isinstance(ex.make_loss("learned-shape"), ContinuousTimeELBO)
    for config, value in (("simple", 16), ("learned-T16", 16), ("tuned", 0), ("tuned", 2.5)):
        with pytest.raises(ValueError, match="train_num_steps"):
            ex.make_loss(config, value)
    _, built, _ = ex.build("linear:-2:4", (64,), 17, hidden=8, depth=1, train_num_steps=8)
    assert isinstance(built, DiscreteTimeELBO) and built.num_steps == 8
    validated = []
    original = ex._validation_bpd

    def recording(vdm, val, num_times, num_steps=None):
        validated.append(num_steps)
        return original(vdm, val, num_times, num_steps)

    monkeypatch.setattr(ex, "_validation_bpd", recording)
    run = dict(steps=4, hidden=8, depth=1, eval_times=3, val_size=40, eval_every=2, val_times=2)
    result = ex.train_and_evaluate("learned-shape", train_num_steps=4, eval_steps=(4, 16), **run)
    assert validated == [4, 4] and result["train_num_steps"] == 4
    for T in (4, 16):
        per_image = torch.tensor(result[f"test_per_image_bpd_T{T}"], dtype=torch.float64)
        assert per_image.shape == (297,) and len(result[f"test_per_image_se_T{T}"]) == 297
        assert math.isclose(per_image.mean().item(), result[f"test_bpd_T{T}"], rel_tol=1e-9)
    from pyro_diffusion.baselines import CategoricalMixture
    from pyro_diffusion.data import load_dataset

    dataset = load_dataset("digits")
    mixture = CategoricalMixture(dataset.num_levels, 5, seed=0).fit(dataset.train)
    at16 = ex.paired_comparison([result], dataset, mixture=mixture, num_steps=16)
    assert math.isclose(at16["diffusion_bpd"], result["test_bpd_T16"], rel_tol=1e-9)
    with pytest.raises(ValueError, match="test_per_image_bpd_T64"):
        ex.paired_comparison([result], dataset, mixture=mixture, num_steps=64)
    validated.clear()
    continuous = ex.train_and_evaluate("learned-shape", eval_steps=(), **run)
    assert validated == [None, None] and "train_num_steps" not in continuous


def test_paired_over_seeds_gives_both_standard_errors():
    from pyro_diffusion.vdm.experiment import paired_over_seeds

    generator = torch.Generator().manual_seed(5)
    base = torch.rand(40, generator=generator, dtype=torch.float64) + 1.5  # per-image difficulty
    shift = {0: -0.01, 1: -0.03, 2: 0.005, 3: -0.02}  # per-seed effect of "first"
    first, second = [], []
    for seed, delta in shift.items():
        noise = 0.002 * torch.randn(40, generator=generator, dtype=torch.float64)
        first.append({"seed": seed, "test_per_image_bpd_T16": (base + delta + noise).tolist()})
        if seed != 3:  # seed 3 has no partner: left out
            second.append({"seed": seed, "test_per_image_bpd_T16": base.tolist()})
    result = paired_over_seeds(first, second, num_steps=16)
    differences = torch.stack(
        [
            torch.tensor(f["test_per_image_bpd_T16"], dtype=torch.float64) - base
            for f in first
            if f["seed"] != 3
        ]
    )
    assert result["seeds"] == [0, 1, 2] and result["num_images"] == 40
    assert result["difference"] == pytest.approx(differences.mean().item(), abs=1e-12)
    assert result["per_seed"] == pytest.approx(differences.mean(1).tolist(), abs=1e-12)
    assert result["se_seeds"] == pytest.approx(differences.mean(1).std().item() / math.sqrt(3), rel=1e-9)
    assert result["se_images"] == pytest.approx(differences.mean(0).std().item() / math.sqrt(40), rel=1e-9)
    # the seed-to-seed spread (sd 0.018) dominates the per-image noise: the image SE misses it
    assert result["se_seeds"] > 3 * result["se_images"]
    assert result["images_better"] == int((differences.mean(0) < 0).sum())
    with pytest.raises(ValueError, match="test_per_image_bpd'"):
        paired_over_seeds(first, second)  # no T = ∞ values in these results
    with pytest.raises(ValueError, match="no seed in common"):
        paired_over_seeds(first[3:], second, num_steps=16)
