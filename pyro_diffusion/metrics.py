r"""Sample-quality metrics.

For 2-D data, two-sample distances between samples X ~ p_θ and held-out data Y:

* :func:`energy_distance` — ``E‖X−Y‖ − ½E‖X−X'‖ − ½E‖Y−Y'‖`` (the square of Székely's
  energy distance up to a factor 2; zero iff the laws agree), V-statistic.
* :func:`mmd` — squared maximum mean discrepancy with a Gaussian kernel
  ``k(x, y) = exp(−‖x−y‖²/(2h²))`` (h the median heuristic by default), unbiased U-statistic.

For digits, a small classifier trained on the digits training split
(:class:`DigitsClassifier`) gives

* :func:`frechet_distance` between Gaussians fitted to its penultimate-layer features of
  samples and of test images: ``‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁^{½} Σ₂ Σ₁^{½})^{½})``
  (the FID formula, in this classifier's feature space — not comparable with published FIDs);
* the classifier's confidence on samples (mean max-softmax probability) and the spread of
  its predicted classes;

and :func:`nearest_neighbour_check` measures how close samples come to training images,
against the same distance for test images (copies would sit far closer than test images).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = [
    "energy_distance",
    "mmd",
    "DigitsClassifier",
    "frechet_distance",
    "classifier_report",
    "nearest_neighbour_check",
]


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x).double().reshape(len(x), -1)
    y = torch.as_tensor(y).double().reshape(len(y), -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x, y: expected the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"x, y: expected at least 2 points each, got {len(x)} and {len(y)}")
    return x, y


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """``E‖X−Y‖ − ½E‖X−X'‖ − ½E‖Y−Y'‖`` from samples ``x (N, D)`` and ``y (M, D)``
    (V-statistic: all pairs, including i = j, so it is ≥ 0)."""
    x, y = _check_pair(x, y)
    return (torch.cdist(x, y).mean() - 0.5 * torch.cdist(x, x).mean() - 0.5 * torch.cdist(y, y).mean()).item()


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with a Gaussian kernel of ``bandwidth`` h (default: the median
    pairwise distance of the pooled sample).  Can be slightly negative when p = q."""
    x, y = _check_pair(x, y)
    if bandwidth is None:
        pooled = torch.cat([x, y])
        bandwidth = torch.pdist(pooled).median().item()
    if not bandwidth > 0:
        raise ValueError(f"bandwidth: expected a positive kernel width, got {bandwidth!r}")

    def k(a, b):
        return torch.exp(-(torch.cdist(a, b) ** 2) / (2 * bandwidth**2))

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return (term_x + term_y - 2 * kxy.mean()).item()


class DigitsClassifier(nn.Module):
    """A small MLP ``64 → 128 → 64 → 10`` for 8×8 digits in [−1, 1]; :meth:`features` is the
    64-d penultimate layer used by :func:`frechet_distance`."""

    def __init__(self, hidden: int = 128, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU()
        )
        self.head = nn.Linear(features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(len(x), 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @classmethod
    def fit(
        cls, images: torch.Tensor, labels: torch.Tensor, epochs: int = 30, seed: int = 0
    ) -> DigitsClassifier:
        """Train with Adam on cross-entropy, minibatches of 64, light Gaussian input noise
        (σ = 0.1, so features are not brittle on samples); deterministic given ``seed``."""
        images = torch.as_tensor(images).float().reshape(len(images), 64)
        labels = torch.as_tensor(labels).long()
        if len(images) != len(labels):
            raise ValueError(f"images, labels: expected equal lengths, got {len(images)} and {len(labels)}")
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = cls()
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=g)
            for start in range(0, len(images), 64):
                index = order[start : start + 64]
                noisy = images[index] + 0.1 * torch.randn(len(index), 64, generator=g)
                loss = nn.functional.cross_entropy(model(noisy), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return model.eval()

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return (self(images.float()).argmax(1) == labels).double().mean().item()


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, F)``:
    ``‖μ_a−μ_b‖² + tr Σ_a + tr Σ_b − 2 tr (Σ_a^{½} Σ_b Σ_a^{½})^{½}``."""
    a = torch.as_tensor(features_a).double().numpy()
    b = torch.as_tensor(features_b).double().numpy()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"features_a, features_b: expected (N, F) arrays, got {a.shape} and {b.shape}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_cross)


@torch.no_grad()
def classifier_report(classifier: DigitsClassifier, samples: torch.Tensor, reference: torch.Tensor) -> dict:
    """Fréchet distance of ``samples`` to ``reference`` images in the classifier's feature
    space, the classifier's mean confidence (max softmax) on each, and the entropy (bits) of
    the predicted-class histogram of the samples (log₂ 10 ≈ 3.32 when all classes appear
    equally)."""
    samples = torch.as_tensor(samples).float()
    reference = torch.as_tensor(reference).float()
    probs = torch.softmax(classifier(samples), 1)
    ref_probs = torch.softmax(classifier(reference), 1)
    histogram = torch.bincount(probs.argmax(1), minlength=10).double() / len(samples)
    nonzero = histogram[histogram > 0]
    return {
        "frechet_distance": frechet_distance(classifier.features(samples), classifier.features(reference)),
        "confidence": probs.max(1).values.mean().item(),
        "reference_confidence": ref_probs.max(1).values.mean().item(),
        "class_entropy_bits": -(nonzero * torch.log2(nonzero)).sum().item(),
    }


@torch.no_grad()
def nearest_neighbour_check(samples: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> dict:
    """Euclidean distance from each sample, and from each test image, to its nearest training
    image.  Memorized copies would show as sample distances near 0, far below the test
    images' (which are new draws from the data law by construction).

    Returns the median distances, ``copy_fraction`` (share of samples closer to a training
    image than the 1st percentile of test-to-train distances) and ``exact_copies`` (share at
    distance < 1e-6)."""
    s = torch.as_tensor(samples).double().reshape(len(samples), -1)
    tr = torch.as_tensor(train).double().reshape(len(train), -1)
    te = torch.as_tensor(test).double().reshape(len(test), -1)
    sample_nn = torch.cdist(s, tr).min(1).values
    test_nn = torch.cdist(te, tr).min(1).values
    threshold = torch.quantile(test_nn, 0.01).item()
    return {
        "sample_nn_median": sample_nn.median().item(),
        "test_nn_median": test_nn.median().item(),
        "copy_threshold": threshold,
        "copy_fraction": (sample_nn < threshold).double().mean().item(),
        "exact_copies": (sample_nn < 1e-6).double().mean().item(),
    }


def two_sample_report(samples: torch.Tensor, held_out: torch.Tensor, max_points: int = 2000) -> dict:
    """Energy distance and MMD between samples and held-out data (at most ``max_points``
    of each, the first ones)."""
    x, y = samples[:max_points], held_out[:max_points]
    return {"energy_distance": energy_distance(x, y), "mmd": mmd(x, y)}


def standard_error(values) -> float:
    values = list(values)
    if len(values) < 2:
        return float("nan")
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))
