r"""``ContinuousDiffusion``: a diffusion model on a γ-schedule, in discrete and continuous time.

Notation (VDM, Kingma et al. 2021): ``z_t = α_t x + σ_t ε`` with α_t² = sigmoid(−γ(t)),
σ_t² = sigmoid(γ(t)), SNR(t) = exp(−γ(t)); the denoiser predicts ε̂_θ(z_t, γ(t)) and
x̂_θ = (z_t − σ_t ε̂_θ)/α_t.  For ``s < t`` the forward posterior is

    q(z_s | z_t, x) = N(α_s((1 − c) z_t/α_t + c x),  c σ_s² I),   c = −expm1(γ(s) − γ(t)),

and the reverse step is ``p_θ(z_s | z_t) = q(z_s | z_t, x = x̂_θ(z_t))``, so its KL is

    KL(q(z_s|z_t,x) ‖ p_θ(z_s|z_t)) = ½ (SNR(s) − SNR(t)) ‖x − x̂_θ‖² = ½ expm1(γ(t) − γ(s)) ‖ε − ε̂_θ‖².

−ELBO(x) = L_prior + L_decoder + L_diffusion with

    L_prior     = KL(q(z_1|x) ‖ N(0, I)) = ½ Σ_d [α_1² x² + σ_1² − log σ_1² − 1]
    L_decoder   = E_{q(z_0|x)} −log p(x | z_0),  p(x | z_0) = (discretized) N(z_0/α_0, σ_0²/α_0²)
    L_T         = T/2 · E_{i~U{1..T}, ε} [expm1(γ(t_i) − γ(t_{i−1})) ‖ε − ε̂_θ(z_{t_i}, γ(t_i))‖²],  t_i = i/T
    L_∞         = ½ E_{t~U(0,1), ε} [γ'(t) ‖ε − ε̂_θ(z_t, γ(t))‖²]

(L_diffusion = L_T for T steps, L_∞ in continuous time).  The decoder does not use the network
(VDM's choice): for K-level data it is the discretized Gaussian of
:class:`~pyro_diffusion.decoders.DiscretizedGaussian`, and its cost is what the learned γ_min
trades against the diffusion loss at low noise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from tqdm.auto import tqdm

from ..decoders import DiscretizedGaussian
from ..diffusion import check_batch, check_event_shape, register_module
from .schedules import GammaSchedule, alpha_sigma

DECODERS = ("plain", "denoiser")

__all__ = [
    "DECODERS",
    "NoiseLevelDenoiser",
    "ContinuousDiffusion",
    "BoundTerms",
    "BoundEstimate",
    "snr_step_kl",
    "discrete_times",
]


def snr_step_kl(gamma_s: torch.Tensor, gamma_t: torch.Tensor, eps: torch.Tensor, eps_hat: torch.Tensor):
    r"""Per-datum KL(q(z_s|z_t,x) ‖ p_θ(z_s|z_t)) through the two noise levels, ``(B,)``:

    ½ (SNR(s) − SNR(t)) ‖x − x̂‖² = ½ (SNR(s)/SNR(t) − 1) ‖ε − ε̂‖² = ½ expm1(γ_t − γ_s) ‖ε − ε̂‖².

    ``gamma_s``, ``gamma_t``: ``(B,)`` with γ_s < γ_t; ``eps``, ``eps_hat``: ``(B, *event)``."""
    weight = torch.expm1(gamma_t - gamma_s).to(eps.dtype)
    return 0.5 * weight * _sum_event((eps - eps_hat) ** 2)


def discrete_times(t: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round times ``t ∈ [0, 1]`` up to the grid of T steps: returns ``(t_i, t_{i−1})`` with
    ``i = max(1, ⌈t T⌉)``, so that ``t ~ U(0, 1)`` gives ``i ~ U{1..T}``.  (A time within 1e-9
    of a grid point counts as on it, so that ``t = i/T`` computed in floating point gives i.)"""
    index = torch.ceil(t * num_steps - 1e-9).clamp(1, num_steps)
    return index / num_steps, (index - 1) / num_steps


def _sum_event(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).reshape(values.shape + (1,) * (like.dim() - values.dim()))


