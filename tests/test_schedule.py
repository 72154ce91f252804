"""Noise schedules: the DDPM quantities read off the levels equal the β-formulas, the
functions of time, respacing, the small-T defaults and bad input."""

import math

import pytest
import torch

from _helpers import ddpm_tables
from pyro_diffusion import CosineGamma, Diffusion, LearnedGamma, LinearGamma, MLPDenoiser, NoiseSchedule
from pyro_diffusion.parameterization import step_coefficients
from pyro_diffusion.schedules import SCHEDULES, alpha_sigma


def ddpm_betas(T=1000):
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)


def test_linear_endpoints_and_derived_quantities_equal_the_beta_formulas():
    betas = ddpm_betas()
    s = NoiseSchedule(betas)
    k = ddpm_tables(betas)
    assert s.gammas.dtype == torch.float64 and s.betas.dtype == torch.float64
    torch.testing.assert_close(s.betas, betas, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(s.alphas_cumprod, k["abar"], rtol=1e-12, atol=0)
    torch.testing.assert_close(s.posterior_variance, k["tilde"], rtol=1e-9, atol=0)
    assert s.posterior_variance[0].item() == 0.0
    torch.testing.assert_close(s.log_snr, torch.log(k["abar"] / (1 - k["abar"])), rtol=1e-10, atol=1e-12)
    # NoiseSchedule.linear(1000) is this schedule
    torch.testing.assert_close(NoiseSchedule.linear(1000).gammas, s.gammas, rtol=0, atol=0)
    # the posterior q(x_{t-1} | x_t, x_0) of a step between native levels: DDPM's mean coefficients
    # and variance; the transition variance ("large") is β_t
    g = s.grid()
    coef = step_coefficients(g[:-1], g[1:], torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(coef.take.flatten(), k["coef_x0"][1:], rtol=1e-9, atol=0)
    torch.testing.assert_close(coef.keep.flatten(), k["coef_xt"][1:], rtol=1e-9, atol=0)
    torch.testing.assert_close(coef.log_small.exp().flatten(), k["tilde"][1:], rtol=1e-9, atol=0)
    torch.testing.assert_close(coef.log_large.exp().flatten(), betas[1:], rtol=1e-8, atol=0)
    # DDPM's clipped log-variance at t = 1 (the decoder's): log β̃_2
    d = Diffusion(MLPDenoiser(2, hidden=8, depth=1), s, (2,), decoder="ddpm")
    assert d._ddpm_decoder_log_variance().item() == pytest.approx(math.log(k["tilde"][1].item()), rel=1e-10)


def test_alpha_sigma_is_variance_preserving():
    gamma = torch.linspace(-20, 20, 81, dtype=torch.float64)
    alpha, sigma = alpha_sigma(gamma)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(gamma), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(torch.log(alpha**2 / sigma**2), -gamma, rtol=1e-10, atol=1e-10)


def test_cosine_matches_its_alpha_bar():
    T, offset = 200, 0.008
    s = NoiseSchedule.cosine(T, offset=offset, max_beta=0.999)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = torch.cos((t / T + offset) / (1 + offset) * math.pi / 2) ** 2
    f0 = math.cos(offset / (1 + offset) * math.pi / 2) ** 2
    # away from the clipped last step ᾱ_t = f(t)/f(0)
    torch.testing.assert_close(s.alphas_cumprod[: T - 1], (f / f0)[: T - 1], rtol=1e-9, atol=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.999)
    default = NoiseSchedule.cosine(T)  # only the last β differs: clipped at 0.9
    torch.testing.assert_close(default.betas[:-1], s.betas[:-1], rtol=1e-8, atol=1e-14)
    assert default.betas[-1].item() == pytest.approx(0.9)


def test_from_log_snr_and_from_gammas_round_trip():
    s = NoiseSchedule.cosine(50)
    again = NoiseSchedule.from_log_snr(s.log_snr)
    torch.testing.assert_close(again.betas, s.betas, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(NoiseSchedule.from_gammas(s.gammas).gammas, s.gammas, rtol=1e-10, atol=1e-10)


def test_tabulated_schedule_is_piecewise_linear_in_time_on_its_grid():
    s = NoiseSchedule.linear(200)
    T = s.num_steps
    times = torch.arange(T, dtype=torch.float64) / (T - 1)  # step t at time (t − 1)/(T − 1)
    torch.testing.assert_close(s.gamma(times), s.gammas, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.grid(), s.gammas, rtol=0, atol=0)
    at = s(torch.tensor([0.5 / (T - 1)], dtype=torch.float64))
    torch.testing.assert_close(at.gamma[0], s.gammas[:2].mean())
    torch.testing.assert_close(at.derivative[0], (s.gammas[1] - s.gammas[0]) * (T - 1))
    assert s.endpoints()[0].item() == s.gammas[0].item() and s.endpoints()[1].item() == s.gammas[-1].item()


def test_respaced_grid_is_made_of_native_levels():
    s = NoiseSchedule.linear(1000)
    steps = s.subgrid_steps(50)
    assert steps.dtype == torch.long and steps.shape == (50,)
    assert steps[0].item() == 1 and steps[-1].item() == 1000 and (steps.diff() > 0).all()
    spacing = steps.diff().double()
    assert spacing.min() >= 20 and spacing.max() <= 21  # evenly spaced: 999/49 = 20.4
    torch.testing.assert_close(s.grid(50), s.gammas[steps - 1], rtol=0, atol=0)
    assert s.subgrid_steps(1).tolist() == [1]
    assert s.grid(2000).shape == (2000,)  # more levels than native: interpolated in time
    with pytest.raises(ValueError, match="num_steps"):
        s.subgrid_steps(1001)


def test_schedule_derivatives_match_finite_differences_and_endpoints():
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
        grid = schedule.grid(9)
        torch.testing.assert_close(grid, schedule.gamma(torch.linspace(0, 1, 9, dtype=torch.float64)))
    with pytest.raises(ValueError, match="num_steps"):
        LinearGamma().grid()  # a function of time has no native grid


# ---------------------------------------------------------------------------- small T
SMALL_T = [10, 20, 50, 100]
DEFAULTS = ["linear", "cosine", "log-snr"]


@pytest.mark.parametrize("T", SMALL_T)
@pytest.mark.parametrize("name", DEFAULTS)
def test_default_schedules_have_no_beta_near_one_at_small_T(name, T):
    """A reverse ε-step multiplies the network's error by β_t/√(α_t (1 − ᾱ_t)): the defaults
    keep it at most 3 (β_t ≤ 0.9), and keep ᾱ_T small but well above 0, inside the networks'
    default level range γ ≤ 15."""
    s = SCHEDULES[name](T)
    assert s.num_steps == T
    betas, abar = s.betas, s.alphas_cumprod
    amplification = betas / (1 - betas).sqrt() / (1 - abar).sqrt()
    assert betas.max().item() <= 0.9 + 1e-9, (name, T, betas.max().item())
    assert amplification.max().item() <= 3.0, (name, T, amplification.max().item())
    assert 1e-5 < abar[-1].item() < 1e-2, (name, T, abar[-1].item())
    assert s.gammas[-1].item() < 15.0
    if name == "linear" and T >= 20:  # the DDPM range at T levels: the largest step shrinks with T
        assert betas.max().item() < 0.7, (T, betas.max().item())
    if name == "linear":  # same range of noise levels as DDPM's 1,000 steps at any T
        assert abar[0].item() == pytest.approx(1 - 1e-4, rel=1e-12)
        torch.testing.assert_close(abar[-1], NoiseSchedule.linear(1000).alphas_cumprod[-1], rtol=1e-9, atol=0)


def test_linear_with_explicit_betas_is_linear_in_beta():
    s = NoiseSchedule.linear(10, beta_start=0.01, beta_end=0.2)
    torch.testing.assert_close(
        s.betas, torch.linspace(0.01, 0.2, 10, dtype=torch.float64), rtol=1e-9, atol=1e-15
    )
    assert (NoiseSchedule.linear(10).betas < 1).all() and NoiseSchedule.linear(1).num_steps == 1


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "betas, message",
    [
        (torch.tensor([0.1, float("nan")], dtype=torch.float64), "NaN"),
        (torch.tensor([0.1, 1.0], dtype=torch.float64), "open interval"),
        (torch.tensor([0.0, 0.1], dtype=torch.float64), "open interval"),
        (torch.tensor([], dtype=torch.float64), "empty"),
        (torch.tensor([1, 2]), "floating-point"),
        (torch.full((2, 3), 0.1, dtype=torch.float64), "1-D"),
        ("abc", "1-D sequence"),
    ],
)
def test_bad_betas_are_refused_with_the_argument_named(betas, message):
    with pytest.raises((ValueError, TypeError), match="betas") as info:
        NoiseSchedule(betas)
    assert message in str(info.value)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule.linear(0)
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule.cosine(2.5)
    with pytest.raises(ValueError, match="max_beta"):
        NoiseSchedule.cosine(10, max_beta=1.0)
    with pytest.raises(ValueError, match="beta_start, beta_end"):
        NoiseSchedule.linear(10, beta_start=0.0, beta_end=0.1)
    with pytest.raises(ValueError, match="log_snr"):
        NoiseSchedule.from_log_snr(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="gammas"):
        NoiseSchedule.from_gammas(torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match="gamma_min, gamma_max"):
        LinearGamma(3.0, 1.0)
    with pytest.raises(ValueError, match="gamma_min, gamma_max"):
        CosineGamma(0.0, float("inf"))
    with pytest.raises(TypeError, match="t:"):
        LinearGamma()(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t:"):
        LinearGamma()(torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="hidden"):
        LearnedGamma(hidden=0)
    with pytest.raises(ValueError, match="log_snr_max, log_snr_min"):
        SCHEDULES["log-snr"](10, log_snr_max=-9.0, log_snr_min=7.0)


def test_buffers_follow_to():
    s = NoiseSchedule.linear(10).to(torch.device("meta"))
    assert s.gammas.device.type == "meta" and s.betas.device.type == "meta"
    assert s.grid(5).device.type == "meta"
