"""Noise schedules: β_t and every quantity derived from it, in float64.

Notation follows DESIGN.md §1: steps ``t = 1..T`` (1-based), ``α_t = 1 − β_t``,
``ᾱ_t = ∏_{s≤t} α_s`` with ``ᾱ_0 = 1``, and the forward posterior

    q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I),
    μ̃_t = coef_x0_t · x_0 + coef_xt_t · x_t,
    β̃_t = β_t (1 − ᾱ_{t-1}) / (1 − ᾱ_t).

Every buffer is a float64 tensor of length ``T`` whose entry ``i`` belongs to step
``t = i + 1``; :meth:`NoiseSchedule.at` picks step ``t`` for a batch and casts it to the
data's dtype.  The schedule is an ``nn.Module`` so that ``.to(device)`` moves the buffers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NoiseSchedule"]


def _check_betas(betas: torch.Tensor) -> torch.Tensor:
    if not isinstance(betas, torch.Tensor):
        try:
            betas = torch.as_tensor(betas, dtype=torch.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"betas: expected a 1-D sequence of floats in (0, 1), got {type(betas).__name__}"
            ) from error
    if not (betas.is_floating_point()):
        raise TypeError(f"betas: expected a floating-point tensor, got dtype {betas.dtype}")
    if betas.dim() != 1:
        raise ValueError(f"betas: expected a 1-D tensor of shape (T,), got shape {tuple(betas.shape)}")
    if betas.numel() == 0:
        raise ValueError("betas: expected at least one step (T >= 1), got an empty tensor")
    betas = betas.detach().to(torch.float64)
    if torch.isnan(betas).any():
        raise ValueError("betas: contains NaN; expected every β_t in the open interval (0, 1)")
    if (betas <= 0).any() or (betas >= 1).any():
        bad = betas[(betas <= 0) | (betas >= 1)][0].item()
        raise ValueError(f"betas: expected every β_t in the open interval (0, 1), found {bad!r}")
    return betas


class NoiseSchedule(nn.Module):
    r"""A discrete noise schedule ``β_1..β_T`` with all derived quantities precomputed.

    Buffers (float64, shape ``(T,)``, entry ``t-1`` for step ``t``):

    ``betas`` β_t; ``alphas`` α_t; ``alphas_cumprod`` ᾱ_t; ``alphas_cumprod_prev`` ᾱ_{t-1};
    ``sqrt_alphas_cumprod`` √ᾱ_t; ``sqrt_one_minus_alphas_cumprod`` √(1−ᾱ_t);
    ``posterior_variance`` β̃_t (β̃_1 = 0); ``posterior_log_variance_clipped`` log β̃_t with
    entry 0 replaced by log β̃_2 (DDPM's clipping, β̃_1 = 0 has no log);
    ``posterior_mean_coef_x0``, ``posterior_mean_coef_xt`` the two coefficients of μ̃_t;
    ``log_snr`` log SNR(t) = log ᾱ_t − log(1 − ᾱ_t).

    Args:
        betas: 1-D floating-point tensor (or sequence) of β_t, each in the open interval (0, 1).

    Example::

        >>> schedule = NoiseSchedule.linear(1000)
        >>> schedule.at("alphas_cumprod", torch.tensor([1, 1000]), torch.zeros(2, 3)).shape
        torch.Size([2, 1])
    """

    betas: torch.Tensor

    def __init__(self, betas: torch.Tensor | list[float]) -> None:
        super().__init__()
        betas = _check_betas(betas)
        alphas = 1.0 - betas
        # cumprod through logs keeps ᾱ_t accurate for long schedules
        alphas_cumprod = torch.exp(torch.cumsum(torch.log(alphas), 0))
        alphas_cumprod_prev = torch.cat([betas.new_ones(1), alphas_cumprod[:-1]])
        one_minus = -torch.expm1(torch.cumsum(torch.log(alphas), 0))  # 1 − ᾱ_t
        one_minus_prev = torch.cat([betas.new_zeros(1), one_minus[:-1]])
        posterior_variance = betas * one_minus_prev / one_minus
        if len(betas) > 1:
            clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        else:  # T = 1 has no β̃_2; fall back on β_1
            clipped = betas.clone()
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "log_betas": torch.log(betas),
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "one_minus_alphas_cumprod": one_minus,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": one_minus.sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.log(clipped),
            "posterior_mean_coef_x0": alphas_cumprod_prev.sqrt() * betas / one_minus,
            "posterior_mean_coef_xt": alphas.sqrt() * one_minus_prev / one_minus,
            "log_snr": torch.log(alphas_cumprod) - torch.log(one_minus),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self._cast_cache: dict = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(
        cls, num_steps: int, beta_start: float | None = None, beta_end: float | None = None
    ) -> NoiseSchedule:
        """DDPM's linear schedule.  By default ``β_1 = 1e-4·1000/T`` and ``β_T = 0.02·1000/T``
        (Improved DDPM's scaling, which gives DDPM's 1e-4 … 0.02 at T = 1000), each default
        capped at 0.999 so that short chains (T < 20) stay valid."""
        num_steps = _check_num_steps(num_steps)
        scale = 1000.0 / num_steps
        beta_start = min(1e-4 * scale, 0.999) if beta_start is None else beta_start
        beta_end = min(0.02 * scale, 0.999) if beta_end is None else beta_end
        if not (0 < beta_start < 1 and 0 < beta_end < 1):
            raise ValueError(f"beta_start, beta_end: expected both in (0, 1), got {beta_start}, {beta_end}")
        return cls(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Improved DDPM's cosine schedule ``ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)``,
        with β_t clipped at ``max_beta``."""
        num_steps = _check_num_steps(num_steps)
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls(betas)

    @classmethod
    def from_log_snr(cls, log_snr: torch.Tensor) -> NoiseSchedule:
        """The schedule whose ``log SNR(t) = log ᾱ_t/(1−ᾱ_t)`` takes the given (strictly
        decreasing) values at t = 1..T."""
        log_snr = torch.as_tensor(log_snr, dtype=torch.float64)
        if log_snr.dim() != 1 or log_snr.numel() == 0:
            raise ValueError(f"log_snr: expected a non-empty 1-D tensor, got shape {tuple(log_snr.shape)}")
        if not (log_snr[1:] < log_snr[:-1]).all():
            raise ValueError("log_snr: expected strictly decreasing values (noise grows with t)")
        alphas_cumprod = torch.sigmoid(log_snr)
        prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        return cls(1 - alphas_cumprod / prev)

    # ------------------------------------------------------------------ access
    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0]

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Buffer ``name`` at 1-based steps ``t`` (shape ``(B,)``), cast to ``like``'s dtype and
        shaped ``(B, 1, …, 1)`` to broadcast against ``like`` of shape ``(B, *event)``."""
        values = self.cast(name, like.dtype)[t - 1]
        return values.reshape(t.shape + (1,) * (like.dim() - t.dim()))

    def cast(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Buffer ``name`` in ``dtype`` (cached; recomputed when the buffer moves)."""
        buffer = getattr(self, name)
        if buffer.dtype == dtype:
            return buffer
        key = (name, dtype)
        cached = self._cast_cache.get(key)
        if cached is None or cached.device != buffer.device:
            cached = buffer.to(dtype)
            self._cast_cache[key] = cached
        return cached

    def _apply(self, fn, *args, **kwargs):  # invalidate the dtype cache on .to()/.cuda()
        self._cast_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        b = self.betas
        return f"T={self.num_steps}, beta_1={b[0].item():.3g}, beta_T={b[-1].item():.3g}"


def _check_num_steps(num_steps: int) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive integer T, got {num_steps!r}")
    return num_steps