class NoiseLevelDenoiser(nn.Module):
    """Wrap a step-conditioned network of :mod:`pyro_diffusion.nets` as ε̂_θ(z, γ).

    The network sees the noise level through ``c = scale · (γ − γ_lo)/(γ_hi − γ_lo)`` (a float
    "step", which :class:`~pyro_diffusion.nets.StepEmbedding` accepts), so the denoiser is a
    function of SNR alone and the continuous-time bound is invariant to the schedule's shape.

    Args:
        network: called as ``network(z, c)``.
        gamma_range: (γ_lo, γ_hi) mapped to ``c ∈ [0, scale]`` (values outside extrapolate).
        scale: the "step" range, 1000 to match the core's step embeddings.
        flatten: flatten ``(B, *event)`` to ``(B, D)`` for an MLP and reshape its output back.
    """

    def __init__(
        self,
        network: nn.Module,
        gamma_range: tuple[float, float] = (-15.0, 15.0),
        scale: float = 1000.0,
        flatten: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network: expected an nn.Module, got {type(network).__name__}")
        low, high = gamma_range
        if not low < high:
            raise ValueError(f"gamma_range: expected (low, high) with low < high, got {gamma_range}")
        self.network = network
        self.gamma_range = (float(low), float(high))
        self.scale = float(scale)
        self.flatten = flatten

    def forward(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        low, high = self.gamma_range
        level = (self.scale * (gamma - low) / (high - low)).to(z.dtype)
        if self.flatten:
            return self.network(z.reshape(z.shape[0], -1), level).reshape(z.shape)
        return self.network(z, level)


class BoundTerms(NamedTuple):
    """Per-datum terms of −ELBO in nats, each ``(B,)``; ``shape_outputs`` are the schedule's
    shape tensors the diffusion term went through (for the variance gradient)."""

    diffusion: torch.Tensor
    decoder: torch.Tensor
    prior: torch.Tensor
    shape_outputs: tuple[torch.Tensor, ...] = ()

    @property
    def total(self) -> torch.Tensor:
        return self.diffusion + self.decoder + self.prior


class BoundEstimate(NamedTuple):
    """Monte Carlo estimate of −ELBO per datum from ``n`` independent single-draw estimates:
    ``mean`` and ``standard_error`` (= ``sqrt(variance / n)``), and ``variance``, the variance of
    one draw (the estimator's variance), all ``(B,)``, in the unit asked for."""

    mean: torch.Tensor
    standard_error: torch.Tensor
    variance: torch.Tensor
    num_draws: int

    def dataset_mean(self) -> tuple[float, float]:
        """(mean over data, its Monte Carlo standard error given the data)."""
        n = self.mean.shape[0]
        return self.mean.mean().item(), (self.standard_error.pow(2).sum().sqrt() / n).item()


class ContinuousDiffusion(nn.Module):
    r"""A variance-preserving diffusion on a γ-schedule with its bound in discrete and
    continuous time (module docstring for the math).

    Args:
        denoiser: ``denoiser(z, γ)`` → ε̂ of shape ``(B, *event_shape)``, with γ a float
            tensor ``(B,)`` (e.g. :class:`NoiseLevelDenoiser` around a core network).
        schedule: a :class:`~pyro_diffusion.vdm.GammaSchedule` (its parameters, if any, are
            trained with the denoiser).
        event_shape: shape of one datum.
        num_levels: K for K-level data in [−1, 1] (discretized decoder); ``None`` for the
            Gaussian decoder on continuous data.
        decoder: ``"plain"`` (default, VDM's): p(x | z_0) centred at z_0/α_0 with scale σ_0/α_0,
            no network; ``"denoiser"``: centred at the network's x̂_θ(z_0, γ_0) with scale
            σ_0/α_0 · exp(s), s a learned scalar (starts at 0).
        num_steps: default T of the Pyro :meth:`model`/:meth:`guide` pair.
        name: the name in Pyro's param store; prefix of the plate name.
        anchor: ``None`` (default): the denoiser sees γ.  A float a: the denoiser sees
            ``γ − γ(0) + a``, the noise level measured from the schedule's own γ_min (so for a
            fixed schedule with γ(0) = a nothing changes).  With a learned γ_min, the network's
            input at the data end is then always a, wherever γ_min has moved: the network,
            which is sharp in its noise-level input just there (the denoiser decoder queries
            it at exactly γ(0) for every datum) and was never trained below it, does not have
            to follow γ_min, and an average of its weights over training (EMA) stays
            consistent with the averaged γ_min.  See docs/learned_schedules.md §5.

    Example::

        >>> net = NoiseLevelDenoiser(MLPDenoiser(64, hidden=256), flatten=True)
        >>> vdm = ContinuousDiffusion(net, LearnedGamma(), (1, 8, 8), num_levels=17)
        >>> svi = SVI(vdm.model, vdm.guide, Adam({"lr": 2e-3}), ContinuousTimeELBO())
        >>> svi.step(x0)
    """

    def __init__(
        self,
        denoiser: nn.Module,
        schedule: GammaSchedule,
        event_shape: tuple[int, ...] | torch.Size,
        *,
        num_levels: int | None = None,
        decoder: str = "plain",
        num_steps: int = 100,
        name: str = "vdm",
        anchor: float | None = None,
    ) -> None:
        super().__init__()
        if anchor is not None and (
            isinstance(anchor, bool) or not isinstance(anchor, (int, float)) or not math.isfinite(anchor)
        ):
            raise ValueError(f"anchor: expected None or a finite float, got {anchor!r}")
        self.anchor = None if anchor is None else float(anchor)
        if not isinstance(denoiser, nn.Module):
            raise TypeError(f"denoiser: expected an nn.Module, got {type(denoiser).__name__}")
        if not isinstance(schedule, GammaSchedule):
            raise TypeError(f"schedule: expected a GammaSchedule, got {type(schedule).__name__}")
        event_shape = check_event_shape(event_shape)
        if num_levels is not None and (
            isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2
        ):
            raise ValueError(f"num_levels: expected None or an integer K >= 2, got {num_levels!r}")
        _check_steps(num_steps)
        self.denoiser = denoiser
        self.schedule = schedule
        self.event_shape = event_shape
        self.num_levels = num_levels
        if decoder not in DECODERS:
            raise ValueError(f"decoder: expected one of {DECODERS}, got {decoder!r}")
        self.decoder = decoder
        if decoder == "denoiser":
            self.decoder_log_scale = nn.Parameter(torch.zeros(()))
        self.num_steps = num_steps
        self.name = name

    # ------------------------------------------------------------------ configuration
    @property
    def event_size(self) -> int:
        """D, the number of dimensions of one datum."""
        return math.prod(self.event_shape)

    @property
    def plate_name(self) -> str:
        return f"{self.name}.data"

    def check_data(self, x0: torch.Tensor, argument: str = "x0") -> torch.Tensor:
        """Refuse data that is not a float tensor of shape ``(B, *event_shape)``."""
        return check_batch(x0, self.event_shape, argument=argument)

    def register(self) -> None:
        """Enter the denoiser's and the schedule's parameters into Pyro's param store
        (refusing stale parameters of the same name, as the core does)."""
        register_module(self.name, self)

    # ------------------------------------------------------------------ pieces
    def denoiser_level(self, gamma: torch.Tensor) -> torch.Tensor:
        """The noise level the denoiser sees: γ, or γ − γ(0) + anchor (``anchor``)."""
        if self.anchor is None:
            return gamma
        gamma0, _ = self.schedule.endpoints()
        return gamma - gamma0.to(gamma.dtype) + self.anchor

    def predict_eps(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """ε̂_θ(z, γ), checked to have z's shape (the denoiser sees :meth:`denoiser_level`)."""
        eps = self.denoiser(z, self.denoiser_level(gamma).to(z.dtype))
        if eps.shape != z.shape:
            raise ValueError(f"denoiser: returned shape {tuple(eps.shape)}, expected {tuple(z.shape)}")
        return eps

    def predict_x0(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """x̂_θ = (z − σ ε̂_θ(z, γ)) / α."""
        alpha, sigma = alpha_sigma(gamma)
        return (z - _broadcast(sigma, z) * self.predict_eps(z, gamma)) / _broadcast(alpha, z)

    def diffuse(self, x0: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor | None = None):
        """z = α x + σ ε, a draw from q(z_t | x) at noise level γ ``(B,)``; returns (z, ε)."""
        if noise is None:
            noise = torch.randn_like(x0)
        alpha, sigma = alpha_sigma(gamma)
        return _broadcast(alpha, x0) * x0 + _broadcast(sigma, x0) * noise, noise

    def diffusion_term(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        num_steps: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        r"""One-draw estimate of the diffusion loss per datum at times ``t`` ``(B,)``:
        ½ γ'(t) ‖ε − ε̂_θ(z_t)‖² (``num_steps=None``, continuous time) or
        T/2 · expm1(γ(t_i) − γ(t_{i−1})) ‖ε − ε̂_θ(z_{t_i})‖² with t_i = ⌈tT⌉/T.  Unbiased for
        L_∞ (resp. L_T) when t ~ U(0, 1).  Returns (terms ``(B,)``, schedule shape outputs)."""
        if num_steps is None:
            at = self.schedule(t)
            z, noise = self.diffuse(x0, at.gamma, noise)
            error = _sum_event((noise - self.predict_eps(z, at.gamma)) ** 2)
            return 0.5 * at.derivative.to(x0.dtype) * error, at.shape_outputs
        _check_steps(num_steps)
        t_now, t_prev = discrete_times(t, num_steps)
        both = self.schedule(torch.cat([t_now, t_prev]))
        gamma_t, gamma_s = both.gamma.chunk(2)
        z, noise = self.diffuse(x0, gamma_t, noise)
        terms = num_steps * snr_step_kl(gamma_s, gamma_t, noise, self.predict_eps(z, gamma_t))
        return terms, both.shape_outputs

    def decoder_distribution(self, z0: torch.Tensor, gamma0: torch.Tensor):
        """p(x | z_0): N(z_0/α_0, σ_0²/α_0²) (``decoder="plain"``) or N(x̂_θ(z_0), σ_0²/α_0² ·
        e^{2s}) (``"denoiser"``), discretized to K levels when ``num_levels``."""
        alpha, sigma = alpha_sigma(gamma0)
        scale = _broadcast(sigma / alpha, z0).expand_as(z0)
        if self.decoder == "denoiser":
            loc = self.predict_x0(z0, gamma0)
            scale = scale * torch.exp(self.decoder_log_scale).to(z0.dtype)
        else:
            loc = z0 / _broadcast(alpha, z0)
        if self.num_levels is None:
            return dist.Normal(loc, scale)
        return DiscretizedGaussian(loc, scale, self.num_levels)

    def _gamma_at(self, value: float, like: torch.Tensor) -> torch.Tensor:
        return self.schedule(
            torch.full((like.shape[0],), value, dtype=torch.float64, device=like.device)
        ).gamma

    def decoder_term(self, x0: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """−log p(x | z_0) per datum for one draw z_0 ~ q(z_0 | x), ``(B,)``."""
        gamma0 = self._gamma_at(0.0, x0)
        z0, _ = self.diffuse(x0, gamma0, noise)
        return -_sum_event(self.decoder_distribution(z0, gamma0).log_prob(x0))

    def prior_term(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(z_1 | x) ‖ N(0, I)) per datum, ``(B,)``."""
        gamma1 = self._gamma_at(1.0, x0)
        alpha_sq, sigma_sq = _broadcast(torch.sigmoid(-gamma1), x0), _broadcast(torch.sigmoid(gamma1), x0)
        log_sigma_sq = _broadcast(torch.nn.functional.logsigmoid(gamma1), x0)
        return _sum_event(0.5 * (alpha_sq * x0**2 + sigma_sq - log_sigma_sq - 1))

    def loss_terms(self, x0: torch.Tensor, t: torch.Tensor, num_steps: int | None = None) -> BoundTerms:
        """All terms of one draw of −ELBO per datum at times ``t`` ``(B,)`` (see
        :meth:`diffusion_term`)."""
        self.check_data(x0)
        if not isinstance(t, torch.Tensor) or t.shape != (x0.shape[0],):
            raise ValueError(f"t: expected a float tensor of shape ({x0.shape[0]},), got {t!r:.80}")
        diffusion, shape_outputs = self.diffusion_term(x0, t, num_steps)
        return BoundTerms(diffusion, self.decoder_term(x0), self.prior_term(x0), shape_outputs)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def bound_samples(
        self,
        x0: torch.Tensor,
        *,
        num_steps: int | None = None,
        num_times: int = 128,
        max_items: int = 16384,
        progress: bool = False,
    ) -> torch.Tensor:
        """``num_times`` independent single-draw estimates of −ELBO(x) per datum, in nats,
        shape ``(B, num_times)``: each with its own t ~ U(0, 1) and ε (continuous time, or T
        steps with ``num_steps``).  Their row means are unbiased for −ELBO(x); their spread is
        the estimator's variance."""
        self.check_data(x0)
        if isinstance(num_times, bool) or not isinstance(num_times, int) or num_times < 2:
            raise ValueError(f"num_times: expected an integer >= 2, got {num_times!r}")
        B = x0.shape[0]
        per_call = max(1, max_items // max(B, 1))
        prior = self.prior_term(x0)
        columns = []
        for start in tqdm(range(0, num_times, per_call), desc="bound", disable=not progress, leave=False):
            n = min(per_call, num_times - start)
            x_rep = x0.repeat((n,) + (1,) * (x0.dim() - 1))
            t = torch.rand(n * B, dtype=torch.float64, device=x0.device)
            diffusion, _ = self.diffusion_term(x_rep, t, num_steps)
            columns.append((diffusion + self.decoder_term(x_rep)).reshape(n, B))
        return torch.cat(columns, 0).transpose(0, 1).to(torch.float64) + prior[:, None].to(torch.float64)

    def nll(
        self,
        x0: torch.Tensor,
        *,
        num_steps: int | None = None,
        num_times: int = 128,
        bits: bool = True,
        **kwargs,
    ) -> BoundEstimate:
        """Monte Carlo −ELBO per datum with standard errors, from ``num_times`` draws of (t, ε)
        per datum; in bits per dimension (``bits=True``) or nats."""
        samples = self.bound_samples(x0, num_steps=num_steps, num_times=num_times, **kwargs)
        if bits:
            samples = samples / (self.event_size * math.log(2))
        variance = samples.var(1)
        return BoundEstimate(samples.mean(1), (variance / num_times).sqrt(), variance, num_times)

    @torch.no_grad()
    def step_profile(self, x0: torch.Tensor, num_steps: int, *, max_items: int = 16384) -> torch.Tensor:
        """The T discrete diffusion terms per datum, ``(B, T)`` in nats: column i−1 is one
        draw of KL(q(z_{t_{i−1}}|z_{t_i},x) ‖ p_θ) (not multiplied by T), so the row sums are
        single-draw estimates of L_T."""
        self.check_data(x0)
        _check_steps(num_steps)
        B = x0.shape[0]
        per_call = max(1, max_items // max(B, 1))
        columns = []
        for start in range(1, num_steps + 1, per_call):
            index = torch.arange(start, min(num_steps, start + per_call - 1) + 1, device=x0.device)
            n = index.numel()
            t = (index.to(torch.float64) / num_steps).repeat_interleave(B)
            x_rep = x0.repeat((n,) + (1,) * (x0.dim() - 1))
            terms, _ = self.diffusion_term(x_rep, t, num_steps)
            columns.append((terms / num_steps).reshape(n, B))
        return torch.cat(columns, 0).transpose(0, 1)

    # ------------------------------------------------------------------ Pyro programs
    def _step_distributions(self, x0, z_t, i: int, num_steps: int):
        """(q(z_s | z_t, x), p_θ(z_s | z_t)) for s = (i−1)/T, t = i/T (x0 may be None)."""
        times = torch.tensor([(i - 1) / num_steps, i / num_steps], dtype=torch.float64, device=z_t.device)
        gamma_s, gamma_t = self.schedule(times).gamma
        c = -torch.expm1(gamma_s - gamma_t)
        alpha_s, sigma_s = alpha_sigma(gamma_s)
        alpha_t, _ = alpha_sigma(gamma_t)
        scale = (c.sqrt() * sigma_s).to(z_t.dtype)
        keep = (alpha_s * (1 - c) / alpha_t).to(z_t.dtype) * z_t

        def posterior(x):
            return dist.Normal(keep + (alpha_s * c).to(z_t.dtype) * x, scale.expand_as(z_t))

        x_hat = self.predict_x0(z_t, gamma_t.expand(z_t.shape[0]))
        return (posterior(x0) if x0 is not None else None), posterior(x_hat)

    def model(
        self, x0: torch.Tensor | None = None, *, num_samples: int | None = None, num_steps: int | None = None
    ):
        """The reverse chain with T steps as a Pyro model: ``z_T ~ N(0, I)``, for i = T..1
        ``z_{i−1} ~ p_θ(z_{(i−1)/T} | z_{i/T})``, and ``x_0 ~ p(x | z_0)`` (observed when given).
        Sites ``z_T … z_0`` and ``x_0``.  Returns x_0."""
        T = _check_steps(num_steps or self.num_steps)
        if x0 is None:
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
                raise ValueError(f"num_samples: expected a positive int when x0 is None, got {num_samples!r}")
            n, dtype = num_samples, torch.get_default_dtype()
        else:
            self.check_data(x0)
            n, dtype = x0.shape[0], x0.dtype
        self.register()
        device = next(self.parameters()).device
        event_dims = len(self.event_shape)
        with pyro.plate(self.plate_name, n):
            zeros = torch.zeros((n, *self.event_shape), dtype=dtype, device=device)
            z = pyro.sample(f"z_{T}", dist.Normal(zeros, 1.0).to_event(event_dims))
            for i in range(T, 0, -1):
                _, p = self._step_distributions(None, z, i, T)
                z = pyro.sample(f"z_{i - 1}", p.to_event(event_dims))
            decoder = self.decoder_distribution(z, self._gamma_at(0.0, z))
            return pyro.sample("x_0", decoder.to_event(event_dims), obs=x0)

    def guide(
        self, x0: torch.Tensor | None = None, *, num_samples: int | None = None, num_steps: int | None = None
    ):
        """The forward chain in posterior order as a Pyro guide over the model's sites:
        ``z_T ~ q(z_1 | x)``, then ``z_{i−1} ~ q(z_{(i−1)/T} | z_{i/T}, x)``.  Under
        ``TraceMeanField_ELBO`` each site contributes its analytic KL (same structure as the
        model), so the ELBO is exactly the discrete bound L_T + decoder + prior, and the
        schedule's parameters get gradients through the reparameterized draws."""
        if x0 is None:
            raise ValueError("x0: the guide q(z | x) needs data; got None")
        self.check_data(x0)
        T = _check_steps(num_steps or self.num_steps)
        self.register()
        event_dims = len(self.event_shape)
        with pyro.plate(self.plate_name, x0.shape[0]):
            gamma1 = self._gamma_at(1.0, x0)
            alpha1, sigma1 = alpha_sigma(gamma1)
            q1 = dist.Normal(_broadcast(alpha1, x0) * x0, _broadcast(sigma1, x0).expand_as(x0))
            z = pyro.sample(f"z_{T}", q1.to_event(event_dims))
            for i in range(T, 0, -1):
                q, _ = self._step_distributions(x0, z, i, T)
                z = pyro.sample(f"z_{i - 1}", q.to_event(event_dims))
        return z

    @torch.no_grad()
    def sample(
        self, num_samples: int, num_steps: int | None = None, *, progress: bool = False
    ) -> torch.Tensor:
        """Ancestral samples with T steps, the decoder's nearest level (or mean) at the end."""
        T = _check_steps(num_steps or self.num_steps)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
        device = next(self.parameters()).device
        z = torch.randn((num_samples, *self.event_shape), device=device)
        for i in tqdm(range(T, 0, -1), desc="sampling", disable=not progress, leave=False):
            _, p = self._step_distributions(None, z, i, T)
            z = p.loc + p.scale * torch.randn_like(z)
        decoder = self.decoder_distribution(z, self._gamma_at(0.0, z))
        return decoder.mean_level() if isinstance(decoder, DiscretizedGaussian) else decoder.loc


def _check_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive integer T, got {num_steps!r}")
    return num_steps
