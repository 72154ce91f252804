r"""Losses that drop into ``pyro.infer.SVI(model, guide, optim, loss)``.

Each is a :class:`pyro.infer.ELBO` that *runs* the model and the guide: it makes a
:class:`~pyro_diffusion.chains.StepDraw` (one step per datum), passes it to both programs
(``steps=``, with ``num_steps=``), records them with ``poutine.trace`` / ``poutine.replay`` and
reads the traces.  So any handler a user puts on the programs (``poutine.scale``, ``mask``,
``condition``, ``block``) acts on training as Pyro's semantics say, and any program with the
same calling convention can be trained.  They also work as ``loss(model_module,
guide_module)`` → ``ELBOModule`` for plain PyTorch loops.  Losses are sums over the batch.

* :class:`DiffusionELBO` — the one-network-call unbiased estimate of −ELBO: at every latent
  site the analytic KL(guide ‖ model) from ``kl_divergence`` (``log p − log q`` where there is
  none), at observed sites ``−log p``, each scaled and masked as the guide (model) site says —
  what ``TraceMeanField_ELBO`` computes, keeping the per-datum terms.  Steps uniform,
  low-discrepancy or importance-sampled (∝ √E[ℓ_t²], Improved DDPM), on a grid or in
  continuous time, with VDM's variance gradient for a learned schedule's shape.
* :class:`SimplifiedLoss` — L_simple = ‖ε − ε̂_θ(x_t, γ_t)‖² per datum with the step uniform
  (not a bound), read from the same traces.
* :class:`HybridLoss` — Improved DDPM's ``L_simple + λ·L_vlb`` with the vlb term's means
  detached, so the vlb term trains only learned variances.
"""

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from .chains import TIME_SAMPLERS, StepDraw

__all__ = ["DiffusionELBO", "SimplifiedLoss", "HybridLoss", "trace_terms"]


def _check_num_steps(num_steps):
    if num_steps is None:
        return None
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(
            f"num_steps: expected None (the model's grid), 0 (continuous time) or T >= 1, got {num_steps!r}"
        )
    return num_steps


def trace_terms(model_trace, guide_trace) -> dict[str, torch.Tensor]:
    """The terms of −ELBO at each sample site, scaled and masked as Pyro's ELBOs do: at an
    observed model site ``−log p``; at a latent site the analytic KL(guide ‖ model) (scaled and
    masked by the guide site), or ``log q − log p`` where ``kl_divergence`` has no closed form.
    Values keep their batch shape (per datum inside the data plate)."""
    terms = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["is_observed"]:
            log_p = site["fn"].log_prob(site["value"])
            terms[name] = -scale_and_mask(log_p, site["scale"], site["mask"])
            continue
        guide_site = guide_trace.nodes.get(name)
        if guide_site is None:
            raise ValueError(f"model, guide: the model's latent site {name!r} is missing from the guide")
        try:
            kl = kl_divergence(guide_site["fn"], site["fn"])
            terms[name] = scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
        except NotImplementedError:
            log_p = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
            log_q = scale_and_mask(
                guide_site["fn"].log_prob(guide_site["value"]), guide_site["scale"], guide_site["mask"]
            )
            terms[name] = log_q - log_p
    if not terms:
        raise ValueError(
            "model, guide: the model's trace has no sample sites; expected a program over x_0 and its latents"
        )
    return terms


class _StepLoss(ELBO):
    """Shared plumbing: draw the steps, run and record both programs, sum the per-datum loss."""

    def __init__(self, num_steps: int | None = None, times: str = "uniform") -> None:
        super().__init__(num_particles=1)
        self.num_steps = _check_num_steps(num_steps)
        if times not in TIME_SAMPLERS:
            raise ValueError(f"times: expected one of {TIME_SAMPLERS}, got {times!r}")
        self.times = times

    def make_draw(self) -> StepDraw:
        return StepDraw(self.times)

    def traces(self, model, guide, args, kwargs, draw: StepDraw | None = None):
        """(model trace, guide trace, draw) of one evaluation."""
        if not args and kwargs.get("x0") is None:
            raise ValueError("x0: these losses need data; got None")
        draw = draw or self.make_draw()
        kwargs = {**kwargs, "steps": draw, "num_steps": self.num_steps}
        try:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        except ValueError as error:  # Pyro appends the trace's shapes: keep the message's first line
            message = str(error)
            if "\n" in message:
                raise ValueError(message.split("\n", 1)[0]) from error
            raise
        return model_trace, guide_trace, draw

    def per_datum(self, model_trace, guide_trace, draw) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace, _ = self.traces(model, guide, args, kwargs)
        return model_trace, guide_trace

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return self.per_datum(*self.traces(model, guide, args, kwargs)).sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> torch.Tensor:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.detach()


