r"""``GaussianDiffusion``: the configuration of a DDPM and the Pyro model and guide it defines.

It wires the pieces together: a :class:`~pyro_diffusion.schedule.NoiseSchedule`, a denoiser
network ``denoiser(x_t, t)``, a mean and variance parameterization
(:mod:`~pyro_diffusion.parameterization`), and a decoder (:mod:`~pyro_diffusion.decoders`).
The chains themselves are in :mod:`~pyro_diffusion.chains`, the bound in
:mod:`~pyro_diffusion.bound`, the samplers in :mod:`~pyro_diffusion.sampling`.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from . import chains
from .decoders import DECODERS, decoder_distribution
from .parameterization import (
    MEANS,
    VARIANCES,
    model_log_variance,
    model_mean,
    predict_eps,
    split_output,
)
from .schedule import NoiseSchedule

__all__ = ["GaussianDiffusion", "check_event_shape", "check_batch", "register_module"]


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
    when given); with Pyro's validation on (the default) also refuse NaN or infinite values,
    the one check that reads tensor values (``pyro.enable_validation(False)`` skips it)."""
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"{argument}: expected a torch.Tensor, got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise TypeError(f"{argument}: expected a floating-point tensor, got dtype {x0.dtype}")
    if x0.dim() != len(event_shape) + 1 or x0.shape[1:] != event_shape:
        raise ValueError(
            f"{argument}: expected shape (batch, {', '.join(map(str, event_shape))}) "
            f"for event_shape {tuple(event_shape)}, got {tuple(x0.shape)}"
        )
    if device is not None and x0.device != device:
        raise ValueError(
            f"{argument}: is on {x0.device} but the diffusion is on {device}; move one with .to(device)"
        )
    if is_validation_enabled() and not torch.isfinite(x0).all():
        raise ValueError(f"{argument}: contains NaN or infinite values")
    return x0


def register_module(name: str, module: nn.Module) -> None:
    """``pyro.module(name, module)``, refusing to run when Pyro's param store already holds
    parameters of the same name that are not this module's (a previous model of the same
    name): Pyro would silently optimize those instead."""
    held = pyro.get_param_store()._params
    named = [(f"{name}$$${n}", p) for n, p in module.named_parameters()]  # one tree walk
    for full, param in named:
        if param.requires_grad and held.get(full, param) is not param:
            raise RuntimeError(
                f"Pyro's param store already holds {full!r} from another module; call "
                f"pyro.clear_param_store() or give this {type(module).__name__} a different name="
            )
    if "$$$" in name or not all(p.requires_grad for _, p in named):
        pyro.module(name, module)  # its name check, its warning on frozen parameters
        return
    for full, param in named:  # what pyro.module does here, without walking the tree again
        pyro.param(full, param)


