r"""Noise schedules as functions of continuous time: γ(t) = −log SNR(t) on t ∈ [0, 1].

A variance-preserving diffusion at time t is ``z_t = α_t x + σ_t ε`` with

    α_t² = sigmoid(−γ(t)),   σ_t² = sigmoid(γ(t)),   SNR(t) = α_t²/σ_t² = exp(−γ(t)),

and γ strictly increasing (noise grows with t).  The bound depends on γ only through its
values; the continuous-time bound only through its endpoints γ(0), γ(1) (VDM, Kingma et al.
2021, eq. 15).  Every schedule here returns, for times ``t`` of shape ``(B,)``, a
:class:`GammaAt` with γ(t), γ'(t) (both float64) and the tensors through which the
*shape* of the schedule enters (empty for fixed schedules), on which
:class:`~pyro_diffusion.vdm.losses.ContinuousTimeELBO` hangs its variance-gradient hook.

Schedules:

* :class:`LinearGamma` — γ linear in t (VDM's fixed baseline).
* :class:`CosineGamma` — the cosine schedule's form ``γ = 2 log tan θ`` with θ linear in t,
  between given endpoints (Improved DDPM's ᾱ(t) = cos²θ, truncated to finite log-SNR).
* :class:`TabulatedGamma` — γ piecewise linear through values on a grid; ``from_noise_schedule``
  turns the core's discrete :class:`~pyro_diffusion.schedule.NoiseSchedule` into one, with
  the same numbers at the grid points.
* :class:`LearnedGamma` — learnable endpoints γ_min, γ_max and a monotone network for the
  shape (VDM's parameterization).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ..schedule import NoiseSchedule

__all__ = [
    "GammaAt",
    "GammaSchedule",
    "LinearGamma",
    "CosineGamma",
    "TabulatedGamma",
    "LearnedGamma",
    "alpha_sigma",
]


class GammaAt(NamedTuple):
    """γ(t) and γ'(t) (float64, shape ``(B,)``) and the schedule's shape outputs at t."""

    gamma: torch.Tensor
    derivative: torch.Tensor
    shape_outputs: tuple[torch.Tensor, ...] = ()


def alpha_sigma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, σ) = (√sigmoid(−γ), √sigmoid(γ)), so that α² + σ² = 1 and α²/σ² = exp(−γ)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def _check_times(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"t: expected a floating-point tensor of times in [0, 1], got {t!r:.80}")
    if t.dim() != 1:
        raise ValueError(f"t: expected shape (batch,), got {tuple(t.shape)}")
    return t.to(torch.float64)


class GammaSchedule(nn.Module):
    """Base class: ``schedule(t)`` returns a :class:`GammaAt` for times ``t`` of shape ``(B,)``
    in [0, 1].  Subclasses implement :meth:`evaluate` on float64 times."""

    def forward(self, t: torch.Tensor) -> GammaAt:
        return self.evaluate(_check_times(t))

    def evaluate(self, t: torch.Tensor) -> GammaAt:  # pragma: no cover - abstract
        raise NotImplementedError

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """γ(t) alone (float64)."""
        return self(t).gamma

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ(0), γ(1)) as float64 scalars (differentiable for learned schedules)."""
        device = next((b.device for b in self.buffers()), None)
        device = device or next((p.device for p in self.parameters()), torch.device("cpu"))
        values = self.gamma(torch.tensor([0.0, 1.0], dtype=torch.float64, device=device))
        return values[0], values[1]

    def grid(self, num_steps: int, device=None) -> torch.Tensor:
        """γ at ``t = i/T`` for i = 0..T, shape ``(T + 1,)`` (float64, no gradient)."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: expected a positive integer T, got {num_steps!r}")
        with torch.no_grad():
            t = torch.arange(num_steps + 1, dtype=torch.float64, device=device) / num_steps
            return self.gamma(t)


def _check_endpoints(gamma_min: float, gamma_max: float) -> tuple[float, float]:
    if not (math.isfinite(gamma_min) and math.isfinite(gamma_max)) or not gamma_min < gamma_max:
        raise ValueError(
            f"gamma_min, gamma_max: expected finite values with gamma_min < gamma_max, got {gamma_min}, {gamma_max}"
        )
    return float(gamma_min), float(gamma_max)


class LinearGamma(GammaSchedule):
    """γ(t) = γ_min + (γ_max − γ_min) t: log-SNR linear in time (VDM's fixed schedule;
    their default for 8-bit images is γ_min = −13.3, γ_max = 5)."""

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0) -> None:
        super().__init__()
        self.gamma_min, self.gamma_max = _check_endpoints(gamma_min, gamma_max)

    def evaluate(self, t):
        width = self.gamma_max - self.gamma_min
        return GammaAt(self.gamma_min + width * t, torch.full_like(t, width))

    def extra_repr(self) -> str:
        return f"gamma_min={self.gamma_min:g}, gamma_max={self.gamma_max:g}"


class CosineGamma(GammaSchedule):
    """γ(t) = 2 log tan θ(t), θ linear in t from atan(e^{γ_min/2}) to atan(e^{γ_max/2}).

    With ᾱ = cos²θ this is Improved DDPM's cosine schedule (θ = (t + s)/(1 + s)·π/2),
    truncated to finite endpoints; γ'(t) = 4 θ' / sin 2θ."""

    def __init__(self, gamma_min: float = -10.0, gamma_max: float = 10.0) -> None:
        super().__init__()
        self.gamma_min, self.gamma_max = _check_endpoints(gamma_min, gamma_max)
        self.theta_min = math.atan(math.exp(self.gamma_min / 2))
        self.theta_max = math.atan(math.exp(self.gamma_max / 2))

    def evaluate(self, t):
        slope = self.theta_max - self.theta_min
        theta = self.theta_min + slope * t
        return GammaAt(2 * torch.log(torch.tan(theta)), 4 * slope / torch.sin(2 * theta))

    def extra_repr(self) -> str:
        return f"gamma_min={self.gamma_min:g}, gamma_max={self.gamma_max:g}"


class TabulatedGamma(GammaSchedule):
    """γ piecewise linear through ``values`` at the grid ``t_k = k/n``, k = 0..n.

    Args:
        values: strictly increasing float tensor of shape ``(n + 1,)``, n ≥ 1.
    """

    values: torch.Tensor

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        values = torch.as_tensor(values, dtype=torch.float64).detach()
        if values.dim() != 1 or values.numel() < 2:
            raise ValueError(
                f"values: expected a 1-D tensor of at least 2 values, got shape {tuple(values.shape)}"
            )
        if not torch.isfinite(values).all() or not (values[1:] > values[:-1]).all():
            raise ValueError("values: expected finite, strictly increasing γ values (noise grows with t)")
        self.register_buffer("values", values)

    @classmethod
    def from_noise_schedule(cls, schedule: NoiseSchedule) -> TabulatedGamma:
        """The core's discrete schedule as a function of time: step ``t = 1..T`` of
        ``schedule`` sits at time ``(t − 1)/(T − 1)`` with ``γ = −schedule.log_snr[t − 1]``.

        So x_1 (the decoder's input) is at time 0, x_T (the prior's) at time 1, and the
        discrete bound with ``T − 1`` steps on this grid has exactly the core's KL terms for
        steps 2..T (with σ_t² = β̃_t, ε-prediction) and the core's prior term."""
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
        if schedule.num_steps < 2:
            raise ValueError(f"schedule: expected T >= 2 steps, got T = {schedule.num_steps}")
        return cls(-schedule.log_snr)

    @property
    def num_intervals(self) -> int:
        return self.values.shape[0] - 1

    def evaluate(self, t):
        n = self.num_intervals
        position = t * n
        index = position.floor().clamp(0, n - 1).long()
        fraction = position - index
        left, right = self.values[index], self.values[index + 1]
        return GammaAt(left + fraction * (right - left), (right - left) * n)

    def extra_repr(self) -> str:
        return f"n={self.num_intervals}, gamma_min={self.values[0].item():.3g}, gamma_max={self.values[-1].item():.3g}"


