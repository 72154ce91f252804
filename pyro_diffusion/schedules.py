r"""Noise schedules: γ(t) = −log SNR(t) on t ∈ [0, 1].

A variance-preserving diffusion at noise level γ is ``z = α x + σ ε`` with

    α² = sigmoid(−γ),   σ² = sigmoid(γ),   SNR = α²/σ² = exp(−γ),

and γ strictly increasing in t (noise grows with t).  Every schedule is an ``nn.Module``
mapping float times ``t`` of shape ``(B,)`` to a :class:`GammaAt`: γ(t), γ'(t) (float64) and
the tensors through which a learned *shape* enters (empty for fixed schedules).

A **grid** of T noise levels ``γ_1 < … < γ_T`` is what a discrete chain lives on: latent
``x_t`` has level ``γ_t`` (t = 1..T, the paper's 1-based steps), ``x_0`` is the data.
:meth:`Schedule.grid` places T levels evenly in time, ``t_k = (k − 1)/(T − 1)``, so the
decoder's input ``x_1`` sits at γ(0) and the prior's ``x_T`` at γ(1) whatever T is.  A
schedule with a native grid (:class:`NoiseSchedule`, tabulated) returns that grid for its own T
and evenly spaced levels *of that grid* for fewer (respacing).

Schedules:

* :class:`NoiseSchedule` — a DDPM β-schedule as γ tabulated on its T steps (γ_t = −log SNR_t,
  ``ᾱ_t = sigmoid(−γ_t)``), piecewise linear between them; ``linear``, ``cosine``,
  ``from_log_snr`` and user βs are constructors.
* :class:`LinearGamma` — γ linear in t (VDM's fixed schedule).
* :class:`CosineGamma` — γ = 2 log tan θ with θ linear in t (Improved DDPM's cosine form
  between finite endpoints).
* :class:`LearnedGamma` — learnable endpoints and a monotone network for the shape (VDM).
* :class:`MultivariateLearnedGamma` — one learned γ_d(t) per data dimension (a diagonal
  forward process, MuLAN-style): per-dimension endpoints and a per-dimension monotone
  piecewise-linear shape; its γ has shape ``(B, *event_shape)``.

:data:`SCHEDULES` maps names to constructors ``(num_steps, **options) -> Schedule``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from pyro.infer.util import is_validation_enabled
from torch import nn
from torch.nn import functional as F

__all__ = [
    "GammaAt",
    "Schedule",
    "NoiseSchedule",
    "LinearGamma",
    "CosineGamma",
    "LearnedGamma",
    "MultivariateLearnedGamma",
    "SCHEDULES",
    "alpha_sigma",
    "check_num_steps",
]


class GammaAt(NamedTuple):
    """γ(t) and γ'(t) (float64, shape ``(B,)``, or ``(B, *event_shape)`` for a per-dimension
    schedule) and the schedule's shape outputs at t."""

    gamma: torch.Tensor
    derivative: torch.Tensor
    shape_outputs: tuple[torch.Tensor, ...] = ()


