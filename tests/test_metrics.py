"""Sample-quality metrics: exact values where known, statistics with standard-error tolerances."""

import math

import pytest
import torch

from pyro_diffusion.data import load_dataset
from pyro_diffusion.metrics import (
    DigitsClassifier,
    classifier_report,
    energy_distance,
    frechet_distance,
    mmd,
    nearest_neighbour_check,
)

REPS, N = 20, 400


def normal(n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, generator=g, dtype=torch.float64) + shift


def test_energy_distance_matches_its_closed_form_in_one_dimension():
    # X ~ N(0,1), Y ~ N(δ,1): E|X−Y| with X−Y ~ N(−δ, 2), and E|X−X'| = 2/√π
    delta, s = 0.5, math.sqrt(2)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-(delta**2) / (2 * s**2)) + delta * math.erf(
        delta / (s * math.sqrt(2))
    )
    exact = e_xy - 2 / math.sqrt(math.pi)
    values = torch.tensor(
        [energy_distance(normal(N, 0, 2 * r), normal(N, delta, 2 * r + 1)) for r in range(REPS)]
    )
    bias = 2 / math.sqrt(math.pi) / N  # the V-statistic's i = j zeros in the two within-sample terms
    assert abs(values.mean().item() - exact) < 4 * values.std().item() / math.sqrt(REPS) + bias


def test_mmd_is_unbiased_at_zero_and_detects_a_shift():
    same = torch.tensor(
        [mmd(normal(N, 0, 2 * r), normal(N, 0, 2 * r + 1), bandwidth=1.0) for r in range(REPS)]
    )
    assert abs(same.mean().item()) < 4 * same.std().item() / math.sqrt(REPS)
    shifted = torch.tensor(
        [mmd(normal(N, 0, 2 * r), normal(N, 0.5, 2 * r + 1), bandwidth=1.0) for r in range(REPS)]
    )
    # population value for Gaussian kernel h=1 and N(0,1) vs N(δ,1): 2/√3 (1 − exp(−δ²/6))
    exact = 2 / math.sqrt(3) * (1 - math.exp(-(0.5**2) / 6))
    assert abs(shifted.mean().item() - exact) < 4 * shifted.std().item() / math.sqrt(REPS)


def test_frechet_distance_identities():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64
    )
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.arange(6, dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum().item(), rel=1e-8)
    # b = 2a: Σ_b = 4Σ_a, so the trace part is tr Σ_a (1 + 4 − 4) and the mean part ‖μ_a‖²
    cov_trace = torch.cov(a.T).trace().item()
    expected = (a.mean(0) ** 2).sum().item() + cov_trace
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="features_a, features_b"):
        frechet_distance(a, a[:, :3])


@pytest.fixture(scope="module")
def digits_and_classifier():
    digits = load_dataset("digits")
    return digits, DigitsClassifier.fit(digits.train, digits.labels_train, epochs=15)


def test_classifier_reads_digits_and_its_features_separate_digits_from_noise(digits_and_classifier):
    digits, classifier = digits_and_classifier
    accuracy = classifier.accuracy(digits.test, digits.labels_test)
    assert accuracy > 0.9  # 297 test images: a 0.9 floor is > 4 se below the ~0.97 it reaches
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(297, 1, 8, 8, generator=g) * 2 - 1
    real = classifier_report(classifier, digits.train[:297], digits.test)
    fake = classifier_report(classifier, noise, digits.test)
    assert real["frechet_distance"] < 0.1 * fake["frechet_distance"]
    assert real["confidence"] > fake["confidence"] + 0.1
    assert real["class_entropy_bits"] > math.log2(10) - 0.1  # all ten classes, evenly


def test_nearest_neighbour_check_flags_copies_not_new_draws(digits_and_classifier):
    digits, _ = digits_and_classifier
    copies = nearest_neighbour_check(digits.train[:100], digits.train, digits.test)
    assert copies["exact_copies"] == 1.0 and copies["copy_fraction"] == 1.0
    fresh = nearest_neighbour_check(digits.test, digits.train, digits.test)
    assert fresh["exact_copies"] == 0.0
    assert fresh["copy_fraction"] <= 4 / 297  # below the test set's 1st percentile: about 3 of 297
