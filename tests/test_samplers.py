"""Samplers: ancestral sampling is the model's reverse chain on any grid, respacing uses the
native levels, DDIM, exact denoisers, and samples of short chains staying on the data's scale.

With Gaussian data x ~ N(0, v I) and its exact denoiser every sampler is linear in x_K, so the
variance of its samples has a closed form on any grid (:func:`sampler_variance`): DDIM (η = 0)
maps z_t to z_s = (α_s α_t v + σ_s σ_t)/(α_t² v + σ_t²) · z_t, which by Cauchy–Schwarz loses
variance at every step of finite width; an ancestral step adds its own noise.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from _helpers import OptimalGaussianDenoiser, OptimalPointsDenoiser, linear_denoiser
from pyro_diffusion import (
    CosineGamma,
    Diffusion,
    GaussianDiffusion,
    LinearGamma,
    MLPDenoiser,
    NoiseSchedule,
    SimplifiedLoss,
    StepIndexed,
    UNetDenoiser,
    ancestral,
    ddim,
)
from pyro_diffusion.data import GaussianMixture2D
from pyro_diffusion.samplers import SAMPLERS
from pyro_diffusion.schedules import SCHEDULES

VARIANCE = 0.25


def sampler_variance(
    gammas: torch.Tensor, method: str, variance: str = "small", v: float = VARIANCE
) -> float:
    """Var of one coordinate of the samples (plain decoder's mean z_1/α_1) from x_K ~ N(0, 1) with
    the exact denoiser of N(0, v) data, on the grid ``gammas``."""
    g = gammas.double()
    a2, s2 = torch.sigmoid(-g), torch.sigmoid(g)
    var = torch.tensor(1.0, dtype=torch.float64)
    for t in range(g.shape[0] - 1, 0, -1):
        s = t - 1
        m = a2[t] * v + s2[t]  # the data's marginal variance at level t
        if method == "ddim":
            var = ((a2[s] * a2[t]).sqrt() * v + (s2[s] * s2[t]).sqrt()) ** 2 / m**2 * var
        else:
            c = -torch.expm1(g[s] - g[t])
            gain = (a2[s] / a2[t]).sqrt() * (1 - c) + a2[s].sqrt() * c * a2[t].sqrt() * v / m
            var = gain**2 * var + c * (s2[s] if variance == "small" else s2[t])
    return (var / a2[0]).item()


# ---------------------------------------------------------------------------- the reverse chain
@pytest.mark.parametrize(
    "make, num_steps",
    [
        (lambda: NoiseSchedule.linear(12), None),
        (lambda: NoiseSchedule.linear(100), 9),
        (lambda: LinearGamma(-8.0, 6.0), 7),
        (lambda: CosineGamma(-8.0, 6.0), None),
    ],
)
@pytest.mark.parametrize("variance", ["small", "large"])
def test_ancestral_sampling_is_the_models_reverse_chain(make, num_steps, variance):
    """With the same seed, ``sample(..., denoise_last=False)`` draws exactly what the Pyro model
    (the reverse chain, x_0 from the decoder) generates on the same grid."""
    torch.manual_seed(0)
    d = Diffusion(
        MLPDenoiser(2, hidden=16, depth=1), make(), (2,), variance=variance, decoder="network", num_steps=12
    )
    pyro.set_rng_seed(4)
    with torch.no_grad():
        chain = d.model(num_samples=64, num_steps=num_steps)
    pyro.set_rng_seed(4)
    samples = d.sample(64, num_steps=num_steps, denoise_last=False)
    torch.testing.assert_close(samples, chain, rtol=1e-6, atol=1e-6)
    # and the default returns the decoder's mean at the sampler's last x_1
    seen = []
    pyro.set_rng_seed(4)
    mean = d.sample(64, num_steps=num_steps, callback=seen.append)
    x_1 = seen[-2]["x"]
    torch.testing.assert_close(mean, d.decoder_distribution(x_1, d.grid(num_steps)[0]).loc)


def test_respaced_ancestral_sampling_uses_exactly_the_native_levels():
    schedule = NoiseSchedule.linear(1000)
    steps = schedule.subgrid_steps(50)

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x, t):
            self.seen.append(t.clone())
            return torch.zeros_like(x)

    recorder = Recorder()
    d = GaussianDiffusion(StepIndexed(recorder, schedule), schedule, (2,))
    levels = []
    d.sample(3, num_steps=50, callback=lambda info: levels.append(info["gamma"]))
    torch.testing.assert_close(torch.stack(levels).flip(0), schedule.gammas[steps - 1], rtol=0, atol=0)
    called = torch.cat(recorder.seen).unique()
    torch.testing.assert_close(called, steps.float(), rtol=0, atol=1e-4)  # the network sees native steps


# ---------------------------------------------------------------------------- DDIM
def test_ddim_with_eta_zero_is_deterministic_given_the_noise():
    torch.manual_seed(0)
    d = Diffusion(MLPDenoiser(2, hidden=16, depth=1), LinearGamma(-8.0, 6.0), (2,), num_steps=20)
    x_T = torch.randn(16, 2)
    torch.manual_seed(1)
    a = d.sample(16, method="ddim", x_T=x_T)
    torch.manual_seed(2)
    b = d.sample(16, method="ddim", x_T=x_T)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    noisy_a = d.sample(16, method="ddim", eta=1.0, x_T=x_T)
    torch.manual_seed(2)
    noisy_b = d.sample(16, method="ddim", eta=1.0, x_T=x_T)
    assert not torch.equal(noisy_a, noisy_b)


def test_ddim_with_eta_one_steps_like_ancestral_with_the_posterior_variance():
    """η = 1: s² = c σ_s², so a DDIM step has the mean and variance of the ancestral step with
    variance="small"; with the same seed the draws agree."""
    torch.manual_seed(0)
    d = Diffusion(MLPDenoiser(2, hidden=16, depth=1), LinearGamma(-8.0, 6.0), (2,), num_steps=20).double()
    x_T = torch.randn(256, 2, dtype=torch.float64)
    torch.manual_seed(3)
    a = ddim(d, x_T, d.grid(), eta=1.0)
    torch.manual_seed(3)
    b = ancestral(d, x_T, d.grid())
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("make", [lambda: NoiseSchedule.linear(1000), lambda: LinearGamma(-10.0, 10.0)])
@pytest.mark.parametrize("num_steps", [10, 100])
@pytest.mark.parametrize(
    "method, variance", [("ddim", "small"), ("ancestral", "small"), ("ancestral", "large")]
)
def test_exact_denoiser_samples_have_the_samplers_variance(make, num_steps, method, variance):
    """Gaussian data with its exact denoiser: the samples' variance is the closed form of the
    sampler on that grid (within 4 SE), which tends to the data's as the grid is refined."""
    n, dim = 20_000, 4
    d = Diffusion(
        OptimalGaussianDenoiser(VARIANCE), make(), (dim,), variance=variance, num_steps=1000
    ).double()
    torch.manual_seed(5)
    x = d.sample(n, num_steps=num_steps, method=method, dtype=torch.float64)
    expected = sampler_variance(d.grid(num_steps), method, variance)
    got = x.var(0).mean().item()
    se = expected * math.sqrt(2 / (n - 1) / dim)
    assert abs(got - expected) < 4 * se, (got, expected, se)
    assert abs(x.mean().item()) < 4 * math.sqrt(expected / (n * dim))
    # refining the grid takes the sampler to the data's variance
    errors = [abs(sampler_variance(d.grid(k), method, variance) - VARIANCE) for k in (10, 100, 1000)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02 * VARIANCE, errors
    if num_steps == 100:
        assert abs(got - VARIANCE) < 0.13 * VARIANCE


def test_sampling_from_a_perfect_denoiser_recovers_a_point_mass():
    """With x_0 ≡ c the exact ε-predictor is ε = (z − α c)/σ; ancestral sampling with the
    posterior variance then returns c."""
    schedule = NoiseSchedule.linear(50)
    c = torch.tensor([0.7, -0.2])
    d = GaussianDiffusion(OptimalPointsDenoiser(c[None]), schedule, (2,), variance="small")
    x = d.sample(500)
    torch.testing.assert_close(x, c.expand(500, 2), rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------- grids and options
@pytest.mark.parametrize("num_steps", [1, 2, 7, 33, 250])
@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_continuous_time_schedules_sample_with_any_number_of_steps(num_steps, method):
    points = torch.tensor([[1.0, 0.0], [-0.5, 0.5]])
    d = Diffusion(OptimalPointsDenoiser(points), CosineGamma(-8.0, 8.0), (2,), decoder="network")
    levels = []
    x = d.sample(64, num_steps=num_steps, method=method, callback=lambda info: levels.append(info["step"]))
    assert x.shape == (64, 2) and torch.isfinite(x).all()
    assert levels == list(range(num_steps, 0, -1))
    if num_steps >= 33:  # the samples are the points
        distance = torch.cdist(x, points).min(1).values
        assert distance.max() < 0.05


def test_callback_and_progress(capsys):
    torch.manual_seed(0)
    d = GaussianDiffusion(MLPDenoiser(2, hidden=8, depth=1), NoiseSchedule.linear(6), (2,))
    seen = []
    x = d.sample(3, callback=seen.append, progress=True)
    assert [info["step"] for info in seen] == [6, 5, 4, 3, 2, 1]
    assert all(set(info) == {"step", "gamma", "x", "x0_hat"} for info in seen)
    torch.testing.assert_close(torch.stack([info["gamma"] for info in seen]).flip(0), d.grid())
    assert all(info["x"].shape == (3, 2) and info["x0_hat"].shape == (3, 2) for info in seen)
    assert torch.equal(seen[-1]["x"], x)
    assert "sampling" in capsys.readouterr().err  # the progress bar
    d.sample(3, method="ddim", progress=True)
    assert "DDIM" in capsys.readouterr().err


def test_discretized_samples_lie_on_the_levels():
    T = 5
    d = GaussianDiffusion(
        UNetDenoiser(1, base=8), NoiseSchedule.linear(T), (1, 8, 8), decoder="discretized", num_levels=17
    )
    x = d.sample(3)
    assert x.shape == (3, 1, 8, 8) and ((x * 8).round() == x * 8).all()
    y = d.sample(2, denoise_last=False)
    assert ((y * 8).round() == y * 8).all() and y.min() >= -1 and y.max() <= 1


def test_samples_follow_dtype_and_given_noise():
    d = GaussianDiffusion(linear_denoiser((2,), NoiseSchedule.linear(5)), NoiseSchedule.linear(5), (2,))
    assert d.sample(3, dtype=torch.float64).dtype == torch.float64
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    a = d.sample(3, method="ddim", generator=g)
    torch.manual_seed(2)
    b = d.sample(3, method="ddim", x_T=x_T)
    torch.testing.assert_close(a, b)


def test_bad_sampler_arguments_name_themselves():
    d = GaussianDiffusion(MLPDenoiser(2, hidden=8, depth=1), NoiseSchedule.linear(5), (2,))
    for call, argument in (
        (lambda: d.sample(0), "num_samples"),
        (lambda: d.sample(True), "num_samples"),
        (lambda: d.sample(2, method="euler"), "method"),
        (lambda: d.sample(2, num_steps=0), "num_steps"),
        (lambda: d.sample(2, method="ddim", eta=2.0), "eta"),
        (lambda: d.sample(2, x_T=torch.zeros(3, 2)), "x_T"),
        (lambda: ancestral(d, torch.zeros(2, 2), torch.tensor([1.0, 0.0])), "gammas"),
        (lambda: ddim(d, torch.zeros(2, 2), torch.tensor([[0.0, 1.0]])), "gammas"),
    ):
        with pytest.raises(ValueError, match=argument):
            call()


# ---------------------------------------------------------------------------- short chains
SMALL_T = [10, 20, 50, 100]
DEFAULTS = ["linear", "cosine", "log-snr"]
RADIUS = 1.5  # GaussianMixture2D's means lie on a circle of this radius (std 0.3)


@pytest.mark.parametrize("T", SMALL_T)
@pytest.mark.parametrize("name", DEFAULTS)
def test_short_chains_with_an_exact_denoiser_stay_on_the_data(name, T):
    mixture = GaussianMixture2D()
    points = mixture.sample(256, torch.Generator().manual_seed(0)).double()
    d = GaussianDiffusion(OptimalPointsDenoiser(points), SCHEDULES[name](T), (2,))
    for method in ("ancestral", "ddim"):
        x = d.sample(300, method=method, dtype=torch.float64)
        assert torch.isfinite(x).all() and x.abs().max() <= points.abs().max() + 1e-6, (name, T, method)


def _train_briefly(name: str, T: int, steps: int) -> GaussianDiffusion:
    mixture = GaussianMixture2D()
    pyro.clear_param_store()
    torch.manual_seed(0)
    d = GaussianDiffusion(MLPDenoiser(2, hidden=64, depth=2), SCHEDULES[name](T), (2,))
    optimizer = torch.optim.Adam(d.parameters(), lr=3e-3)
    loss = SimplifiedLoss()
    for i in range(steps):
        x = mixture.sample(256, torch.Generator().manual_seed(i))
        optimizer.zero_grad()
        loss.differentiable_loss(d.model, d.guide, x).backward()
        optimizer.step()
    return d


def _assert_on_the_datas_scale(d, what):
    x = d.sample(2000)
    size = x.abs().max(1).values
    # the data: 99% of |x|_∞ below 2.3; a step with β near 1 throws most samples far out
    assert size.quantile(0.99).item() < 4.0, (what, size.quantile(0.99).item())
    assert (size > 10).float().mean().item() < 0.01, (what, (size > 10).float().mean().item())


@pytest.mark.parametrize("name", DEFAULTS)
def test_a_briefly_trained_ten_step_model_samples_on_the_datas_scale(name):
    _assert_on_the_datas_scale(_train_briefly(name, 10, 200), (name, 10))


@pytest.mark.slow
@pytest.mark.parametrize("T", SMALL_T)
@pytest.mark.parametrize("name", DEFAULTS)
def test_briefly_trained_short_chains_sample_on_the_datas_scale(name, T):
    _assert_on_the_datas_scale(_train_briefly(name, T, 400), (name, T))