class LearnedGamma(GammaSchedule):
    r"""VDM's learnable schedule γ(t) = γ_min + (γ_max − γ_min) · ŝ(t).

    The shape ŝ(t) = (g(t) − g(0)) / (g(1) − g(0)) is a monotone network normalized to
    ŝ(0) = 0, ŝ(1) = 1, so γ_min = γ(0) and γ_max = γ(1) are exactly the two endpoint
    parameters.  The network (VDM's ``NoiseSchedule_NNet``) is

        g(t) = a t + Σ_j c_j sigmoid(w_j (a t) + b_j),   a, c_j, w_j > 0 (softplus),

    increasing in t; g'(t) is computed in closed form.  With the hidden weights small at
    initialization the shape starts close to linear.  Parameters are an ``nn.Module``'s, so
    ``pyro.module`` (called by :class:`~pyro_diffusion.vdm.ContinuousDiffusion.register`)
    puts them in Pyro's param store and ``SVI`` trains them with the denoiser.

    Args:
        gamma_min, gamma_max: initial endpoints.
        hidden: number of sigmoid units of the shape network.
        learn_shape: train the shape (else it stays at its initial, near-linear, value).
    """

    def __init__(
        self, gamma_min: float = -10.0, gamma_max: float = 6.0, hidden: int = 1024, learn_shape: bool = True
    ) -> None:
        super().__init__()
        gamma_min, gamma_max = _check_endpoints(gamma_min, gamma_max)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden: expected a positive integer, got {hidden!r}")
        self.gamma_min = nn.Parameter(torch.tensor(gamma_min))
        self.gamma_max = nn.Parameter(torch.tensor(gamma_max))
        inverse_softplus_one = math.log(math.e - 1)
        self.raw_slope = nn.Parameter(torch.tensor(inverse_softplus_one))
        self.raw_in_weight = nn.Parameter(torch.randn(hidden) * 0.1 + math.log(math.expm1(5.0)))
        self.in_bias = nn.Parameter(torch.linspace(-5.0, 0.0, hidden) + 0.1 * torch.randn(hidden))
        self.raw_out_weight = nn.Parameter(torch.full((hidden,), -10.0))
        for name in ("raw_slope", "raw_in_weight", "in_bias", "raw_out_weight"):
            getattr(self, name).requires_grad_(learn_shape)

    def _g(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g(t) and g'(t) for float64 times ``(B,)``."""
        a = F.softplus(self.raw_slope.double())
        w = F.softplus(self.raw_in_weight.double())
        c = F.softplus(self.raw_out_weight.double())
        b = self.in_bias.double()
        h = torch.sigmoid((a * t)[:, None] * w + b)
        g = a * t + h @ c
        dg = a + (h * (1 - h)) @ (c * w) * a
        return g, dg

    def shape(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ŝ(t), ŝ'(t)) for float64 times ``(B,)``."""
        g, dg = self._g(t)
        ends, _ = self._g(torch.tensor([0.0, 1.0], dtype=torch.float64, device=t.device))
        span = ends[1] - ends[0]
        return (g - ends[0]) / span, dg / span

    def evaluate(self, t):
        gamma_min, gamma_max = self.gamma_min.double(), self.gamma_max.double()
        if not bool(gamma_min < gamma_max):
            raise RuntimeError(
                f"LearnedGamma: gamma_min ({gamma_min.item():.4g}) has reached gamma_max "
                f"({gamma_max.item():.4g}); lower the learning rate of the endpoints"
            )
        s, ds = self.shape(t)
        width = gamma_max - gamma_min
        return GammaAt(gamma_min + width * s, width * ds, (s, ds) if self.raw_slope.requires_grad else ())

    def endpoints(self):
        return self.gamma_min.double(), self.gamma_max.double()

    def extra_repr(self) -> str:
        return (
            f"gamma_min={self.gamma_min.item():.4g}, gamma_max={self.gamma_max.item():.4g}, "
            f"hidden={self.in_bias.numel()}"
        )
