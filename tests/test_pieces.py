"""Decoders, networks and the adapter for step-indexed networks."""

import pytest
import torch

from pyro_diffusion import (
    DiscretizedGaussian,
    GaussianDiffusion,
    MLPDenoiser,
    NoiseSchedule,
    StepIndexed,
    UNetDenoiser,
)
from pyro_diffusion.nets import NoiseLevelEmbedding


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
def test_networks_take_noise_levels_and_size_their_outputs(learned):
    gamma = torch.tensor([-10.0, 0.0, 12.5])
    mlp = MLPDenoiser(5, hidden=16, depth=1, learned_variance=learned)
    assert mlp(torch.randn(3, 5), gamma).shape == (3, 10 if learned else 5)
    flat = MLPDenoiser((1, 2, 2), hidden=16, depth=1, learned_variance=learned)  # flattens any shape
    assert flat(torch.randn(3, 1, 2, 2), gamma).shape == (3, 2 if learned else 1, 2, 2)
    for shape in [(1, 8, 8), (3, 32, 32)]:
        unet = UNetDenoiser(shape[0], base=8, multipliers=(1, 2), learned_variance=learned)
        assert unet(torch.randn(3, *shape), gamma).shape == (
            3,
            2 * shape[0] if learned else shape[0],
            *shape[1:],
        )
    with pytest.raises(ValueError, match="hidden"):
        MLPDenoiser(2, hidden=0)
    with pytest.raises(ValueError, match="event_shape"):
        MLPDenoiser((2, 0))
    with pytest.raises(ValueError, match="gamma_range"):
        NoiseLevelEmbedding(8, gamma_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="dim"):
        NoiseLevelEmbedding(7)


def test_the_level_embedding_tells_nearby_levels_apart():
    embedding = NoiseLevelEmbedding(32)
    first = embedding(torch.tensor([-9.2, -9.1]))
    assert (first[0] - first[1]).abs().max() > 1e-3


def test_unet_refuses_odd_sizes():
    with pytest.raises(ValueError, match="divisible"):
        UNetDenoiser(1, base=8, multipliers=(1, 2, 2))(torch.randn(2, 1, 6, 6), torch.tensor([1.0, 2.0]))


class StepRecorder(torch.nn.Module):
    """A step-indexed network that records the steps it is called with and returns zeros."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return torch.zeros_like(x)


def test_step_indexed_networks_see_the_native_steps():
    schedule = NoiseSchedule.linear(50)
    recorder = StepRecorder()
    adapter = StepIndexed(recorder, schedule)
    steps = torch.arange(1, 51)
    adapter(torch.zeros(50, 2), schedule.gammas)
    torch.testing.assert_close(recorder.seen[-1], steps.float(), rtol=0, atol=0)  # t in the data dtype
    midway = 0.5 * (schedule.gammas[:-1] + schedule.gammas[1:])
    torch.testing.assert_close(adapter.steps(midway), steps[:-1].double() + 0.5, rtol=0, atol=1e-9)
    # outside the grid: clamped to 1..T; long=True rounds to the nearest step
    torch.testing.assert_close(
        adapter.steps(torch.tensor([-50.0, 50.0])), torch.tensor([1.0, 50.0], dtype=torch.float64)
    )
    rounding = StepIndexed(recorder, schedule, long=True)
    rounding(torch.zeros(3, 2), schedule.gammas[[0, 9, 49]].float())  # float32 levels, as the data's dtype
    assert recorder.seen[-1].dtype == torch.long and recorder.seen[-1].tolist() == [1, 10, 50]
    # through a diffusion: the model's own grid and a respaced one give the native steps
    d = GaussianDiffusion(StepIndexed(recorder, schedule, long=True), schedule, (2,))
    recorder.seen.clear()
    d.sample(2, num_steps=10)
    called = torch.cat(recorder.seen).unique().sort().values
    assert called.tolist() == schedule.subgrid_steps(10).tolist()
