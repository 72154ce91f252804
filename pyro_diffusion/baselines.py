r"""Simple likelihood baselines for K-level images, so that bits/dim numbers mean something.

Both are exact discrete models, so ``−log₂ p(x) / D`` is a true code length in bits/dim and
directly comparable with the diffusion's bound (which is an upper bound on its own code
length).

* :class:`PixelCategorical` — every pixel independent, ``p(x) = ∏_d π_d[x_d]``, fitted by
  counting with a symmetric Dirichlet(α) prior (posterior mean; α = 1 is Laplace's rule).
* :class:`CategoricalMixture` — ``p(x) = Σ_m w_m ∏_d π_{m,d}[x_d]``, a mixture of products
  of categoricals fitted by EM (MAP with Dirichlet(1 + α) priors on π, so empty cells get
  probability > 0), initialized from ``seed``.

Data are given as in :func:`~pyro_diffusion.data.load_dataset`: floats on K evenly spaced
levels in [−1, 1], shape ``(N, *event_shape)``; :func:`to_levels` maps them to integers.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

__all__ = ["to_levels", "PixelCategorical", "CategoricalMixture", "baseline_bits_per_dim"]


def to_levels(x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Integers ``0..K−1`` of shape ``(N, D)`` from K-level data in [−1, 1] (``(N, *event)``).

    Raises ``ValueError`` when a value is more than 1e-3 of a level away from a level."""
    if not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels: expected an integer K >= 2, got {num_levels!r}")
    x = torch.as_tensor(x).double().reshape(x.shape[0], -1)
    scaled = (x + 1) * (num_levels - 1) / 2
    levels = scaled.round()
    if (scaled - levels).abs().max() > 1e-3 or levels.min() < 0 or levels.max() > num_levels - 1:
        raise ValueError(f"x: expected values on the {num_levels} levels −1 + 2k/(K−1) in [−1, 1]")
    return levels.long()


def _one_hot(levels: torch.Tensor, num_levels: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(levels, num_levels).double()  # (N, D, K)


class PixelCategorical:
    """Independent categorical per pixel: ``log p(x) = Σ_d log π_d[x_d]``.

    Args:
        num_levels: K.
        alpha: Dirichlet pseudo-count per level (> 0).
    """

    def __init__(self, num_levels: int, alpha: float = 1.0) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha: expected a positive pseudo-count, got {alpha!r}")
        self.num_levels = num_levels
        self.alpha = alpha
        self.log_probs: torch.Tensor | None = None  # (D, K)

    def fit(self, x: torch.Tensor) -> PixelCategorical:
        counts = _one_hot(to_levels(x, self.num_levels), self.num_levels).sum(0) + self.alpha
        self.log_probs = torch.log(counts / counts.sum(-1, keepdim=True))
        return self

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` in nats per datum, shape ``(N,)``."""
        if self.log_probs is None:
            raise RuntimeError("PixelCategorical: call fit() before log_prob()")
        levels = to_levels(x, self.num_levels)
        return self.log_probs.gather(1, levels.T).T.sum(1)


class CategoricalMixture:
    """Mixture of ``num_components`` products of categoricals, fitted by EM.

    E-step: responsibilities ``r_{nm} ∝ w_m ∏_d π_{m,d}[x_{nd}]``.  M-step (MAP):
    ``π_{m,d,k} ∝ Σ_n r_{nm} [x_{nd} = k] + α`` and ``w_m ∝ Σ_n r_{nm} + α``.

    Args:
        num_levels: K.
        num_components: M.
        alpha: Dirichlet pseudo-count (> 0).
        iterations: EM iterations.
        seed: initialization seed (responsibilities drawn from a flat Dirichlet).
    """

    def __init__(
        self,
        num_levels: int,
        num_components: int = 50,
        alpha: float = 0.5,
        iterations: int = 100,
        seed: int = 0,
    ) -> None:
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components: expected a positive integer, got {num_components!r}")
        if not alpha > 0:
            raise ValueError(f"alpha: expected a positive pseudo-count, got {alpha!r}")
        self.num_levels = num_levels
        self.num_components = num_components
        self.alpha = alpha
        self.iterations = iterations
        self.seed = seed
        self.log_weights: torch.Tensor | None = None  # (M,)
        self.log_probs: torch.Tensor | None = None  # (M, D, K)
        self.train_log_likelihood: list[float] = []

    def _joint(self, onehot: torch.Tensor) -> torch.Tensor:
        # log w_m + Σ_d log π_{m,d}[x_d] → (N, M)
        return torch.einsum("ndk,mdk->nm", onehot, self.log_probs) + self.log_weights

    def fit(self, x: torch.Tensor, progress: bool = False) -> CategoricalMixture:
        onehot = _one_hot(to_levels(x, self.num_levels), self.num_levels)
        g = torch.Generator().manual_seed(self.seed)
        resp = -torch.log(torch.rand(onehot.shape[0], self.num_components, generator=g, dtype=torch.float64))
        resp = resp / resp.sum(1, keepdim=True)
        for _ in tqdm(range(self.iterations), desc="EM", disable=not progress):
            counts = torch.einsum("nm,ndk->mdk", resp, onehot) + self.alpha
            self.log_probs = torch.log(counts / counts.sum(-1, keepdim=True))
            weights = resp.sum(0) + self.alpha
            self.log_weights = torch.log(weights / weights.sum())
            joint = self._joint(onehot)
            log_norm = torch.logsumexp(joint, 1, keepdim=True)
            resp = torch.exp(joint - log_norm)
            self.train_log_likelihood.append(log_norm.mean().item())
        return self

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` in nats per datum, shape ``(N,)``."""
        if self.log_probs is None:
            raise RuntimeError("CategoricalMixture: call fit() before log_prob()")
        onehot = _one_hot(to_levels(x, self.num_levels), self.num_levels)
        return torch.logsumexp(self._joint(onehot), 1)


def bits_per_dim(model, x: torch.Tensor) -> tuple[float, float]:
    """Mean ``−log₂ p(x)/D`` over ``x`` and its standard error over data."""
    values = -model.log_prob(x) / (x[0].numel() * math.log(2))
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


def baseline_bits_per_dim(dataset, num_components: int = 50, seed: int = 0) -> dict:
    """Both baselines fitted on ``dataset.train`` and scored on ``dataset.test`` (bits/dim,
    mean and standard error).  ``dataset.num_levels`` must be set (K-level data)."""
    if dataset.num_levels is None:
        raise ValueError(f"dataset: baselines need K-level data (num_levels), {dataset.name!r} has none")
    K = dataset.num_levels
    pixel = PixelCategorical(K).fit(dataset.train)
    mixture = CategoricalMixture(K, num_components, seed=seed).fit(dataset.train)
    p_mean, p_se = bits_per_dim(pixel, dataset.test)
    m_mean, m_se = bits_per_dim(mixture, dataset.test)
    return {
        "pixel_categorical": {"bits_per_dim": p_mean, "bits_per_dim_se": p_se},
        "categorical_mixture": {
            "bits_per_dim": m_mean,
            "bits_per_dim_se": m_se,
            "num_components": num_components,
        },
    }
