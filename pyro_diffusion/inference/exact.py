r"""Ground truth for validating conditional samplers on the 2-D Gaussian mixture.

For the data distribution ``p(x) = Σ_k w_k N(x; m_k, s² I)`` (equal weights, isotropic
components: :class:`~pyro_diffusion.data.GaussianMixture2D`) and a linear Gaussian
observation ``y = A x + σ_y ε`` the exact conditional is again a Gaussian mixture:

.. math::

    p(x \mid y) = \sum_k π_k\, \mathcal N(x;\ μ_k, Σ),\qquad
    Σ = (I/s^2 + A^\top A/σ_y^2)^{-1},\quad μ_k = Σ\,(m_k/s^2 + A^\top y/σ_y^2),

    π_k ∝ w_k\, \mathcal N(y;\ A m_k,\ s^2 A A^\top + σ_y^2 I).

:func:`energy_distance` measures how far a set of samples lies from another (e.g. from draws
of the exact conditional).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

from ..data import GaussianMixture2D
from .observations import LinearObservation

__all__ = ["mixture_conditional", "mixture_evidence", "energy_distance", "energy_distance_se"]


def mixture_conditional(
    mixture: GaussianMixture2D, observation: LinearObservation, y: torch.Tensor
) -> dist.MixtureSameFamily:
    """The exact p(x_0 | y) of ``mixture`` under ``observation``, as a mixture of
    MultivariateNormal components (float64).  ``y``: shape ``(m,)``, one observation."""
    if not isinstance(mixture, GaussianMixture2D):
        raise TypeError(f"mixture: expected a GaussianMixture2D, got {type(mixture).__name__}")
    if tuple(observation.event_shape) != (2,):
        raise ValueError(f"observation: expected event_shape (2,), got {tuple(observation.event_shape)}")
    observation.check_y(y)
    if y.dim() != 1:
        raise ValueError(f"y: expected one observation of shape (m,), got {tuple(y.shape)}")
    if isinstance(observation.noise_scale, torch.Tensor) and observation.noise_scale.numel() != 1:
        raise ValueError("observation: the exact conditional needs a scalar noise_scale")
    y = y.to(torch.float64)
    A = observation.matrix.to(torch.float64)
    noise_var = float(observation.noise_scale) ** 2
    prior_var = mixture.std**2
    eye = torch.eye(2, dtype=torch.float64)
    precision = eye / prior_var + A.T @ A / noise_var
    covariance = torch.linalg.inv(precision)
    covariance = 0.5 * (covariance + covariance.T)
    means = (mixture.means / prior_var + (A.T @ y) / noise_var) @ covariance.T  # (K, 2); Σ symmetric
    marginal_cov = prior_var * A @ A.T + noise_var * torch.eye(A.shape[0], dtype=torch.float64)
    log_evidence = dist.MultivariateNormal(mixture.means @ A.T, covariance_matrix=marginal_cov).log_prob(y)
    logits = log_evidence - math.log(mixture.num_components)  # log w_k N(y; A m_k, …): Σ = p(y)
    components = dist.MultivariateNormal(means, covariance_matrix=covariance.expand(len(means), 2, 2))
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


def mixture_evidence(mixture: GaussianMixture2D, observation: LinearObservation, y: torch.Tensor) -> float:
    """log p(y) = log Σ_k w_k N(y; A m_k, s² A Aᵀ + σ_y² I) under the data distribution."""
    A = observation.matrix.to(torch.float64)
    noise_var = float(observation.noise_scale) ** 2
    cov = mixture.std**2 * A @ A.T + noise_var * torch.eye(A.shape[0], dtype=torch.float64)
    log_terms = dist.MultivariateNormal(mixture.means @ A.T, covariance_matrix=cov).log_prob(
        y.to(torch.float64)
    )
    return (log_terms.logsumexp(-1) - math.log(mixture.num_components)).item()


def _mean_distance(a: torch.Tensor, b: torch.Tensor, same: bool) -> torch.Tensor:
    d = torch.cdist(a, b)
    if same:  # U-statistic: leave out the zero diagonal
        n = a.shape[0]
        return d.sum() / (n * (n - 1))
    return d.mean()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    r"""The (squared) energy distance ``2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖`` between the
    empirical distributions of ``x`` ``(n, d)`` and ``y`` ``(n', d)`` (U-statistics within each
    set, so it is unbiased and can come out slightly negative when the two agree)."""
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] < 2:
            raise ValueError(f"{name}: expected samples of shape (n, d) with n >= 2, got {value!r:.60}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x, y: expected the same dimension, got {x.shape[1]} and {y.shape[1]}")
    x = x.detach().to(torch.float64).reshape(x.shape[0], -1)
    y = y.detach().to(torch.float64).reshape(y.shape[0], -1)
    value = 2 * _mean_distance(x, y, False) - _mean_distance(x, x, True) - _mean_distance(y, y, True)
    return value.item()


def energy_distance_se(x: torch.Tensor, y: torch.Tensor, num_splits: int = 10) -> float:
    """A (conservative) standard error of :func:`energy_distance`: the standard deviation of the
    estimates on ``num_splits`` disjoint splits of both sample sets, divided by √num_splits
    (exact when the estimator's variance falls as 1/n; when the two distributions agree it
    falls as 1/n² and this overstates the error)."""
    gx = torch.arange(x.shape[0]) % num_splits
    gy = torch.arange(y.shape[0]) % num_splits
    values = torch.tensor([energy_distance(x[gx == i], y[gy == i]) for i in range(num_splits)])
    return (values.std() / num_splits**0.5).item()