class GaussianDiffusion(nn.Module):
    r"""A denoising diffusion model p_θ(x_{0:T}) with its forward chain q(x_{1:T} | x_0).

    The reverse chain is the Pyro model :meth:`model` (sites ``x_T … x_1`` latent, ``x_0``
    observed) and the forward chain the Pyro guide :meth:`guide` over the same sites; with
    :class:`pyro.infer.TraceMeanField_ELBO` they give the bound of DESIGN.md §2 term by term:

    .. math::

        \mathrm{ELBO}(x_0) = \mathbb E_q \log p_θ(x_0|x_1) − \mathrm{KL}(q(x_T|x_0)\|p(x_T))
            − \sum_{t=2}^T \mathbb E_q \mathrm{KL}(q(x_{t-1}|x_t,x_0)\|p_θ(x_{t-1}|x_t)).

    Args:
        denoiser: any ``nn.Module`` called as ``denoiser(x_t, t)`` with ``x_t`` of shape
            ``(B, *event_shape)`` and ``t`` a LongTensor ``(B,)`` of 1-based steps.  It returns
            ``(B, *event_shape)``, or twice as many entries along dim 1 when
            ``variance="learned"`` (mean part first, then the interpolation ``v ∈ [−1, 1]``).
        schedule: the noise schedule.
        event_shape: shape of one datum, e.g. ``(2,)`` or ``(1, 8, 8)``.
        mean: ``"eps"`` (default), ``"x0"`` or ``"mu"``.
        variance: ``"large"`` (default, σ_t² = β_t), ``"small"`` (β̃_t) or ``"learned"``.
        decoder: ``"gaussian"`` (default) or ``"discretized"`` (needs ``num_levels``).
        num_levels: K for K-level data in [−1, 1] (256 for 8-bit images, 17 for digits).
        guide_order: default order of :meth:`guide`: ``"posterior"`` or ``"forward"``.
        name: the name under which the parameters enter Pyro's param store, and the prefix
            of the plate name; give two diffusions in one program different names.
        autocast_dtype: run the denoiser under ``torch.autocast`` in this dtype (e.g.
            ``torch.bfloat16``); its output is cast back to the data's dtype, so the bound's
            arithmetic stays in float32 or higher.  ``None`` (default): no autocast.

    Example::

        >>> schedule = NoiseSchedule.linear(100)
        >>> diffusion = GaussianDiffusion(MLPDenoiser(2), schedule, (2,))
        >>> svi = SVI(diffusion.model, diffusion.guide, Adam({"lr": 1e-3}), TraceMeanField_ELBO())
        >>> svi.step(x0)  # x0 of shape (B, 2)
    """

    def __init__(
        self,
        denoiser: nn.Module,
        schedule: NoiseSchedule,
        event_shape: tuple[int, ...] | torch.Size,
        *,
        mean: str = "eps",
        variance: str = "large",
        decoder: str = "gaussian",
        num_levels: int | None = None,
        guide_order: str = "posterior",
        name: str = "diffusion",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(denoiser, nn.Module):
            raise TypeError(f"denoiser: expected an nn.Module, got {type(denoiser).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
        event_shape = check_event_shape(event_shape)
        if mean not in MEANS:
            raise ValueError(f"mean: expected one of {MEANS}, got {mean!r}")
        if variance not in VARIANCES:
            raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder: expected one of {DECODERS}, got {decoder!r}")
        if decoder == "discretized" and (not isinstance(num_levels, int) or num_levels < 2):
            raise ValueError(f"num_levels: decoder='discretized' needs an integer K >= 2, got {num_levels!r}")
        if guide_order not in chains.GUIDE_ORDERS:
            raise ValueError(f"guide_order: expected one of {chains.GUIDE_ORDERS}, got {guide_order!r}")
        self.denoiser = denoiser
        self.schedule = schedule
        self.event_shape = event_shape
        self.mean = mean
        self.variance = variance
        self.decoder = decoder
        self.num_levels = num_levels
        self.guide_order = guide_order
        self.name = name
        self.autocast_dtype = autocast_dtype

    # ------------------------------------------------------------------ configuration
    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

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

    def config(self) -> dict:
        """A JSON-able description of the configuration (not the weights)."""
        return {
            "num_steps": self.num_steps,
            "event_shape": list(self.event_shape),
            "mean": self.mean,
            "variance": self.variance,
            "decoder": self.decoder,
            "num_levels": self.num_levels,
            "denoiser": type(self.denoiser).__name__,
        }

    # ------------------------------------------------------------------ validation
    def check_data(self, x0: torch.Tensor, argument: str = "x0") -> torch.Tensor:
        """Refuse data that is not a float tensor of shape ``(B, *event_shape)`` on the
        schedule's device (and, with Pyro's validation on, data containing NaN/inf)."""
        return check_batch(x0, self.event_shape, self.schedule.betas.device, argument)

    def check_steps(self, t: torch.Tensor, batch: int | None = None, argument: str = "t") -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.long:
            raise TypeError(f"{argument}: expected a LongTensor of 1-based steps, got {t!r:.80}")
        if t.dim() != 1 or (batch is not None and t.shape[0] != batch):
            raise ValueError(
                f"{argument}: expected shape ({batch if batch is not None else 'batch'},), got {tuple(t.shape)}"
            )
        if is_validation_enabled() and ((t < 1).any() or (t > self.num_steps).any()):
            raise ValueError(
                f"{argument}: steps must lie in 1..{self.num_steps} (1-based), got values in "
                f"{int(t.min())}..{int(t.max())}"
            )
        return t

    # ------------------------------------------------------------------ the network
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor):
        """Run the denoiser; returns (mean output, variance output or None)."""
        if self.autocast_dtype is None:
            output = self.denoiser(x_t, t)
        else:
            with torch.autocast(x_t.device.type, dtype=self.autocast_dtype):
                output = self.denoiser(x_t, t)
            output = output.to(x_t.dtype)
        expected = (x_t.shape[0], *self.event_shape)
        if self.variance == "learned":
            expected = (x_t.shape[0], 2 * self.event_shape[0], *self.event_shape[1:])
        if tuple(output.shape) != expected:
            raise ValueError(
                f"denoiser: returned shape {tuple(output.shape)}, expected {expected}"
                + (
                    " (mean and variance stacked on dim 1 for variance='learned')"
                    if self.variance == "learned"
                    else ""
                )
            )
        return split_output(output, self.variance)

    def reverse_mean_log_variance(self, x_t: torch.Tensor, t: torch.Tensor):
        """(μ_θ(x_t, t), log σ_t², ε̂_θ(x_t, t)) for p_θ(x_{t-1} | x_t)."""
        mean_output, variance_output = self.denoise(x_t, t)
        loc = model_mean(self.schedule, self.mean, x_t, t, mean_output)
        log_var = model_log_variance(self.schedule, self.variance, t, x_t, variance_output)
        return loc, log_var, mean_output

    def reverse_distribution(self, x_t: torch.Tensor, t: torch.Tensor, *, decode: bool = False):
        """p_θ(x_{t-1} | x_t), batch-shaped: a Normal, or the decoder p_θ(x_0 | x_1) when
        ``decode`` (the caller says so, so no tensor value is read back from the device).
        For steps that differ across the batch see :func:`pyro_diffusion.bound.step_terms`."""
        loc, log_var, _ = self.reverse_mean_log_variance(x_t, t)
        if decode:
            return decoder_distribution(self.decoder, loc, log_var, self.num_levels)
        return dist.Normal(loc, torch.exp(0.5 * log_var).expand_as(loc))

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂_θ(x_t, t) under any mean parameterization."""
        mean_output, _ = self.denoise(x_t, t)
        return predict_eps(self.schedule, self.mean, x_t, t, mean_output)

    # ------------------------------------------------------------------ Pyro programs
    def register(self) -> None:
        """Enter the trainable parameters into Pyro's param store under ``name``; see
        :func:`register_module` (refuses stale parameters of the same name)."""
        register_module(self.name, self)

    def model(self, x0: torch.Tensor | None = None, *, num_samples: int | None = None, **kwargs):
        """The reverse chain p_θ(x_{0:T}) as a Pyro model; observes ``x0`` when given,
        otherwise generates ``num_samples`` data.  Returns x_0."""
        if x0 is None:
            if not isinstance(num_samples, int) or num_samples < 1:
                raise ValueError(f"num_samples: expected a positive int when x0 is None, got {num_samples!r}")
        else:
            self.check_data(x0)
        self.register()
        return chains.reverse_model(self, x0, num_samples)

    def guide(
        self,
        x0: torch.Tensor | None = None,
        *,
        num_samples: int | None = None,
        order: str | None = None,
        **kwargs,
    ):
        """The forward chain q(x_{1:T} | x_0) as a Pyro guide (``order`` "posterior" — the
        default, exact under ``TraceMeanField_ELBO`` — or "forward").  Returns ``{t: x_t}``."""
        if x0 is None:
            raise ValueError("x0: the guide q(x_{1:T} | x_0) needs data; got None")
        self.check_data(x0)
        return chains.forward_guide(
            self.schedule, x0, self.event_dims, order or self.guide_order, plate_name=self.plate_name
        )

    def model_module(self) -> chains.ReverseChain:
        """The model as an ``nn.Module`` (for ``ELBOModule`` and plain PyTorch loops)."""
        return chains.ReverseChain(self)

    def guide_module(self, order: str | None = None) -> chains.ForwardChain:
        """The guide as an ``nn.Module`` with no parameters of its own."""
        return chains.ForwardChain(self, order or self.guide_order)

    # ------------------------------------------------------------------ bound and sampling
    def vlb_terms(self, x0: torch.Tensor, **kwargs) -> torch.Tensor:
        """Per-datum terms ``(B, T + 1)`` in nats, column i = L_i; see :func:`bound.vlb_terms`."""
        from .bound import vlb_terms

        return vlb_terms(self, x0, **kwargs)

    def nll(self, x0: torch.Tensor, **kwargs) -> torch.Tensor:
        """Per-datum negative ELBO in bits per dimension, shape ``(B,)``."""
        from .bound import bits_per_dim

        return bits_per_dim(self, self.vlb_terms(x0, **kwargs))

    def sample(self, num_samples: int, **kwargs) -> torch.Tensor:
        """``num_samples`` draws by ancestral sampling; see :func:`sampling.ancestral_sample`."""
        from .sampling import ancestral_sample

        return ancestral_sample(self, num_samples, **kwargs)