def alpha_sigma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, σ) = (√sigmoid(−γ), √sigmoid(γ)): α² + σ² = 1 and α²/σ² = exp(−γ)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def check_num_steps(num_steps, argument: str = "num_steps", minimum: int = 1) -> int:
    """``num_steps`` as a positive int, or a ValueError naming ``argument``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < minimum:
        raise ValueError(f"{argument}: expected an integer >= {minimum}, got {num_steps!r}")
    return num_steps


def _check_times(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"t: expected a floating-point tensor of times in [0, 1], got {t!r:.80}")
    if t.dim() != 1:
        raise ValueError(f"t: expected shape (batch,), got {tuple(t.shape)}")
    if is_validation_enabled() and not ((t >= 0) & (t <= 1)).all():
        raise ValueError("t: expected times in [0, 1] (no NaN)")
    return t.to(torch.float64)


def _check_endpoints(gamma_min: float, gamma_max: float) -> tuple[float, float]:
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (gamma_min, gamma_max))
    if not ok or not (math.isfinite(gamma_min) and math.isfinite(gamma_max)) or not gamma_min < gamma_max:
        raise ValueError(
            "gamma_min, gamma_max: expected finite numbers with gamma_min < gamma_max, "
            f"got {gamma_min!r}, {gamma_max!r}"
        )
    return float(gamma_min), float(gamma_max)


class Schedule(nn.Module):
    """Base class: ``schedule(t)`` returns a :class:`GammaAt` for float times ``t`` ``(B,)`` in
    [0, 1].  Subclasses implement :meth:`evaluate` on float64 times and may set
    :attr:`num_steps` (a native grid)."""

    #: the size of the native grid (tabulated schedules), None for functions of time
    num_steps: int | None = None
    #: None for a scalar schedule (one γ(t) for every dimension); the data's event shape for a
    #: per-dimension schedule, whose γ(t) and grids carry it as trailing dimensions
    event_shape: tuple[int, ...] | None = None

    def forward(self, t: torch.Tensor) -> GammaAt:
        return self.evaluate(_check_times(t))

    def evaluate(self, t: torch.Tensor) -> GammaAt:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def is_learned(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def _device(self) -> torch.device:
        for tensor in (*self.buffers(), *self.parameters()):
            return tensor.device
        return torch.device("cpu")

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """γ(t) alone (float64)."""
        return self(t).gamma

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ(0), γ(1)) as float64 scalars (differentiable for learned schedules)."""
        # made on the device (a tensor copied from the host would make the call wait for it)
        values = self.gamma(torch.linspace(0.0, 1.0, 2, dtype=torch.float64, device=self._device()))
        return values[0], values[1]

    def endpoint_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ(0), γ(1)) shaped like the schedule's levels: :meth:`endpoints` for a scalar
        schedule, two ``event_shape`` tensors for a per-dimension one (the decoder's and the
        prior's levels in continuous time)."""
        return self.endpoints()

    def grid_times(self, num_steps: int) -> torch.Tensor:
        """The times of a T-level grid, ``(k − 1)/(T − 1)`` for k = 1..T (T = 1: time 0)."""
        check_num_steps(num_steps)
        if num_steps == 1:
            return torch.zeros(1, dtype=torch.float64, device=self._device())
        return torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64, device=self._device())

    def grid(self, num_steps: int | None = None) -> torch.Tensor:
        """The noise levels γ_1 < … < γ_T of a T-level grid (float64, ``(T,)``, or
        ``(T, *event_shape)`` for a per-dimension schedule; differentiable for learned
        schedules); ``None`` means the native grid."""
        if num_steps is None:
            if self.num_steps is None:
                raise ValueError(
                    f"num_steps: {type(self).__name__} is a function of time with no native grid; "
                    "give the number of noise levels T"
                )
            num_steps = self.num_steps
        return self.gamma(self.grid_times(num_steps))


# ---------------------------------------------------------------------------- tabulated (DDPM)
def _check_betas(betas) -> torch.Tensor:
    if not isinstance(betas, torch.Tensor):
        try:
            betas = torch.as_tensor(betas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"betas: expected a 1-D sequence of floats in (0, 1), got {type(betas).__name__}"
            ) from error
    if not betas.is_floating_point():
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


