r"""Linear Gaussian observations of x_0: ``y = A vec(x_0) + σ_y ε``, ``ε ~ N(0, I_m)``.

``A`` is an ``(m, D)`` matrix acting on the flattened datum (``D = prod(event_shape)``), so
one class covers inpainting (``A`` = rows of the identity for the observed entries),
denoising (``A = I``), blurring (``A`` = a convolution written as a matrix) and any matrix the
user gives.  The likelihood

.. math::  p(y \mid x_0) = \mathcal N(y;\ A\,\mathrm{vec}(x_0),\ σ_y^2 I_m)

is what every conditional sampler in :mod:`pyro_diffusion.inference` targets; ``σ_y`` may be a
tensor (e.g. a sample of a hyperprior, broadcast against the batch).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

__all__ = ["LinearObservation", "SpectralForm"]


def _check_scale(noise_scale) -> torch.Tensor | float:
    if isinstance(noise_scale, torch.Tensor):
        if not torch.isfinite(noise_scale).all() or (noise_scale <= 0).any():
            raise ValueError("noise_scale: expected σ_y > 0 and finite")
        return noise_scale
    if not isinstance(noise_scale, (int, float)) or not math.isfinite(noise_scale) or noise_scale <= 0:
        raise ValueError(f"noise_scale: expected a positive number σ_y, got {noise_scale!r}")
    return float(noise_scale)


class SpectralForm:
    """The SVD of an observation matrix: ``U`` (m, m), ``singular_values`` (r,) the nonzero ones,
    ``Vh`` (D, D) and ``rank`` r (float64, CPU)."""

    def __init__(self, U: torch.Tensor, singular_values: torch.Tensor, Vh: torch.Tensor, rank: int) -> None:
        self.U, self.singular_values, self.Vh, self.rank = U, singular_values, Vh, rank

    def project(self, y: torch.Tensor, noise_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ȳ (r,), τ (r,), rest (m − r,))``: the observation in the V basis, ȳ = (Uᵀ y)_{:r} / s,
        its noise scales τ = σ_y / s, and the components of Uᵀ y that A cannot produce."""
        u_y = self.U.T @ y.detach().to(torch.float64).cpu()
        s = self.singular_values
        return u_y[: self.rank] / s, noise_scale / s, u_y[self.rank :]