def _per_datum_sum(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over sites of the per-datum terms (sites outside the data plate are spread evenly)."""
    batched = [v for v in terms.values() if v.dim() == 1]
    if not batched:
        return sum(v.sum() for v in terms.values()).reshape(1)
    total = torch.zeros_like(batched[0])
    for value in terms.values():
        total = total + (value if value.shape == total.shape else value.sum() / total.shape[0])
    return total


class DiffusionELBO(_StepLoss):
    r"""Unbiased one-step estimate of −ELBO per datum, by running the step-restricted programs.

    For each datum one step t ~ r(t) and x_t ~ q(x_t | x_0); the loss is
    ``L_T + ℓ_t / r(t)`` (+ the decoder term when it is not one of the steps), whose
    expectation is −ELBO(x_0).  One batched network call per evaluation, whatever T is.

    Args:
        num_steps: the grid: None (default) the model's own, T a T-level grid, 0 continuous
            time (``½ γ'(t) ‖ε − ε̂‖²``, t ~ U(0, 1)).
        times: ``"uniform"`` (default), ``"low-discrepancy"`` (VDM: evenly spaced over the batch
            with one random shift; each datum's step still uniform) or ``"importance"`` (r(t) ∝
            √E[ℓ_t²] from a running history once every step has been seen ``warmup`` times;
            uniform before; each estimate stays unbiased, r being fixed before t is drawn).
        warmup, decay, uniform_mix: the importance sampler's history (observations per step
            before use; weight of the old value in the moving average; share of the uniform
            distribution mixed in, keeping r(t) > 0).
        minimize_variance: send the gradient of the estimator's second moment, not of the
            bound, to a learned schedule's shape parameters (continuous time only, where the
            bound does not depend on the shape; default: on in continuous time).  The shape
            outputs' gradients are multiplied by 2 L (detached), an unbiased estimate of
            ∇ Var[L] up to a constant.
    """

    def __init__(
        self,
        num_steps: int | None = None,
        times: str = "uniform",
        *,
        warmup: int = 10,
        decay: float = 0.9,
        uniform_mix: float = 1e-3,
        minimize_variance: bool | None = None,
    ) -> None:
        super().__init__(num_steps, times)
        if not isinstance(uniform_mix, (int, float)) or not 0 < uniform_mix <= 1:
            raise ValueError(f"uniform_mix: expected a value in (0, 1], got {uniform_mix!r}")
        if not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"decay: expected a value in [0, 1), got {decay!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup: expected a non-negative integer, got {warmup!r}")
        continuous = self.num_steps == 0
        if minimize_variance and not continuous:
            raise ValueError(
                "minimize_variance: only in continuous time (num_steps=0), where the bound ignores the shape"
            )
        if times == "importance" and continuous:
            raise ValueError("times: 'importance' needs a grid (num_steps=None or T), not continuous time")
        self.minimize_variance = continuous if minimize_variance is None else bool(minimize_variance)
        self.warmup = warmup
        self.decay = decay
        self.uniform_mix = uniform_mix
        self._second_moment: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    @property
    def importance(self) -> bool:
        return self.times == "importance"

    def make_draw(self) -> StepDraw:
        return StepDraw(self.times, probabilities=self.step_probabilities if self.importance else None)

    def step_probabilities(self, num_candidates: int, device, dtype=torch.float32) -> torch.Tensor:
        """r over the n candidate steps of the grid, ``(n,)``."""
        uniform = torch.full((num_candidates,), 1.0 / num_candidates, device=device, dtype=dtype)
        if self._second_moment is None or self._second_moment.shape[0] != num_candidates:
            return uniform
        weights = self._second_moment.to(device=device, dtype=dtype).sqrt()
        weights = weights / weights.sum().clamp(min=torch.finfo(dtype).tiny)
        weights = (1 - self.uniform_mix) * weights + self.uniform_mix * uniform
        ready = (self._counts >= self.warmup).all().to(device)
        return torch.where(ready, weights, uniform)

    def _record(self, offset: torch.Tensor, terms: torch.Tensor, num_candidates: int) -> None:
        values = terms.detach().to(torch.float64) ** 2
        if self._second_moment is None or self._second_moment.shape[0] != num_candidates:
            self._second_moment = torch.zeros(num_candidates, dtype=torch.float64, device=offset.device)
            self._counts = torch.zeros(num_candidates, dtype=torch.long, device=offset.device)
        sums = torch.zeros_like(self._second_moment).index_add_(0, offset, values)
        counts = torch.zeros_like(self._counts).index_add_(0, offset, torch.ones_like(offset))
        batch_mean = sums / counts.clamp(min=1)
        updated = torch.where(
            self._counts == 0, batch_mean, self.decay * self._second_moment + (1 - self.decay) * batch_mean
        )
        self._second_moment = torch.where(counts > 0, updated, self._second_moment)
        self._counts = self._counts + counts

    def per_datum(self, model_trace, guide_trace, draw) -> torch.Tensor:
        terms = trace_terms(model_trace, guide_trace)
        total = _per_datum_sum(terms)
        levels = draw.drawn
        if self.importance and levels is not None and levels.index is not None:
            # the step's own term ℓ_t (unweighted) per datum, for the history
            step = terms.get("x_s", torch.zeros_like(total))
            if levels.on_decoder is not None and "x_0" in terms:
                step = torch.where(levels.on_decoder, terms["x_0"], step)
            self._record(
                levels.index - levels.first, step / levels.weight.to(step.dtype), levels.num_candidates
            )
        if self.minimize_variance and levels is not None and torch.is_grad_enabled() and total.requires_grad:
            factor = 2 * total.detach()
            for output in levels.shape_outputs:
                if output.requires_grad:
                    output.register_hook(lambda grad, factor=factor: grad * factor.to(grad.dtype))
        return total


def _eps_terms(model_trace, guide_trace, draw) -> torch.Tensor:
    """‖ε − ε̂‖² per datum at the step's upper level x_t, masked as the guide's ``x_t`` site and
    scaled by its scale relative to the draw's own 1/r(t) (so a user's scale counts, not r)."""
    site = guide_trace.nodes["x_t"]
    base = site["fn"]
    while hasattr(base, "base_dist"):
        base = base.base_dist
    eps = (site["value"] - base.loc) / base.scale
    eps_hat = model_trace.nodes["eps_hat"]["value"]
    squared = ((eps - eps_hat) ** 2).reshape(eps.shape[0], -1).sum(1)
    scale = site["scale"]
    if isinstance(scale, torch.Tensor):
        scale = scale / draw.drawn.weight.to(scale.dtype)
    else:
        scale = scale / draw.drawn.weight
    return scale_and_mask(
        squared, scale.to(squared.dtype) if isinstance(scale, torch.Tensor) else scale, site["mask"]
    )


class SimplifiedLoss(_StepLoss):
    r"""L_simple = ‖ε − ε̂_θ(x_t, γ_t)‖² per datum, the step uniform over the grid (or over
    [0, 1] with ``num_steps=0``).  Summed over the datum's dimensions and the batch.  With
    ε-prediction and fixed variances it equals the per-step KLs with step t's weight changed from
    1 to 1/λ_t, up to constants (``docs/derivation.md``).  Not a bound on −log p, so a learned
    schedule gets no gradient from it: the noise levels of its draws are detached."""

    def __init__(self, num_steps: int | None = None, times: str = "uniform") -> None:
        if times == "importance":
            raise ValueError(
                "times: L_simple draws its steps uniformly ('uniform' or 'low-discrepancy'), got 'importance'"
            )
        super().__init__(num_steps, times)

    def make_draw(self) -> StepDraw:
        return _DetachedLevels(self.times)

    def per_datum(self, model_trace, guide_trace, draw) -> torch.Tensor:
        return _eps_terms(model_trace, guide_trace, draw)


class _DetachedLevels(StepDraw):
    """A :class:`StepDraw` whose noise levels carry no gradient to the schedule."""

    def _draw(self, diffusion, num_steps, batch, device):
        levels = super()._draw(diffusion, num_steps, batch, device)
        fields = ("gamma_t", "gamma_s", "rate", "gamma_1", "gamma_T")
        detached = {f: getattr(levels, f).detach() for f in fields if getattr(levels, f) is not None}
        return levels._replace(shape_outputs=(), **detached)


class HybridLoss(_StepLoss):
    r"""Improved DDPM's hybrid objective L_simple + λ·L_vlb per datum, one step per datum: the
    vlb part is the one-step −ELBO estimate with the reverse means built from a detached x̂, so
    it trains only the variance (``variance="learned"``).

    Args:
        vlb_weight: λ (Improved DDPM: 0.001).
        num_steps: the grid (None: the model's own).
    """

    def __init__(self, vlb_weight: float = 1e-3, num_steps: int | None = None) -> None:
        super().__init__(num_steps, "uniform")
        if (
            isinstance(vlb_weight, bool)
            or not isinstance(vlb_weight, (int, float))
            or not (math.isfinite(vlb_weight) and vlb_weight >= 0)
        ):
            raise ValueError(f"vlb_weight: expected a finite λ >= 0, got {vlb_weight!r}")
        self.vlb_weight = float(vlb_weight)

    def make_draw(self) -> StepDraw:
        return StepDraw("uniform", detach_mean=True)

    def per_datum(self, model_trace, guide_trace, draw) -> torch.Tensor:
        simple = _eps_terms(model_trace, guide_trace, draw)
        return simple + self.vlb_weight * _per_datum_sum(trace_terms(model_trace, guide_trace))
