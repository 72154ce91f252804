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

__all__ = [
    "to_levels",
    "PixelCategorical",
    "CategoricalMixture",
    "PRIORS",
    "ALPHA_GRID",
    "tune_baselines",
    "baseline_bits_per_dim",
]


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


PRIORS = ("uniform", "pooled")


def _check_prior(prior: str) -> None:
    if prior not in PRIORS:
        raise ValueError(f"prior: expected one of {PRIORS}, got {prior!r}")


def _pseudo_counts(onehot: torch.Tensor, alpha: float, prior: str) -> torch.Tensor:
    """Dirichlet pseudo-counts per level, shape (K,): ``alpha`` each (``"uniform"``), or
    ``alpha · K`` spread in proportion to the pooled frequency of each level over all pixels of
    the training data (``"pooled"``; a level no pixel takes gets a 1e-3 share of one count).
    The pooled prior matters where the data use few of the K levels (the digits as 8-bit data
    take 17 of 256): a uniform pseudo-count there puts mass on levels that never occur."""
    if prior == "uniform":
        return torch.full(onehot.shape[-1:], float(alpha), dtype=onehot.dtype)
    pooled = onehot.sum((0, 1)) + 1e-3
    return alpha * onehot.shape[-1] * pooled / pooled.sum()


class PixelCategorical:
    """Independent categorical per pixel: ``log p(x) = Σ_d log π_d[x_d]``.

    Args:
        num_levels: K.
        alpha: Dirichlet pseudo-count per level (> 0).
        prior: ``"uniform"`` (``alpha`` per level) or ``"pooled"`` (``alpha · K`` spread by the
            pooled level frequencies, :func:`_pseudo_counts`).
    """

    def __init__(self, num_levels: int, alpha: float = 1.0, prior: str = "uniform") -> None:
        if not alpha > 0:
            raise ValueError(f"alpha: expected a positive pseudo-count, got {alpha!r}")
        _check_prior(prior)
        self.num_levels = num_levels
        self.alpha = alpha
        self.prior = prior
        self.log_probs: torch.Tensor | None = None  # (D, K)

    def fit(self, x: torch.Tensor) -> PixelCategorical:
        onehot = _one_hot(to_levels(x, self.num_levels), self.num_levels)
        counts = onehot.sum(0) + _pseudo_counts(onehot, self.alpha, self.prior)
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
        prior: ``"uniform"`` or ``"pooled"`` pseudo-counts, as for :class:`PixelCategorical`.
    """

    def __init__(
        self,
        num_levels: int,
        num_components: int = 50,
        alpha: float = 0.5,
        iterations: int = 100,
        seed: int = 0,
        prior: str = "uniform",
    ) -> None:
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components: expected a positive integer, got {num_components!r}")
        if not alpha > 0:
            raise ValueError(f"alpha: expected a positive pseudo-count, got {alpha!r}")
        _check_prior(prior)
        self.prior = prior
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
        pseudo = _pseudo_counts(onehot, self.alpha, self.prior)
        for _ in tqdm(range(self.iterations), desc="EM", disable=not progress):
            counts = torch.einsum("nm,ndk->mdk", resp, onehot) + pseudo
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


ALPHA_GRID = (1.0, 0.5, 0.3, 0.1, 0.03, 0.01)


def tune_baselines(
    dataset, num_components: int = 50, seed: int = 0, val_size: int = 200, iterations: int = 50
) -> dict:
    """Choose each baseline's pseudo-count ``alpha`` (from :data:`ALPHA_GRID`) and ``prior``
    (:data:`PRIORS`) on a validation split: fit on ``dataset.train`` less its last ``val_size``
    data, score on those.  Returns ``{"pixel_categorical": {"alpha", "prior", "val_bits_per_dim"},
    "categorical_mixture": {...}}``.  The test split is not used."""
    if dataset.num_levels is None:
        raise ValueError(f"dataset: baselines need K-level data (num_levels), {dataset.name!r} has none")
    if not isinstance(val_size, int) or not 0 < val_size < len(dataset.train):
        raise ValueError(f"val_size: expected an integer in (0, {len(dataset.train)}), got {val_size!r}")
    K = dataset.num_levels
    fit_x, val_x = dataset.train[:-val_size], dataset.train[-val_size:]
    chosen = {}
    for name in ("pixel_categorical", "categorical_mixture"):
        best = None
        for prior in PRIORS:
            for alpha in ALPHA_GRID:
                if name == "pixel_categorical":
                    model = PixelCategorical(K, alpha, prior=prior).fit(fit_x)
                else:
                    model = CategoricalMixture(
                        K, num_components, alpha=alpha, iterations=iterations, seed=seed, prior=prior
                    ).fit(fit_x)
                value = bits_per_dim(model, val_x)[0]
                if best is None or value < best["val_bits_per_dim"]:
                    best = {"alpha": alpha, "prior": prior, "val_bits_per_dim": value}
        chosen[name] = best
    return chosen


def baseline_bits_per_dim(
    dataset, num_components: int = 50, seed: int = 0, settings: dict | None = None
) -> dict:
    """Both baselines fitted on ``dataset.train`` and scored on ``dataset.test`` (bits/dim,
    mean and standard error).  ``dataset.num_levels`` must be set (K-level data).

    ``settings``: per baseline ``{"alpha": ..., "prior": ...}`` (e.g. from
    :func:`tune_baselines`); default: pseudo-count 1 (pixel) and 0.5 (mixture), uniform."""
    if dataset.num_levels is None:
        raise ValueError(f"dataset: baselines need K-level data (num_levels), {dataset.name!r} has none")
    K = dataset.num_levels
    settings = settings or {}
    pixel_options = {
        k: v for k, v in settings.get("pixel_categorical", {}).items() if k in ("alpha", "prior")
    }
    mixture_options = {
        k: v for k, v in settings.get("categorical_mixture", {}).items() if k in ("alpha", "prior")
    }
    pixel = PixelCategorical(K, **pixel_options).fit(dataset.train)
    mixture = CategoricalMixture(K, num_components, seed=seed, **mixture_options).fit(dataset.train)
    p_mean, p_se = bits_per_dim(pixel, dataset.test)
    m_mean, m_se = bits_per_dim(mixture, dataset.test)
    return {
        "pixel_categorical": {"bits_per_dim": p_mean, "bits_per_dim_se": p_se, **pixel_options},
        "categorical_mixture": {
            "bits_per_dim": m_mean,
            "bits_per_dim_se": m_se,
            "num_components": num_components,
            **mixture_options,
        },
    }
