r"""``Diffusion``: one diffusion model on a grid of noise levels, and the Pyro model and guide
it defines.

A diffusion is a denoiser network, a :mod:`schedule <pyro_diffusion.schedules>` of noise levels
γ = −log SNR, a mean parameterization and a reverse variance
(:mod:`~pyro_diffusion.parameterization`), and a decoder p(x_0 | x_1)
(:mod:`~pyro_diffusion.decoders`).  Everything is written through γ: the forward marginal
q(z | x) = N(α x, σ² I), the posterior q(z_s | z_t, x) and the reverse step p_θ(z_s | z_t) of a
step from γ_t down to γ_s.  A DDPM is the case of a tabulated schedule on its T steps; a
continuous-time model (VDM) is a schedule that is a function of time, evaluated on any grid or
in the limit T → ∞.  The number of steps is a choice of the estimator and of the sampler
(``num_steps``), not of the model: ``None`` is the model's own grid, an integer T a T-level
grid (for a tabulated schedule, evenly spaced levels of its own: respacing), ``0`` continuous
time.

**The network** is called as ``denoiser(z, level)`` with ``z`` of shape ``(B, *event_shape)``
and ``level`` a float tensor ``(B,)``: the noise level γ (or, with ``anchor``, γ − γ(0) + anchor).
It returns ``(B, *event_shape)`` — ε̂, x̂ or v̂ as ``mean`` says — or, for
``variance="learned"``, twice as many entries along dim 1 (the mean part first, then the
interpolation in [−1, 1]).  A network written for integer DDPM steps goes in through
:class:`~pyro_diffusion.nets.StepIndexed`.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from . import chains
from .baselines import PixelCategorical
from .decoders import DECODERS, DiscretizedGaussian, LevelWeightedGaussian
from .parameterization import (
    MEANS,
    VARIANCES,
    Prediction,
    alpha_sigma_log,
    broadcast,
    posterior_mean,
    predict,
    predict_from_mean,
    reverse_log_variance,
    step_coefficients,
)
from .schedules import NoiseSchedule, Schedule, check_num_steps

__all__ = ["Diffusion", "GaussianDiffusion", "check_event_shape", "check_batch"]

#: the default grid size for schedules without a native grid
DEFAULT_NUM_STEPS = 1000

#: the largest |x| accepted as data (with Pyro's validation on); diffusions expect data on the
#: scale of the unit-variance noise
MAX_ABS_VALUE = 1e6


def check_event_shape(event_shape) -> torch.Size:
    """``event_shape`` as a ``torch.Size``: non-empty, every size positive."""
    try:
        event_shape = torch.Size(event_shape)
    except TypeError as error:
        raise TypeError(f"event_shape: expected a tuple of ints, got {event_shape!r}") from error
    if len(event_shape) == 0 or any(d < 1 for d in event_shape):
        raise ValueError(
            f"event_shape: expected a non-empty shape of positive sizes, got {tuple(event_shape)}"
        )
    return event_shape


def check_batch(x0, event_shape: torch.Size, device=None, argument: str = "x0") -> torch.Tensor:
    """Refuse ``x0`` unless it is a float tensor of shape ``(B, *event_shape)`` (on ``device``
    when given); with Pyro's validation on (the default) also refuse NaN or infinite values."""
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"{argument}: expected a torch.Tensor, got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise TypeError(f"{argument}: expected a floating-point tensor, got dtype {x0.dtype}")
    if x0.dim() != len(event_shape) + 1 or x0.shape[1:] != event_shape:
        raise ValueError(
            f"{argument}: expected shape (batch, {', '.join(map(str, event_shape))}) "
            f"for event_shape {tuple(event_shape)}, got {tuple(x0.shape)}"
        )
    if x0.shape[0] == 0:
        raise ValueError(
            f"{argument}: expected at least one datum, got an empty batch of shape {tuple(x0.shape)}"
        )
    if device is not None and x0.device != device:
        raise ValueError(
            f"{argument}: is on {x0.device} but the diffusion is on {device}; move one with .to(device)"
        )
    if is_validation_enabled():
        if not torch.isfinite(x0).all():
            raise ValueError(f"{argument}: contains NaN or infinite values")
        if x0.abs().max() > MAX_ABS_VALUE:
            raise ValueError(
                f"{argument}: values up to {x0.abs().max().item():.3g}; expected data on a moderate scale "
                f"(|x| <= {MAX_ABS_VALUE:g}; scale it, e.g. to [-1, 1])"
            )
    return x0


