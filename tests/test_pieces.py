"""Decoders, networks and sampling."""

import math

import pytest
import torch

from pyro_diffusion import (
    DiscretizedGaussian,
    GaussianDiffusion,
    MLPDenoiser,
    NoiseSchedule,
    UNetDenoiser,
    ancestral_sample,
)


@pytest.mark.parametrize("num_levels", [2, 17, 256])
@pytest.mark.parametrize("scale", [1e-3, 0.05, 0.7, 30.0])
def test_discretized_gaussian_is_a_probability_mass_over_the_levels(num_levels, scale):
    levels = torch.linspace(-1, 1, num_levels, dtype=torch.float64)
    locs = torch.tensor([-1.3, -0.4, 0.0, 0.37, 1.0], dtype=torch.float64)
    d = DiscretizedGaussian(
        locs[:, None].expand(5, num_levels), torch.tensor(scale, dtype=torch.float64), num_levels
    )
    log_p = d.log_prob(levels.expand(5, num_levels))
    total = torch.logsumexp(log_p, dim=1).exp()
    torch.testing.assert_close(total, torch.ones(5, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_discretized_gaussian_matches_the_cdf_difference():
    normal = torch.distributions.Normal(
        torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    )
    d = DiscretizedGaussian(normal.loc, normal.scale, 17)
    h = 1 / 16
    for x in [-0.5, 0.0, 0.25, 0.875]:
        x = torch.tensor(x, dtype=torch.float64)
        expected = torch.log(normal.cdf(x + h) - normal.cdf(x - h))
        torch.testing.assert_close(d.log_prob(x), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        d.log_prob(torch.tensor(-1.0, dtype=torch.float64)),
        torch.log(normal.cdf(torch.tensor(-1 + h, dtype=torch.float64))),
    )
    torch.testing.assert_close(
        d.log_prob(torch.tensor(1.0, dtype=torch.float64)),
        torch.log(1 - normal.cdf(torch.tensor(1 - h, dtype=torch.float64))),
    )


def test_discretized_gaussian_far_tail_is_finite_with_finite_gradients():
    loc = torch.tensor([0.0, 0.0], requires_grad=True)
    d = DiscretizedGaussian(loc, torch.tensor([1e-3, 1e-3]), 17)
    lp = d.log_prob(torch.tensor([0.5, -0.75]))
    assert torch.isfinite(lp).all() and (lp < -1000).all()
    lp.sum().backward()
    assert torch.isfinite(loc.grad).all()


def test_discretized_gaussian_samples_lie_on_the_levels():
    d = DiscretizedGaussian(torch.zeros(1000), torch.ones(1000), 17)
    x = d.sample()
    assert ((x * 8).round() == x * 8).all() and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("learned", [False, True])
def test_networks_accept_one_based_steps_and_size_their_outputs(learned):
    t = torch.tensor([1, 1000, 500])
    mlp = MLPDenoiser(5, hidden=16, depth=1, learned_variance=learned)
    assert mlp(torch.randn(3, 5), t).shape == (3, 10 if learned else 5)
    for shape in [(1, 8, 8), (3, 32, 32)]:
        unet = UNetDenoiser(shape[0], base=8, multipliers=(1, 2), learned_variance=learned)
        assert unet(torch.randn(3, *shape), t).shape == (3, 2 * shape[0] if learned else shape[0], *shape[1:])


def test_unet_refuses_odd_sizes():
    with pytest.raises(ValueError, match="divisible"):
        UNetDenoiser(1, base=8, multipliers=(1, 2, 2))(torch.randn(2, 1, 6, 6), torch.tensor([1, 2]))


def test_ancestral_sampling_shapes_levels_and_chain():
    T = 5
    d = GaussianDiffusion(
        UNetDenoiser(1, base=8), NoiseSchedule.linear(T), (1, 8, 8), decoder="discretized", num_levels=17
    )
    x, chain = ancestral_sample(d, 3, return_chain=True)
    assert x.shape == (3, 1, 8, 8) and len(chain) == T
    assert ((x * 8).round() == x * 8).all()
    y = d.sample(2, denoise_last=False)
    assert ((y * 8).round() == y * 8).all()
    with pytest.raises(ValueError, match="num_samples"):
        d.sample(0)


def test_sampling_from_a_perfect_denoiser_recovers_a_point_mass():
    """With x_0 ≡ c the exact ε-predictor is ε = (x_t − √ᾱ_t c)/√(1−ᾱ_t); ancestral sampling
    with the posterior variance then returns c."""
    T = 50
    schedule = NoiseSchedule.linear(T)
    c = torch.tensor([0.7, -0.2])

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            a = schedule.alphas_cumprod.float()[t - 1][:, None]
            return (x - a.sqrt() * c) / (1 - a).sqrt()

    d = GaussianDiffusion(Oracle(), schedule, (2,), variance="small")
    x = d.sample(500)
    torch.testing.assert_close(x, c.expand(500, 2), rtol=0, atol=1e-3)
    assert math.isfinite(x.sum().item())