class NoiseSchedule(Schedule):
    r"""A DDPM schedule: γ tabulated on its T steps, piecewise linear in time between them.

    Step t = 1..T sits at time ``(t − 1)/(T − 1)`` with ``γ_t = −log SNR_t =
    log(1 − ᾱ_t) − log ᾱ_t``.  The DDPM quantities are read off the levels (float64):
    ``alphas_cumprod`` ᾱ_t = sigmoid(−γ_t), ``betas`` β_t = 1 − ᾱ_t/ᾱ_{t−1}, ``posterior_variance``
    β̃_t = β_t (1 − ᾱ_{t−1})/(1 − ᾱ_t), ``log_snr`` = −γ_t.

    Args:
        betas: β_1..β_T, each in the open interval (0, 1).

    Example::

        >>> schedule = NoiseSchedule.linear(1000)
        >>> schedule.grid().shape, schedule.grid(50).shape   # native grid, a respaced one
        (torch.Size([1000]), torch.Size([50]))
    """

    gammas: torch.Tensor

    def __init__(self, betas) -> None:
        super().__init__()
        betas = _check_betas(betas)
        log_alphas_cumprod = torch.cumsum(torch.log1p(-betas), 0)  # log ᾱ_t, accurate for long chains
        # γ = log(1 − ᾱ) − log ᾱ
        gammas = torch.log(-torch.expm1(log_alphas_cumprod)) - log_alphas_cumprod
        if not (gammas[1:] > gammas[:-1]).all():
            raise ValueError(
                "betas: the noise level must grow with t; got a schedule whose ᾱ_t does not fall"
            )
        self.register_buffer("gammas", gammas)
        self.num_steps = betas.shape[0]

    @classmethod
    def from_gammas(cls, gammas) -> NoiseSchedule:
        """The schedule whose levels are the given strictly increasing γ_1..γ_T."""
        gammas = torch.as_tensor(gammas, dtype=torch.float64)
        if gammas.dim() != 1 or gammas.numel() == 0 or not torch.isfinite(gammas).all():
            raise ValueError(
                f"gammas: expected a non-empty 1-D tensor of finite values, got {tuple(gammas.shape)}"
            )
        if not (gammas[1:] > gammas[:-1]).all():
            raise ValueError("gammas: expected strictly increasing values (noise grows with t)")
        log_abar = F.logsigmoid(-gammas)
        prev = torch.cat([log_abar.new_zeros(1), log_abar[:-1]])
        return cls(-torch.expm1(log_abar - prev))

    @classmethod
    def linear(
        cls, num_steps: int, beta_start: float | None = None, beta_end: float | None = None
    ) -> NoiseSchedule:
        """DDPM's linear schedule.  With explicit ``beta_start``/``beta_end``: β linear between
        them over T steps.  By default: DDPM's 1,000-step schedule (β from 1e-4 to 0.02) as a
        function of time, at T evenly spaced levels — the same numbers at T = 1000, and at
        small T the same range of noise levels with larger steps (so that short chains keep
        ᾱ_T ≈ 4·10⁻⁵ and no β_t near 1)."""
        check_num_steps(num_steps)
        if beta_start is None and beta_end is None:
            if num_steps == 1000:
                return cls(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
            reference = cls(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
            return cls.from_gammas(reference.gamma(reference.grid_times(num_steps)))
        scale = 1000.0 / num_steps
        beta_start = min(1e-4 * scale, 0.999) if beta_start is None else beta_start
        beta_end = min(0.02 * scale, 0.999) if beta_end is None else beta_end
        if not (0 < beta_start < 1 and 0 < beta_end < 1):
            raise ValueError(f"beta_start, beta_end: expected both in (0, 1), got {beta_start}, {beta_end}")
        return cls(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_steps: int, offset: float = 0.008, max_beta: float = 0.9) -> NoiseSchedule:
        """Improved DDPM's cosine schedule ``ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)``, β_t clipped
        at ``max_beta``.

        ᾱ(T) = 0, so the last β is always the clipped one.  Improved DDPM clips at 0.999, which
        makes the first reverse step multiply the network's error in ε̂ by
        β_T/√(α_T (1 − ᾱ_T)) ≈ 32 (harmless only when x̂ is clipped to the data's range); the
        default 0.9 keeps that factor at 3, about what a linear schedule's largest step gives
        at T = 10.  Pass ``max_beta=0.999`` for Improved DDPM's numbers."""
        check_num_steps(num_steps)
        if (
            isinstance(offset, bool)
            or not isinstance(offset, (int, float))
            or not (math.isfinite(offset) and offset >= 0)
        ):
            raise ValueError(f"offset: expected a finite number s >= 0, got {offset!r}")
        if not isinstance(max_beta, (int, float)) or not 0 < max_beta < 1:
            raise ValueError(f"max_beta: expected a value in (0, 1), got {max_beta!r}")
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
        return cls((1 - f[1:] / f[:-1]).clamp(max=max_beta))

    @classmethod
    def from_log_snr(cls, log_snr) -> NoiseSchedule:
        """The schedule with ``log SNR_t`` = the given strictly decreasing values, t = 1..T."""
        log_snr = torch.as_tensor(log_snr, dtype=torch.float64)
        if log_snr.dim() != 1 or log_snr.numel() == 0:
            raise ValueError(f"log_snr: expected a non-empty 1-D tensor, got shape {tuple(log_snr.shape)}")
        if not (log_snr[1:] < log_snr[:-1]).all():
            raise ValueError("log_snr: expected strictly decreasing values (noise grows with t)")
        return cls.from_gammas(-log_snr)

    # -- the DDPM quantities, read off the levels
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.sigmoid(-self.gammas)

    @property
    def log_snr(self) -> torch.Tensor:
        return -self.gammas

    @property
    def betas(self) -> torch.Tensor:
        log_abar = F.logsigmoid(-self.gammas)
        prev = torch.cat([log_abar.new_zeros(1), log_abar[:-1]])
        return -torch.expm1(log_abar - prev)

    @property
    def posterior_variance(self) -> torch.Tensor:
        """β̃_t = β_t (1 − ᾱ_{t−1})/(1 − ᾱ_t), β̃_1 = 0."""
        one_minus = torch.sigmoid(self.gammas)
        prev = torch.cat([one_minus.new_zeros(1), one_minus[:-1]])
        return self.betas * prev / one_minus

    # -- as a function of time
    def evaluate(self, t):
        n = self.num_steps - 1
        if n == 0:
            return GammaAt(self.gammas[0].expand(t.shape), torch.zeros_like(t))
        position = t * n
        index = position.floor().clamp(0, n - 1).long()
        fraction = position - index
        left, right = self.gammas[index], self.gammas[index + 1]
        return GammaAt(left + fraction * (right - left), (right - left) * n)

    def grid(self, num_steps: int | None = None) -> torch.Tensor:
        """The native levels for ``None`` or T; for fewer levels, evenly spaced native levels
        that keep the first and the last (respacing: a sub-grid of the model's own steps)."""
        if num_steps is None or num_steps == self.num_steps:
            return self.gammas
        check_num_steps(num_steps)
        if num_steps > self.num_steps:
            return super().grid(num_steps)
        return self.gammas[self.subgrid_steps(num_steps) - 1]

    def subgrid_steps(self, num_steps: int) -> torch.Tensor:
        """The 1-based native steps of a K-level sub-grid, evenly spaced, first and last kept
        (on the levels' device)."""
        check_num_steps(num_steps)
        if num_steps > self.num_steps:
            raise ValueError(
                f"num_steps: a sub-grid has at most T = {self.num_steps} levels, got {num_steps}"
            )
        device = self.gammas.device
        if num_steps == 1:
            return torch.ones(1, dtype=torch.long, device=device)
        return torch.round(
            torch.linspace(1, self.num_steps, num_steps, dtype=torch.float64, device=device)
        ).long()

    def extra_repr(self) -> str:
        b = self.betas
        return f"T={self.num_steps}, beta_1={b[0].item():.3g}, beta_T={b[-1].item():.3g}"


# ---------------------------------------------------------------------------- functions of time
class LinearGamma(Schedule):
    """γ(t) = γ_min + (γ_max − γ_min) t: log-SNR linear in time (VDM's fixed schedule; their
    default for 8-bit images is γ_min = −13.3, γ_max = 5)."""

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0) -> None:
        super().__init__()
        self.gamma_min, self.gamma_max = _check_endpoints(gamma_min, gamma_max)

    def evaluate(self, t):
        width = self.gamma_max - self.gamma_min
        return GammaAt(self.gamma_min + width * t, torch.full_like(t, width))

    def extra_repr(self) -> str:
        return f"gamma_min={self.gamma_min:g}, gamma_max={self.gamma_max:g}"


class CosineGamma(Schedule):
    """γ(t) = 2 log tan θ(t), θ linear in t from atan(e^{γ_min/2}) to atan(e^{γ_max/2}).

    With ᾱ = cos²θ this is Improved DDPM's cosine schedule truncated to finite endpoints;
    γ'(t) = 4 θ' / sin 2θ."""

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


class LearnedGamma(Schedule):
    r"""VDM's learnable schedule γ(t) = γ_min + (γ_max − γ_min) · ŝ(t).

    The shape ŝ(t) = (g(t) − g(0)) / (g(1) − g(0)) is a monotone network normalized to
    ŝ(0) = 0, ŝ(1) = 1, so γ_min = γ(0) and γ_max = γ(1) are exactly the two endpoint
    parameters.  The network (VDM's ``NoiseSchedule_NNet``) is

        g(t) = a t + Σ_j c_j sigmoid(w_j (a t) + b_j),   a, c_j, w_j > 0 (softplus),

    increasing in t, with g'(t) in closed form.  The hidden weights start small, so the shape
    starts close to linear.

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
        check_num_steps(hidden, "hidden")
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
        a = F.softplus(self.raw_slope.double())
        w = F.softplus(self.raw_in_weight.double())
        c = F.softplus(self.raw_out_weight.double())
        b = self.in_bias.double()
        h = torch.sigmoid((a * t)[:, None] * w + b)
        return a * t + h @ c, a + (h * (1 - h)) @ (c * w) * a

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


class MultivariateLearnedGamma(Schedule):
    r"""A learned noise level per data dimension: γ_d(t) = γ_min,d + (γ_max,d − γ_min,d) · ŝ_d(t).

    The forward process becomes a diagonal Gaussian whose every coordinate has its own
    schedule (the forward process as a learned approximate posterior, as in MuLAN; here not
    conditioned on the data).  Each dimension d has its own endpoints ``gamma_min[d] = γ_d(0)``
    and ``gamma_max[d] = γ_d(1)`` and its own monotone shape ŝ_d, piecewise linear on ``bins``
    equal bins of [0, 1] with slopes ∝ exp(r_{d,k}):

        ŝ_d(t) = (C_{d,k} + (t − k/K) w_{d,k}) / C_{d,K},   w = exp(r),  C_{d,k} = Σ_{j<k} w_{d,j}/K,

    for t in bin k, so ŝ_d(0) = 0, ŝ_d(1) = 1, ŝ_d' = w_{d,k}/C_{d,K} > 0 (every γ_d strictly
    increasing whenever γ_max,d > γ_min,d), with γ_d'(t) in closed form.  With r = 0 and
    equal endpoints (the initial state) it is :class:`LinearGamma` ``(gamma_min, gamma_max)``
    exactly, in every dimension.

    ``schedule(t)`` for times ``(B,)`` returns γ and γ' of shape ``(B, *event_shape)``;
    ``grid(T)`` is ``(T, *event_shape)``, ``endpoint_levels()`` two ``event_shape`` tensors and
    ``endpoints()`` their means over the dimensions (scalars, as for every schedule).  It
    has no shape outputs: unlike a scalar schedule's, the continuous-time bound of a
    per-dimension schedule depends on its shape (``docs/derivation.md``), so the shape is
    trained by the bound's own gradient.

    Args:
        event_shape: the shape of one datum, e.g. ``(2,)`` or ``(1, 8, 8)``.
        gamma_min, gamma_max: initial endpoints (the same for every dimension).
        bins: number of linear pieces K of each dimension's shape.
        learn_shape: train the shapes (else each stays linear and only the endpoints learn).
        learn_endpoints: train the per-dimension endpoints.
    """

    def __init__(
        self,
        event_shape,
        gamma_min: float = -10.0,
        gamma_max: float = 6.0,
        bins: int = 16,
        learn_shape: bool = True,
        learn_endpoints: bool = True,
    ) -> None:
        super().__init__()
        try:
            shape = tuple(int(d) for d in ((event_shape,) if isinstance(event_shape, int) else event_shape))
        except (TypeError, ValueError) as error:
            raise TypeError(f"event_shape: expected a tuple of ints, got {event_shape!r}") from error
        if not shape or any(d < 1 for d in shape):
            raise ValueError(
                f"event_shape: expected a non-empty shape of positive sizes, got {event_shape!r}"
            )
        gamma_min, gamma_max = _check_endpoints(gamma_min, gamma_max)
        check_num_steps(bins, "bins")
        self.event_shape = shape
        self.initial_endpoints = (gamma_min, gamma_max)
        self.gamma_min = nn.Parameter(torch.full(shape, gamma_min, dtype=torch.float64))
        self.gamma_max = nn.Parameter(torch.full(shape, gamma_max, dtype=torch.float64))
        self.log_slopes = nn.Parameter(torch.zeros((*shape, bins), dtype=torch.float64))
        self.gamma_min.requires_grad_(learn_endpoints)
        self.gamma_max.requires_grad_(learn_endpoints)
        self.log_slopes.requires_grad_(learn_shape)

    @property
    def bins(self) -> int:
        return self.log_slopes.shape[-1]

    def shape(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ŝ(t), ŝ'(t)), each ``(B, *event_shape)``, for float64 times ``(B,)``."""
        K = self.bins
        w = torch.exp(self.log_slopes.double())  # (*E, K)
        cumulative = torch.cumsum(w, -1) / K  # C_{d,k+1}
        total = cumulative[..., -1:]  # C_{d,K}
        below = torch.cat([torch.zeros_like(total), cumulative[..., :-1]], -1)  # C_{d,k}
        k = torch.clamp((t * K).floor(), 0, K - 1)
        index = k.long()
        w_k = w[..., index].movedim(-1, 0)  # (B, *E)
        below_k = below[..., index].movedim(-1, 0)
        start = (k / K).reshape((-1,) + (1,) * len(self.event_shape))
        t = t.reshape(start.shape)
        # C_k − (k/K) w_k + t w_k: exactly t when every w is 1
        s = (below_k - start * w_k + t * w_k) / total[..., 0]
        return s, w_k / total[..., 0]

    def evaluate(self, t):
        gamma_min, gamma_max = self.gamma_min.double(), self.gamma_max.double()
        width = gamma_max - gamma_min
        if not bool((width > 0).all()):
            raise RuntimeError(
                "MultivariateLearnedGamma: gamma_min has reached gamma_max in some dimension "
                f"(smallest width {width.min().item():.4g}); lower the learning rate of the endpoints"
            )
        s, ds = self.shape(t)
        return GammaAt(gamma_min + width * s, width * ds)

    def endpoints(self):
        """(γ̄(0), γ̄(1)): the means over the dimensions (scalars, the levels the network sees at
        the two ends); :meth:`endpoint_levels` gives the per-dimension ones."""
        low, high = self.endpoint_levels()
        return low.mean(), high.mean()

    def endpoint_levels(self):
        values = self.gamma(torch.linspace(0.0, 1.0, 2, dtype=torch.float64, device=self._device()))
        return values[0], values[1]

    def extra_repr(self) -> str:
        return (
            f"event_shape={self.event_shape}, gamma_min ∈ [{self.gamma_min.min().item():.4g}, "
            f"{self.gamma_min.max().item():.4g}], gamma_max ∈ [{self.gamma_max.min().item():.4g}, "
            f"{self.gamma_max.max().item():.4g}], bins={self.bins}"
        )