class Diffusion(nn.Module):
    r"""A diffusion model p_θ(x_{0:T}) with its forward chain q(x_{1:T} | x_0), on noise levels.

    The reverse chain is the Pyro model :meth:`model` (sites ``x_T … x_1`` latent, ``x_0``
    observed) and the forward chain the Pyro guide :meth:`guide` over the same sites; with
    :class:`pyro.infer.TraceMeanField_ELBO` they give the bound term by term:

    .. math::

        −\mathrm{ELBO}(x_0) = −\mathbb E_q \log p_θ(x_0|x_1) + \mathrm{KL}(q(x_T|x_0)\|p(x_T))
            + \sum_{t=2}^T \mathbb E_q \mathrm{KL}(q(x_{t-1}|x_t,x_0)\|p_θ(x_{t-1}|x_t)).

    Given ``steps=`` (a :class:`~pyro_diffusion.chains.StepDraw`) both programs emit one step
    per datum instead: the one-network-call estimator that :class:`~pyro_diffusion.losses.DiffusionELBO`
    trains with (see :mod:`~pyro_diffusion.chains`).

    Args:
        denoiser: the network, ``denoiser(z, level)`` (module docstring).
        schedule: a :class:`~pyro_diffusion.schedules.Schedule` (its parameters, if any, are
            trained with the denoiser).
        event_shape: shape of one datum, e.g. ``(2,)`` or ``(1, 8, 8)``.
        mean: ``"eps"`` (default), ``"x0"``, ``"v"`` or ``"mu"``.
        variance: ``"small"`` (default: the posterior's, β̃), ``"large"`` (β) or ``"learned"``.
        decoder: p(x_0 | x_1) at the first level γ_1: ``"plain"`` (default, VDM's: centred at
            z_1/α_1 with scale σ_1/α_1, no network), ``"network"`` (centred at the network's
            x̂(z_1) with scale σ_1/α_1 · e^s, s a learned scalar) or ``"ddpm"`` (centred at x̂
            with DDPM's variance β̃_2 of the model's own grid; for ``variance="learned"`` the
            interpolation between β_1 and β̃_2).
        num_levels: K for K-level data in [−1, 1] (a discretized decoder: 256 for 8-bit
            images, 17 for scikit-learn's digits); None (default) for a Gaussian decoder.
        level_prior: with ``num_levels``: reweight the discretized decoder's K bin masses by
            learned logits, one row of K per dimension
            (:class:`~pyro_diffusion.decoders.LevelWeightedGaussian`; zero at start, so the
            decoder starts as the plain discretized one).  It learns which levels the data take
            and how often, which the Gaussian cannot (8-bit data that use few levels).
        num_steps: the model's own grid size T (default: the schedule's native grid, else 1000).
        guide_order: default order of :meth:`guide`, ``"posterior"`` or ``"forward"``.
        name: the name of the parameters in Pyro's param store and the prefix of the plate
            name; give two diffusions in one program different names.
        anchor: None (default): the network sees γ.  A float a: it sees γ − γ(0) + a, the noise
            level measured from the schedule's own γ_min, so that with a learned γ_min the
            network's input at the data end stays at a.
        autocast_dtype: run the network under ``torch.autocast`` in this dtype (e.g.
            ``torch.bfloat16``); its output is cast back, so the bound's arithmetic stays in
            the data's dtype.

    Example::

        >>> diffusion = Diffusion(MLPDenoiser(2), LinearGamma(-10, 8), (2,), num_steps=100)
        >>> svi = SVI(diffusion.model, diffusion.guide, Adam({"lr": 1e-3}), DiffusionELBO())
        >>> svi.step(x0)  # x0 of shape (B, 2)
    """

    def __init__(
        self,
        denoiser: nn.Module,
        schedule: Schedule,
        event_shape: tuple[int, ...] | torch.Size,
        *,
        mean: str = "eps",
        variance: str = "small",
        decoder: str = "plain",
        num_levels: int | None = None,
        level_prior: bool = False,
        num_steps: int | None = None,
        guide_order: str = "posterior",
        name: str = "diffusion",
        anchor: float | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(denoiser, nn.Module):
            raise TypeError(f"denoiser: expected an nn.Module, got {type(denoiser).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(
                f"schedule: expected a Schedule (pyro_diffusion.schedules), got {type(schedule).__name__}"
            )
        event_shape = check_event_shape(event_shape)
        if mean not in MEANS:
            raise ValueError(f"mean: expected one of {MEANS}, got {mean!r}")
        if variance not in VARIANCES:
            raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder: expected one of {DECODERS}, got {decoder!r}")
        if num_levels is not None and (
            isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2
        ):
            raise ValueError(f"num_levels: expected None or an integer K >= 2, got {num_levels!r}")
        if not isinstance(level_prior, bool):
            raise ValueError(f"level_prior: expected True or False, got {level_prior!r}")
        if level_prior and num_levels is None:
            raise ValueError("level_prior: needs K-level data (num_levels), got num_levels=None")
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"name: expected a non-empty string (the param store's and the plate's prefix), got {name!r}"
            )
        if guide_order not in chains.GUIDE_ORDERS:
            raise ValueError(f"guide_order: expected one of {chains.GUIDE_ORDERS}, got {guide_order!r}")
        if anchor is not None and (
            isinstance(anchor, bool) or not isinstance(anchor, (int, float)) or not math.isfinite(anchor)
        ):
            raise ValueError(f"anchor: expected None or a finite float, got {anchor!r}")
        if autocast_dtype is not None and autocast_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast_dtype: expected None, torch.bfloat16 or torch.float16, got {autocast_dtype!r}"
            )
        if num_steps is None:
            num_steps = schedule.num_steps or DEFAULT_NUM_STEPS
        check_num_steps(num_steps)
        schedule_shape = getattr(schedule, "event_shape", None)
        if schedule_shape is not None and tuple(schedule_shape) != tuple(event_shape):
            raise ValueError(
                f"schedule: a per-dimension schedule for event shape {tuple(schedule_shape)}, "
                f"but event_shape is {tuple(event_shape)}"
            )
        self.denoiser = denoiser
        self.schedule = schedule
        self.event_shape = event_shape
        self.mean = mean
        self.variance = variance
        self.decoder = decoder
        self.num_levels = num_levels
        self.num_steps = num_steps
        self.guide_order = guide_order
        self.name = name
        self.anchor = None if anchor is None else float(anchor)
        self.autocast_dtype = autocast_dtype
        if decoder == "network":
            self.decoder_log_scale = nn.Parameter(torch.zeros(()))
        self.level_prior = level_prior
        if level_prior:
            self.decoder_level_logits = nn.Parameter(torch.zeros(*event_shape, num_levels))

    # ------------------------------------------------------------------ configuration
    @property
    def event_dims(self) -> int:
        return len(self.event_shape)

    @property
    def event_size(self) -> int:
        """D, the number of dimensions of one datum (for bits per dimension)."""
        return math.prod(self.event_shape)

    @property
    def plate_name(self) -> str:
        return f"{self.name}.data"

    @property
    def device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def decoder_uses_network(self) -> bool:
        return self.decoder != "plain"

    @torch.no_grad()
    def init_level_prior(self, x0: torch.Tensor, alpha: float = 0.1) -> None:
        """Start the level prior's logits at the log level frequencies of each dimension in
        ``x0`` (training data), with ``alpha · K`` pseudo-counts spread by the pooled
        frequencies of all dimensions (a level no datum takes keeps a 1e-3 share of one; the
        per-pixel categorical baseline's pooled prior, :class:`~pyro_diffusion.baselines.PixelCategorical`):
        the decoder then starts knowing which of the K levels the data use, instead of
        learning it one optimizer step at a time.  Training calls it for a new run."""
        if not self.level_prior:
            raise ValueError("x0: init_level_prior needs a diffusion with level_prior=True")
        self.check_data(x0)
        table = PixelCategorical(self.num_levels, alpha, prior="pooled").fit(x0).log_probs  # (D, K)
        logits = table.reshape(*self.event_shape, self.num_levels)
        self.decoder_level_logits.copy_(logits.to(self.decoder_level_logits))

    def grid(self, num_steps: int | None = None) -> torch.Tensor:
        """γ_1 < … < γ_T of the grid ``num_steps`` (None: the model's own), float64."""
        if num_steps is None:
            num_steps = self.num_steps
        check_num_steps(num_steps)
        return self.schedule.grid(num_steps)

    def config(self) -> dict:
        """A JSON-able description of the configuration (not the weights)."""
        return {
            "num_steps": self.num_steps,
            "event_shape": list(self.event_shape),
            "mean": self.mean,
            "variance": self.variance,
            "decoder": self.decoder,
            "num_levels": self.num_levels,
            "level_prior": self.level_prior,
            "schedule": type(self.schedule).__name__,
            "denoiser": type(self.denoiser).__name__,
        }

    # ------------------------------------------------------------------ validation
    def check_data(self, x0: torch.Tensor, argument: str = "x0") -> torch.Tensor:
        """Refuse data that is not a float tensor of shape ``(B, *event_shape)`` on the model's
        device (and, with Pyro's validation on, data containing NaN/inf)."""
        return check_batch(x0, self.event_shape, self.device, argument)

    def _check_num_steps(self, num_steps, allow_continuous: bool) -> int:
        if num_steps is None:
            return self.num_steps
        if allow_continuous and num_steps == 0 and not isinstance(num_steps, bool):
            return 0
        return check_num_steps(num_steps)

    @property
    def per_dimension(self) -> bool:
        """Whether the schedule gives every dimension its own noise level (γ of shape
        ``(*batch, *event_shape)``)."""
        return getattr(self.schedule, "event_shape", None) is not None

    def levels(self, gamma, like: torch.Tensor) -> torch.Tensor:
        """Noise levels as a float64 tensor that broadcasts against ``like`` ``(*batch,
        *event_shape)`` through :func:`~pyro_diffusion.parameterization.broadcast`: a scalar
        stays a scalar, per-datum levels ``(*batch,)`` keep their shape; for a per-dimension
        schedule, levels whose trailing dimensions are the event shape (``(*event_shape)`` or
        ``(*batch, *event_shape)``) get leading 1s up to ``like``'s dimensions (so with
        ``event_shape == (B,)`` a tensor ``(B,)`` is read as per-dimension)."""
        gamma = _levels(gamma, like, self.event_dims)
        if not self.per_dimension or gamma.dim() < self.event_dims or gamma.dim() == like.dim():
            return gamma
        if tuple(gamma.shape[gamma.dim() - self.event_dims :]) != tuple(self.event_shape):
            return gamma
        return gamma.reshape((1,) * (like.dim() - gamma.dim()) + tuple(gamma.shape))

    def _reduce_level(self, gamma: torch.Tensor) -> torch.Tensor:
        """A per-dimension γ ``(*batch, *event_shape)`` as one level per datum: the mean over
        the dimensions (increasing in t, as every γ_d is); other levels unchanged."""
        if not self.per_dimension or gamma.dim() < self.event_dims:
            return gamma
        if tuple(gamma.shape[gamma.dim() - self.event_dims :]) != tuple(self.event_shape):
            return gamma
        return gamma.mean(tuple(range(gamma.dim() - self.event_dims, gamma.dim())))

    # ------------------------------------------------------------------ the network
    def network_level(self, gamma: torch.Tensor) -> torch.Tensor:
        """The noise level the network sees: γ, or γ − γ(0) + anchor.  For a per-dimension
        schedule, the mean of γ_d over the dimensions (and of γ_d(0) for the anchor)."""
        gamma = self._reduce_level(gamma)
        if self.anchor is None:
            return gamma
        gamma0, _ = self.schedule.endpoints()
        return gamma - self._reduce_level(gamma0).to(gamma.dtype) + self.anchor

    def denoise(self, z: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the network at ``z`` ``(*batch, *event_shape)`` and levels ``gamma`` (a scalar or
        ``(*batch,)``); returns (mean output, variance output or None), both z's shape."""
        lead = z.shape[: z.dim() - self.event_dims]
        if tuple(z.shape[z.dim() - self.event_dims :]) != tuple(self.event_shape):
            raise ValueError(f"z: expected trailing shape {tuple(self.event_shape)}, got {tuple(z.shape)}")
        flat = z.reshape(-1, *self.event_shape)
        level = self.network_level(gamma.to(torch.float64)).expand(lead).reshape(-1).to(z.dtype)
        if self.autocast_dtype is None:
            output = self.denoiser(flat, level)
        else:
            with torch.autocast(flat.device.type, dtype=self.autocast_dtype):
                output = self.denoiser(flat, level)
            output = output.to(z.dtype)
        channels = self.event_shape[0] * (2 if self.variance == "learned" else 1)
        expected = (flat.shape[0], channels, *self.event_shape[1:])
        if tuple(output.shape) != expected:
            raise ValueError(
                f"denoiser: returned shape {tuple(output.shape)}, expected {expected}"
                + (
                    " (mean and variance stacked on dim 1 for variance='learned')"
                    if self.variance == "learned"
                    else ""
                )
            )
        if self.variance == "learned":
            mean_part, variance_part = output.chunk(2, dim=1)
            return mean_part.reshape(z.shape), variance_part.reshape(z.shape)
        return output.reshape(z.shape), None

    def predict(
        self, z: torch.Tensor, gamma: torch.Tensor, gamma_s: torch.Tensor | None = None
    ) -> tuple[Prediction, torch.Tensor | None]:
        """The network's (x̂, ε̂) at ``z`` and level ``gamma`` (``gamma_s``: the lower level, needed
        for ``mean="mu"``), and its variance output (or None)."""
        output, variance_output = self.denoise(z, gamma)
        gamma = self.levels(gamma, z)
        if self.mean == "mu":
            if gamma_s is None:
                raise ValueError(
                    "mean: 'mu' predicts the mean of one discrete step; it has no continuous-time form"
                )
            return predict_from_mean(output, z, self.levels(gamma_s, z), gamma), variance_output
        return predict(self.mean, output, z, gamma), variance_output

    # ------------------------------------------------------------------ the distributions
    def marginal(self, x0: torch.Tensor, gamma: torch.Tensor) -> chains.ForwardMarginal:
        """q(z | x_0) = N(α x_0, σ² I) at level ``gamma`` (scalar or per datum), batch-shaped."""
        log_a2, log_s2 = alpha_sigma_log(self.levels(gamma, x0).to(torch.float64))
        alpha = broadcast(torch.exp(0.5 * log_a2), x0)
        sigma = broadcast(torch.exp(0.5 * log_s2), x0)
        log_variance = (
            log_s2
            if log_s2.dim() in (0, x0.dim())  # a scalar, or per-dimension levels shaped like x0
            else log_s2.reshape(log_s2.shape + (1,) * self.event_dims)
        )
        return chains.ForwardMarginal(alpha * x0, sigma.expand_as(x0), log_variance)

    def noise_of(self, x0: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """ε = (z − α x_0)/σ, the noise that takes x_0 to z at level ``gamma``."""
        log_a2, log_s2 = alpha_sigma_log(self.levels(gamma, z).to(torch.float64))
        return (z - broadcast(torch.exp(0.5 * log_a2), z) * x0) / broadcast(torch.exp(0.5 * log_s2), z)

    def forward_step(
        self, x0, z_t, gamma_s, gamma_t, eps: torch.Tensor | None = None, coefficients=None
    ) -> chains.ForwardStep:
        """q(z_s | z_t, x_0), batch-shaped, for levels γ_s < γ_t (scalars or per datum);
        ``coefficients``: the step's :func:`~pyro_diffusion.parameterization.step_coefficients`
        when already computed."""
        gamma_s, gamma_t = self.levels(gamma_s, z_t), self.levels(gamma_t, z_t)
        coef = coefficients if coefficients is not None else step_coefficients(gamma_s, gamma_t, z_t)
        if eps is None:
            eps = self.noise_of(x0, z_t, gamma_t)
        scale = torch.exp(0.5 * coef.log_small).expand_as(z_t)
        return chains.ForwardStep(posterior_mean(coef, x0, z_t), scale, eps, coef)

    def forward_transition(self, z_prev, gamma_prev, gamma_t) -> chains.ForwardTransition:
        """q(z_t | z_prev) = N(α_t/α_prev · z_prev, c σ_t²), the forward-order kernel."""
        gamma_prev, gamma_t = (
            self.levels(gamma_prev, z_prev),
            self.levels(gamma_t, z_prev),
        )
        coef = step_coefficients(gamma_prev, gamma_t, z_prev)
        log_a2_p, _ = alpha_sigma_log(gamma_prev.to(torch.float64))
        log_a2_t, _ = alpha_sigma_log(gamma_t.to(torch.float64))
        ratio = broadcast(torch.exp(0.5 * (log_a2_t - log_a2_p)), z_prev)
        return chains.ForwardTransition(ratio * z_prev, torch.exp(0.5 * coef.log_large).expand_as(z_prev))

    def reverse_step(
        self,
        z_t: torch.Tensor,
        gamma_s: torch.Tensor,
        gamma_t: torch.Tensor,
        *,
        prediction: tuple[Prediction, torch.Tensor | None] | None = None,
        detach_mean: bool = False,
        coefficients=None,
    ) -> tuple[chains.ReverseStep, tuple[Prediction, torch.Tensor | None]]:
        """p_θ(z_s | z_t) (batch-shaped, z_t's shape) and the network's (prediction, variance
        output) at z_t, for z_t of any leading shape and levels γ_s < γ_t (scalars or per datum);
        ``coefficients`` as in :meth:`forward_step`."""
        if prediction is None:
            prediction = self.predict(z_t, gamma_t, gamma_s)
        estimate, variance_output = prediction
        gamma_s, gamma_t = self.levels(gamma_s, z_t), self.levels(gamma_t, z_t)
        coef = coefficients if coefficients is not None else step_coefficients(gamma_s, gamma_t, z_t)
        x0_hat, eps_hat = estimate
        if detach_mean:
            x0_hat, eps_hat = x0_hat.detach(), eps_hat.detach()
        log_var = reverse_log_variance(self.variance, coef, variance_output)
        scale = torch.exp(0.5 * log_var).expand_as(z_t)
        step = chains.ReverseStep(
            posterior_mean(coef, x0_hat, z_t), scale, eps_hat, log_var, self.variance == "small"
        )
        return step, prediction

    def decoder_distribution(
        self,
        z_1: torch.Tensor,
        gamma_1: torch.Tensor,
        prediction: Prediction | None = None,
        variance_output: torch.Tensor | None = None,
        *,
        detach_mean: bool = False,
    ):
        """p(x_0 | z_1) at the first level ``gamma_1`` (batch-shaped, z_1's shape): Gaussian, or
        discretized to K levels; its location and scale as ``decoder`` says (class docstring).
        ``prediction``/``variance_output``: the network's outputs at z_1 when already computed."""
        gamma_1 = _levels(gamma_1, z_1, self.event_dims).to(torch.float64)
        log_a2, log_s2 = alpha_sigma_log(gamma_1)
        if self.decoder == "plain":
            loc = z_1 / broadcast(torch.exp(0.5 * log_a2), z_1)
            log_var = broadcast(gamma_1, z_1)
        else:
            if prediction is None:
                # γ_0 = −∞ (x_0 itself) for mean="mu"; filled on the device, not copied to it
                prediction, variance_output = self.predict(z_1, gamma_1, torch.full_like(gamma_1, -math.inf))
            loc = prediction.x0.detach() if detach_mean else prediction.x0
            if self.decoder == "network":
                log_var = broadcast(gamma_1, z_1) + 2 * self.decoder_log_scale.to(z_1.dtype)
            else:  # "ddpm": β̃_2 of the model's own grid, or the learned interpolation with β_1
                log_small = self._ddpm_decoder_log_variance().to(z_1.dtype)
                if self.variance == "learned":
                    fraction = (variance_output + 1) / 2
                    log_var = fraction * broadcast(log_s2, z_1) + (1 - fraction) * log_small
                else:
                    log_var = log_small
        scale = torch.exp(0.5 * log_var).expand_as(z_1)
        if self.num_levels is None:
            return dist.Normal(loc, scale)
        if self.level_prior:
            return LevelWeightedGaussian(loc, scale, self.num_levels, self.decoder_level_logits)
        return DiscretizedGaussian(loc, scale, self.num_levels)

    def _ddpm_decoder_log_variance(self) -> torch.Tensor:
        """log β̃_2 of the model's own grid (DDPM's clipped log-variance at t = 1; β_1 when T = 1);
        kept while the grid is the same tensor and needs no gradient (a fixed schedule)."""
        grid = self.grid()
        cached = getattr(self, "_ddpm_log_variance_cache", None)
        if cached is not None and cached[0] is grid:
            return cached[1]
        if grid.shape[0] < 2:
            value = alpha_sigma_log(grid[0])[1]
        else:
            value = step_coefficients(grid[0], grid[1], grid[0]).log_small
        if not grid.requires_grad:
            self._ddpm_log_variance_cache = (grid, value)
        return value

    # ------------------------------------------------------------------ Pyro programs
    def register(self) -> None:
        """Enter the trainable parameters into Pyro's param store under ``name`` (what
        ``pyro.module`` does), refusing to run when the store already holds parameters of the
        same name that are not this module's: Pyro would silently optimize those instead.
        Nothing to do under ``pyro.settings.set(module_local_params=True)``."""
        if pyro.settings.get("module_local_params"):
            return
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            full = f"{self.name}$$${name}"
            if pyro.param(full, param) is not param:
                raise RuntimeError(
                    f"Pyro's param store already holds {full!r} from another module; call "
                    f"pyro.clear_param_store() or give this {type(self).__name__} a different name="
                )

    def model(
        self,
        x0: torch.Tensor | None = None,
        *,
        num_samples: int | None = None,
        num_steps: int | None = None,
        steps: chains.StepDraw | None = None,
        **kwargs,
    ):
        """The reverse chain p_θ(x_{0:T}) on the grid ``num_steps`` as a Pyro model; observes
        ``x0`` when given, otherwise generates ``num_samples`` data.  With ``steps``, the
        step-restricted form (``num_steps=0``: continuous time).  Returns x_0."""
        if x0 is None:
            if steps is not None:
                raise ValueError("x0: the step-restricted model needs data; got None")
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
                raise ValueError(f"num_samples: expected a positive int when x0 is None, got {num_samples!r}")
        else:
            self.check_data(x0)
        self.register()
        if steps is not None:
            T = self._check_num_steps(num_steps, allow_continuous=True)
            levels = steps.levels(self, T, x0.shape[0], x0.device)
            return chains.step_model(self, x0, levels, detach_mean=steps.detach_mean, draw=steps)
        T = self._check_num_steps(num_steps, allow_continuous=False)
        return chains.reverse_model(self, x0, num_samples, self.grid(T))

    def guide(
        self,
        x0: torch.Tensor | None = None,
        *,
        num_samples: int | None = None,
        num_steps: int | None = None,
        steps: chains.StepDraw | None = None,
        order: str | None = None,
        **kwargs,
    ):
        """The forward chain q(x_{1:T} | x_0) as a Pyro guide (``order`` "posterior", the
        default and exact under ``TraceMeanField_ELBO``, or "forward"); with ``steps``, the
        step-restricted form.  Returns ``{t: x_t}`` (full chain) or the step's x_t.  (The
        parameters it uses, a learned schedule's, enter Pyro's param store through
        :meth:`model`, which every ELBO runs.)"""
        if x0 is None:
            raise ValueError("x0: the guide q(x_{1:T} | x_0) needs data; got None")
        self.check_data(x0)
        if steps is not None:
            T = self._check_num_steps(num_steps, allow_continuous=True)
            return chains.step_guide(self, x0, steps.levels(self, T, x0.shape[0], x0.device), steps)
        T = self._check_num_steps(num_steps, allow_continuous=False)
        return chains.forward_guide(self, x0, self.grid(T), order or self.guide_order)

    def model_module(self) -> chains.ReverseChain:
        """The model as an ``nn.Module`` (for ``ELBOModule`` and plain PyTorch loops)."""
        return chains.ReverseChain(self)

    def guide_module(self, order: str | None = None) -> chains.ForwardChain:
        """The guide as an ``nn.Module`` with no parameters of its own."""
        return chains.ForwardChain(self, order or self.guide_order)

    # ------------------------------------------------------------------ bound and sampling
    def vlb_terms(self, x0: torch.Tensor, **kwargs) -> torch.Tensor:
        """Per-datum terms ``(B, T + 1)`` in nats; see :func:`pyro_diffusion.bound.vlb_terms`."""
        from .bound import vlb_terms

        return vlb_terms(self, x0, **kwargs)

    def nll(self, x0: torch.Tensor, **kwargs) -> torch.Tensor:
        """Per-datum negative ELBO in bits per dimension, ``(B,)``; see
        :func:`pyro_diffusion.bound.nll` (``num_steps=0``: continuous time)."""
        from .bound import nll

        return nll(self, x0, **kwargs)

    def sample(self, num_samples: int, **kwargs) -> torch.Tensor:
        """``num_samples`` draws; see :func:`pyro_diffusion.samplers.sample`."""
        from .samplers import sample

        return sample(self, num_samples, **kwargs)


def _levels(gamma, like: torch.Tensor, event_dims: int) -> torch.Tensor:
    """γ as a float64 tensor: a number or 0-d tensor stays a scalar; per-datum values keep
    their shape (the batch dimensions of ``like``)."""
    if not isinstance(gamma, torch.Tensor):
        return torch.tensor(float(gamma), dtype=torch.float64, device=like.device)
    return gamma.to(torch.float64)


def GaussianDiffusion(
    denoiser: nn.Module,
    schedule: NoiseSchedule,
    event_shape,
    *,
    mean: str = "eps",
    variance: str = "large",
    decoder: str = "gaussian",
    num_levels: int | None = None,
    **kwargs,
) -> Diffusion:
    """A DDPM (Ho et al. 2020) as a :class:`Diffusion`: a tabulated schedule on its T steps, the
    network's x̂ as the decoder's location with DDPM's clipped variance β̃_2, ``variance="large"``
    (σ_t² = β_t) by default.  ``decoder``: ``"gaussian"`` or ``"discretized"`` (needs
    ``num_levels``)."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
    if decoder not in ("gaussian", "discretized"):
        raise ValueError(f"decoder: expected 'gaussian' or 'discretized', got {decoder!r}")
    if decoder == "discretized" and (
        isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2
    ):
        raise ValueError(f"num_levels: decoder='discretized' needs an integer K >= 2, got {num_levels!r}")
    return Diffusion(
        denoiser,
        schedule,
        event_shape,
        mean=mean,
        variance=variance,
        decoder="ddpm",
        num_levels=num_levels if decoder == "discretized" else None,
        **kwargs,
    )
