"""Linear observations, the exact mixture conditional against Monte Carlo, energy distance."""

import math

import pytest
import torch

from pyro_diffusion.data import GaussianMixture2D
from pyro_diffusion.inference.exact import (
    energy_distance,
    energy_distance_se,
    mixture_conditional,
    mixture_evidence,
)
from pyro_diffusion.inference.observations import LinearObservation


def test_mask_selects_entries_and_replace_writes_them():
    mask = torch.tensor([[[True, False], [False, True]]])
    obs = LinearObservation.mask(mask, noise_scale=0.1)
    x = torch.arange(8.0).reshape(2, 1, 2, 2)
    assert obs.num_observations == 2
    torch.testing.assert_close(obs.mean(x), x.reshape(2, -1)[:, [0, 3]])
    written = obs.replace(x, torch.tensor([-1.0, -2.0]))
    assert torch.equal(obs.mean(written), torch.tensor([[-1.0, -2.0], [-1.0, -2.0]]))
    assert torch.equal(written.reshape(2, -1)[:, [1, 2]], x.reshape(2, -1)[:, [1, 2]])


def test_blur_matrix_is_the_convolution():
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 0.0]]) / 8
    obs = LinearObservation.blur(kernel, (1, 4, 5), noise_scale=0.1)
    x = torch.randn(3, 1, 4, 5)
    direct = torch.nn.functional.conv2d(x, kernel[None, None], padding=1)
    torch.testing.assert_close(obs.mean(x), direct.reshape(3, -1))


def test_log_prob_is_the_gaussian_likelihood_and_broadcasts_sigma():
    obs = LinearObservation(torch.tensor([[1.0, 2.0]]), (2,), noise_scale=0.5)
    x = torch.tensor([[0.2, -0.1], [1.0, 1.0]])
    y = torch.tensor([0.3])
    expected = torch.distributions.Normal(x @ torch.tensor([1.0, 2.0]), 0.5).log_prob(y[0])
    torch.testing.assert_close(obs.log_prob(y, x), expected)
    sigma = torch.tensor([[0.5], [2.0]])
    expected = torch.distributions.Normal(x @ torch.tensor([1.0, 2.0]), sigma[:, 0]).log_prob(y[0])
    torch.testing.assert_close(obs.log_prob(y, x, noise_scale=sigma), expected)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LinearObservation(torch.ones(2, 3), (2,), 0.1), "matrix"),
        (lambda: LinearObservation(torch.ones(1, 2), (2,), -1.0), "noise_scale"),
        (lambda: LinearObservation.mask(torch.zeros(2, dtype=torch.bool), 0.1), "mask"),
        (lambda: LinearObservation.mask(torch.ones(2), 0.1), "mask"),
        (lambda: LinearObservation.denoising((2,), 0.1).log_prob(torch.zeros(3), torch.zeros(1, 2)), "y"),
        (lambda: LinearObservation.denoising((2,), 0.1).mean(torch.zeros(1, 3)), "x0"),
    ],
)
def test_bad_input_is_refused_by_name(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


@pytest.mark.parametrize(
    "observation, y",
    [
        (LinearObservation.mask(torch.tensor([True, False]), 0.2), torch.tensor([1.0])),
        (LinearObservation.denoising((2,), 0.5), torch.tensor([0.9, 0.4])),
        (LinearObservation(torch.tensor([[1.0, 1.0]]), (2,), 0.3), torch.tensor([1.2])),
    ],
)
def test_exact_conditional_matches_self_normalized_importance_sampling(observation, y):
    """Prior draws weighted by p(y | x) estimate E[x | y], P(x_2 > 0 | y) and p(y); each
    within 4 (delta-method) standard errors of the closed form."""
    mixture = GaussianMixture2D()
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x = mixture.sample(n, g).to(torch.float64)
    log_w = observation.log_prob(y.to(torch.float64), x)
    w = (log_w - log_w.max()).exp()
    w = w / w.sum()
    exact = mixture_conditional(mixture, observation, y)
    # posterior mean of each coordinate and a tail probability
    for values, truth in [
        (x[:, 0], exact.mean[0]),
        (x[:, 1], exact.mean[1]),
        ((x[:, 1] > 0).double(), (exact.sample((400_000,))[:, 1] > 0).double().mean()),
    ]:
        estimate = (w * values).sum()
        se = ((w**2 * (values - estimate) ** 2).sum()).sqrt()  # self-normalized IS standard error
        assert abs(estimate - truth) < 4 * se + 4 * 0.5 / math.sqrt(400_000)
    # the evidence: p(y) = E_prior[p(y | x)]
    likelihood = log_w.exp()
    log_mean = likelihood.mean().log().item()
    rel_se = (likelihood.std() / likelihood.mean() / math.sqrt(n)).item()
    assert abs(log_mean - mixture_evidence(mixture, observation, y)) < 4 * rel_se


def test_energy_distance_separates_distributions_and_not_equal_ones():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2000, 2, generator=g), torch.randn(2000, 2, generator=g)
    shifted = b + torch.tensor([0.3, 0.0])
    same, same_se = energy_distance(a, b), energy_distance_se(a, b)
    far, far_se = energy_distance(a, shifted), energy_distance_se(a, shifted)
    assert abs(same) < 4 * same_se
    assert far > 4 * far_se
    # the population value for N(0, I) against a 0.3 shift, by numerical integration-free MC
    big = torch.Generator().manual_seed(2)
    x, y = torch.randn(4000, 2, generator=big), torch.randn(4000, 2, generator=big) + torch.tensor([0.3, 0.0])
    assert abs(far - energy_distance(x, y)) < 4 * math.hypot(far_se, energy_distance_se(x, y))
    with pytest.raises(ValueError, match="x, y"):
        energy_distance(a, torch.zeros(5, 3))