# ---------------------------------------------------------------------------- registry
def _linear(num_steps: int, beta_start: float | None = None, beta_end: float | None = None, **_) -> Schedule:
    return NoiseSchedule.linear(num_steps, beta_start, beta_end)


def _cosine(num_steps: int, max_beta: float = 0.9, **_) -> Schedule:
    return NoiseSchedule.cosine(num_steps, max_beta=max_beta)


def _log_snr(num_steps: int, log_snr_max: float = 7.0, log_snr_min: float = -9.0, **_) -> Schedule:
    """log SNR linear in t from ``log_snr_max`` (t = 1) to ``log_snr_min`` (t = T)."""
    if not log_snr_max > log_snr_min:
        raise ValueError(f"log_snr_max, log_snr_min: expected max > min, got {log_snr_max}, {log_snr_min}")
    return NoiseSchedule.from_log_snr(
        torch.linspace(log_snr_max, log_snr_min, num_steps, dtype=torch.float64)
    )


def _gamma_linear(num_steps: int, gamma_min: float = -13.3, gamma_max: float = 5.0, **_) -> Schedule:
    return LinearGamma(gamma_min, gamma_max)


def _gamma_cosine(num_steps: int, gamma_min: float = -10.0, gamma_max: float = 10.0, **_) -> Schedule:
    return CosineGamma(gamma_min, gamma_max)


def _learned(
    num_steps: int,
    gamma_min: float = -10.0,
    gamma_max: float = 6.0,
    learn_shape: bool = True,
    hidden: int = 1024,
    **_,
) -> Schedule:
    return LearnedGamma(gamma_min, gamma_max, hidden=hidden, learn_shape=learn_shape)


def _learned_multivariate(
    num_steps: int,
    event_shape=None,
    gamma_min: float = -10.0,
    gamma_max: float = 6.0,
    learn_shape: bool = True,
    hidden: int = 16,
    **_,
) -> Schedule:
    """:class:`MultivariateLearnedGamma` on ``event_shape`` (required); ``hidden``: its bins."""
    if event_shape is None:
        raise ValueError("event_shape: the 'learned-multivariate' schedule needs the data's event shape")
    return MultivariateLearnedGamma(event_shape, gamma_min, gamma_max, bins=hidden, learn_shape=learn_shape)


#: name → ``(num_steps, **options) -> Schedule``; options a constructor does not use are ignored
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "linear": _linear,
    "cosine": _cosine,
    "log-snr": _log_snr,
    "gamma-linear": _gamma_linear,
    "gamma-cosine": _gamma_cosine,
    "learned": _learned,
    "learned-multivariate": _learned_multivariate,
}