class LinearObservation:
    r"""The observation model ``y = A vec(x_0) + σ_y ε``.

    Args:
        matrix: ``A``, a float tensor of shape ``(m, D)`` with ``D = prod(event_shape)``.
        event_shape: the shape of one datum x_0, e.g. ``(2,)`` or ``(1, 8, 8)``.
        noise_scale: σ_y > 0 (a number, or a tensor broadcastable against ``(…, m)``).
        observed_index: for masks only, the flat indices of the observed entries
            (``A = I[observed_index]``); used by the replacement heuristic.

    Example::

        >>> obs = LinearObservation.mask(torch.tensor([True, False]), noise_scale=0.05)
        >>> obs.matrix
        tensor([[1., 0.]])
        >>> y = obs.sample(torch.tensor([[0.3, -1.0]]))  # shape (1, 1)
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        event_shape: tuple[int, ...] | torch.Size,
        noise_scale: float | torch.Tensor,
        observed_index: torch.Tensor | None = None,
    ) -> None:
        self.event_shape = torch.Size(event_shape)
        size = math.prod(self.event_shape)
        if not isinstance(matrix, torch.Tensor) or not matrix.is_floating_point():
            raise TypeError(
                f"matrix: expected a floating-point tensor A of shape (m, {size}), got {matrix!r:.60}"
            )
        if matrix.dim() != 2 or matrix.shape[1] != size or matrix.shape[0] < 1:
            raise ValueError(
                f"matrix: expected shape (m, {size}) for event_shape {tuple(self.event_shape)}, "
                f"got {tuple(matrix.shape)}"
            )
        if not torch.isfinite(matrix).all():
            raise ValueError("matrix: contains NaN or infinite values")
        self.matrix = matrix
        self.noise_scale = _check_scale(noise_scale)
        self.observed_index = observed_index

    # ------------------------------------------------------------------ constructors
    @classmethod
    def mask(cls, mask: torch.Tensor, noise_scale: float | torch.Tensor) -> LinearObservation:
        """Inpainting: observe the entries of x_0 where the boolean ``mask`` (shape
        ``event_shape``) is True; ``A`` holds the matching rows of the identity."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a boolean tensor of shape event_shape, got {mask!r:.60}")
        index = mask.reshape(-1).nonzero().squeeze(-1)
        if index.numel() == 0:
            raise ValueError("mask: observes nothing; expected at least one True entry")
        matrix = torch.eye(mask.numel())[index]
        return cls(matrix, mask.shape, noise_scale, observed_index=index)

    @classmethod
    def denoising(cls, event_shape: tuple[int, ...], noise_scale: float | torch.Tensor) -> LinearObservation:
        """Denoising: ``A = I``, every entry observed with Gaussian noise σ_y."""
        size = math.prod(event_shape)
        return cls(torch.eye(size), event_shape, noise_scale, observed_index=torch.arange(size))

    @classmethod
    def blur(
        cls, kernel: torch.Tensor, event_shape: tuple[int, int, int], noise_scale: float | torch.Tensor
    ) -> LinearObservation:
        """Blurring of images ``(C, H, W)``: each channel convolved with the 2-D ``kernel``
        (odd sizes, zero padding, output of the same size), written as a ``(D, D)`` matrix."""
        if len(event_shape) != 3:
            raise ValueError(f"event_shape: expected (C, H, W) for blur, got {tuple(event_shape)}")
        if kernel.dim() != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"kernel: expected a 2-D kernel of odd sizes, got shape {tuple(kernel.shape)}")
        channels, height, width = event_shape
        size = channels * height * width
        basis = torch.eye(size).reshape(size, channels, height, width)
        weight = kernel.to(torch.float32).expand(channels, 1, *kernel.shape)
        padding = (kernel.shape[0] // 2, kernel.shape[1] // 2)
        columns = torch.nn.functional.conv2d(basis, weight, padding=padding, groups=channels)
        return cls(columns.reshape(size, size).T.contiguous(), event_shape, noise_scale)

    # ------------------------------------------------------------------ the likelihood
    @property
    def num_observations(self) -> int:
        """m, the length of y."""
        return self.matrix.shape[0]

    def check_y(self, y: torch.Tensor, argument: str = "y") -> torch.Tensor:
        """Refuse ``y`` that is not a float tensor whose last dimension is m."""
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            raise TypeError(
                f"{argument}: expected a floating-point tensor of shape (..., {self.num_observations})"
            )
        if y.dim() < 1 or y.shape[-1] != self.num_observations:
            raise ValueError(
                f"{argument}: expected shape (..., {self.num_observations}), got {tuple(y.shape)}"
            )
        return y

    def mean(self, x0: torch.Tensor) -> torch.Tensor:
        """``A vec(x_0)``: ``(..., *event_shape)`` → ``(..., m)``."""
        event_dims = len(self.event_shape)
        if tuple(x0.shape[x0.dim() - event_dims :]) != tuple(self.event_shape):
            raise ValueError(f"x0: expected trailing shape {tuple(self.event_shape)}, got {tuple(x0.shape)}")
        flat = x0.reshape(*x0.shape[: x0.dim() - event_dims], -1)
        return flat @ self.matrix.to(flat.dtype).T

    def distribution(self, x0: torch.Tensor, noise_scale=None) -> dist.Distribution:
        """p(y | x_0) = N(A vec(x_0), σ_y² I), with event shape ``(m,)``."""
        loc = self.mean(x0)
        scale = self.noise_scale if noise_scale is None else _check_scale(noise_scale)
        scale = torch.as_tensor(scale, dtype=loc.dtype)
        return dist.Normal(loc, scale.expand(torch.broadcast_shapes(scale.shape, loc.shape))).to_event(1)

    def log_prob(self, y: torch.Tensor, x0: torch.Tensor, noise_scale=None) -> torch.Tensor:
        """log p(y | x_0), shape the batch shape of ``x0`` broadcast with ``y``'s."""
        return self.distribution(x0, noise_scale).log_prob(self.check_y(y))

    def sample(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw y ~ p(y | x_0), shape ``(..., m)``."""
        loc = self.mean(x0)
        noise = torch.randn(loc.shape, generator=generator, dtype=loc.dtype)
        return loc + torch.as_tensor(self.noise_scale, dtype=loc.dtype) * noise

    def svd(self) -> SpectralForm:
        r"""``A = U diag(s) V_hᵀ`` (thin in U, full in V_h) and what the samplers that work in its
        basis need (:class:`SpectralForm`): in the coordinates ``x̄ = V_h vec(x)`` the observation
        reads ``ȳ_i = (Uᵀ y)_i / s_i = x̄_i + (σ_y / s_i) η_i`` for the first r = rank(A)
        coordinates and says nothing about the others.  Float64, computed once."""
        cached = getattr(self, "_svd", None)
        if cached is None:
            A = self.matrix.detach().to(torch.float64).cpu()
            U, s, Vh = torch.linalg.svd(A, full_matrices=True)
            tol = s.max() * max(A.shape) * torch.finfo(torch.float64).eps
            rank = int((s > tol).sum())
            cached = self._svd = SpectralForm(U, s[:rank], Vh, rank)
        return cached

    def replace(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Write ``values`` (shape ``(..., m)``) into the observed entries of ``x`` (masks only)."""
        if self.observed_index is None:
            raise ValueError("replace: only masks (and denoising) have observed entries to replace")
        event_dims = len(self.event_shape)
        flat = x.reshape(*x.shape[: x.dim() - event_dims], -1).clone()
        flat[..., self.observed_index] = values.to(flat.dtype).expand(*flat.shape[:-1], -1)
        return flat.reshape(x.shape)

    def __repr__(self) -> str:
        return (
            f"LinearObservation(m={self.num_observations}, event_shape={tuple(self.event_shape)}, "
            f"noise_scale={self.noise_scale})"
        )


def check_conditioning(diffusion, observation: LinearObservation, y: torch.Tensor) -> torch.Tensor:
    """Refuse a (diffusion, observation, y) triple that does not fit together: ``diffusion`` a
    :class:`~pyro_diffusion.diffusion.Diffusion`, ``observation`` a :class:`LinearObservation` of
    the same event shape, ``y`` a valid observation.  Returns ``y``."""
    from .prior import check_diffusion

    check_diffusion(diffusion)
    if not isinstance(observation, LinearObservation):
        raise TypeError(f"observation: expected a LinearObservation, got {type(observation).__name__}")
    if tuple(observation.event_shape) != tuple(diffusion.event_shape):
        raise ValueError(
            f"observation: event_shape {tuple(observation.event_shape)} differs from the diffusion's "
            f"{tuple(diffusion.event_shape)}"
        )
    return observation.check_y(y)
