"""Categorical baselines for K-level images: normalization, identities, and the digits numbers."""

import itertools
import math

import pytest
import torch

from pyro_diffusion.baselines import CategoricalMixture, PixelCategorical, bits_per_dim, to_levels
from pyro_diffusion.data import load_dataset


def all_images(num_pixels, num_levels):
    grid = torch.tensor(list(itertools.product(range(num_levels), repeat=num_pixels)), dtype=torch.float64)
    return grid * 2 / (num_levels - 1) - 1


def random_levels(n, num_pixels, num_levels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(num_levels, (n, num_pixels), generator=g).double() * 2 / (num_levels - 1) - 1


def test_to_levels_round_trip_and_errors():
    x = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0]])
    assert to_levels(x, 5).tolist() == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="levels"):
        to_levels(torch.tensor([[0.3]]), 5)
    with pytest.raises(ValueError, match="num_levels"):
        to_levels(x, 1)


def test_pixel_categorical_is_the_smoothed_frequency():
    data = torch.tensor([[-1.0], [-1.0], [1.0], [0.0]])  # K = 3, counts 2, 1, 1
    model = PixelCategorical(3, alpha=0.5).fit(data)
    expected = torch.tensor([2.5, 1.5, 1.5]) / 5.5
    assert torch.allclose(model.log_probs[0].exp(), expected.double())


@pytest.mark.parametrize(
    "model", [PixelCategorical(3), CategoricalMixture(3, num_components=4, iterations=20)]
)
def test_models_are_normalized_over_all_images(model):
    model.fit(random_levels(50, 3, 3))
    total = torch.logsumexp(model.log_prob(all_images(3, 3)), 0)
    assert total.item() == pytest.approx(0.0, abs=1e-10)


def test_one_component_mixture_equals_the_pixel_model():
    data = random_levels(80, 6, 5, seed=1)
    pixel = PixelCategorical(5, alpha=0.5).fit(data)
    mixture = CategoricalMixture(5, num_components=1, alpha=0.5, iterations=3).fit(data)
    assert torch.allclose(pixel.log_prob(data), mixture.log_prob(data), atol=1e-12)


def test_em_recovers_a_two_cluster_structure():
    # two prototypes with 10% pixel noise: a 2-component mixture must fit far better than pixels
    g = torch.Generator().manual_seed(0)
    prototypes = torch.tensor([[0] * 8 + [2] * 8, [2] * 8 + [0] * 8])
    labels = torch.randint(2, (400,), generator=g)
    levels = prototypes[labels]
    flip = torch.rand(levels.shape, generator=g) < 0.1
    levels = torch.where(flip, torch.randint(3, levels.shape, generator=g), levels)
    data = levels.double() - 1
    pixel, _ = bits_per_dim(PixelCategorical(3).fit(data), data)
    mixture_model = CategoricalMixture(3, num_components=2, iterations=50).fit(data)
    mixture, se = bits_per_dim(mixture_model, data)
    assert mixture < pixel - 0.3  # pixel ≈ 1 + ... bits, mixture near the 10%-noise entropy
    assert mixture_model.log_weights.exp().min() > 0.4


def test_digits_baselines_match_the_stated_numbers():
    digits = load_dataset("digits")
    pixel = PixelCategorical(17).fit(digits.train)
    mixture = CategoricalMixture(17, num_components=20, iterations=60).fit(digits.train)
    p_bits = -pixel.log_prob(digits.test) / (64 * math.log(2))
    m_bits = -mixture.log_prob(digits.test) / (64 * math.log(2))
    # about 2.4 (pixels) and 2.2 (mixture) bits/dim on the 297 test images
    assert p_bits.mean().item() == pytest.approx(2.44, abs=0.03)
    assert m_bits.mean().item() == pytest.approx(2.22, abs=0.05)
    difference = p_bits - m_bits  # paired over test images
    assert difference.mean() > 4 * difference.std() / math.sqrt(len(difference))
