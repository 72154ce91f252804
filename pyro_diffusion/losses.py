r"""Losses that drop into ``pyro.infer.SVI(model, guide, optim, loss)``.

All are :class:`pyro.infer.ELBO` subclasses, so they also work as ``loss(model_module,
guide_module)`` → ``ELBOModule`` for plain PyTorch loops.  They take the chain pair of one
:class:`~pyro_diffusion.GaussianDiffusion` (``diffusion.model``/``diffusion.guide`` or the
``ReverseChain``/``ForwardChain`` modules) and evaluate the bound through the same step
distributions the chains use.  Losses are sums over the batch, as Pyro's ELBOs are.

* :class:`StepSubsampledELBO` — DESIGN.md §4: per datum one step ``t ~ r(t)`` and
  ``x_t ~ q(x_t | x_0)``; returns ``ℓ_t / r(t) + L_T``, unbiased for −ELBO, one network call.
  ``r`` uniform, or (``importance=True``) ∝ √E[ℓ_t²] from a running history (Improved DDPM).
* :class:`SimplifiedLoss` — DESIGN.md §5: ``‖ε − ε_θ(x_t, t)‖²`` with t uniform.  Not a bound.
* :class:`HybridLoss` — Improved DDPM's ``L_simple + λ L_vlb`` with the vlb term's mean
  stopped, so that the vlb term trains only the learned variances.
"""

from __future__ import annotations

import weakref

import pyro
import torch
from pyro.infer import ELBO
from pyro.poutine.runtime import _PYRO_STACK

from .bound import prior_term, q_sample, step_terms_given
from .chains import ForwardChain, ReverseChain
from .parameterization import predict_eps

__all__ = ["StepSubsampledELBO", "SimplifiedLoss", "HybridLoss", "diffusion_of"]


def diffusion_of(model, guide):
    """The GaussianDiffusion behind a (model, guide) pair of its chains, or a TypeError."""
    from .diffusion import GaussianDiffusion

    def owner(program, role):
        if isinstance(program, ReverseChain):
            return program.diffusion
        if isinstance(program, ForwardChain):
            return program._diffusion
        bound_to = getattr(program, "__self__", None)
        if isinstance(bound_to, GaussianDiffusion):
            return bound_to
        raise TypeError(
            f"{role}: expected a GaussianDiffusion's {role} (diffusion.{role} or its "
            f"nn.Module form), got {program!r:.80}"
        )

    model_owner, guide_owner = owner(model, "model"), owner(guide, "guide")
    if model_owner is not guide_owner:
        raise ValueError("model, guide: expected the two chains of the same GaussianDiffusion")
    return model_owner


def _needs_register(diffusion) -> bool:
    """Whether ``diffusion.register()`` has anything to do this call.

    It must run whenever a Pyro handler is active (``SVI`` finds the parameters to optimize
    through ``poutine.trace(param_only=True)``), and whenever the param store does not hold
    this diffusion's parameters.  In a plain PyTorch loop over the ``ELBOModule`` (no handler,
    parameters already in the store) it is skipped: it costs about as much as the optimizer
    step of a small network (``docs/benchmarks.md``)."""
    if _PYRO_STACK:
        return True
    # the first trainable parameter and its store name, cached per diffusion (looking it up
    # walks the module tree); recomputed when the name or the denoiser changes
    cached = _FIRST_PARAMETER.get(diffusion)
    if cached is None or cached[0] != diffusion.name or cached[1] is not diffusion.denoiser:
        first = next((item for item in diffusion.named_parameters() if item[1].requires_grad), None)
        key = None if first is None else f"{diffusion.name}$$${first[0]}"
        cached = (diffusion.name, diffusion.denoiser, key, None if first is None else first[1])
        _FIRST_PARAMETER[diffusion] = cached
    _, _, key, param = cached
    if key is None:
        return False
    return pyro.get_param_store()._params.get(key) is not param


_FIRST_PARAMETER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _DiffusionLoss(ELBO):
    """Shared plumbing: find the diffusion, check data, register parameters, sum per datum.

    Subclasses define ``per_datum(diffusion, x0)``; a loss for another kind of diffusion
    (e.g. :mod:`pyro_diffusion.vdm`) overrides ``owner`` to find it behind (model, guide)."""

    def __init__(self) -> None:
        super().__init__(num_particles=1)

    def owner(self, model, guide):
        """The diffusion whose chains ``model`` and ``guide`` are."""
        return diffusion_of(model, guide)

    def per_datum(self, diffusion, x0: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - no traces here
        raise NotImplementedError(
            f"{type(self).__name__} evaluates the bound in closed form; it makes no traces"
        )

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        diffusion = self.owner(model, guide)
        x0 = args[0] if args else kwargs.get("x0")
        if x0 is None:
            raise ValueError("x0: these losses need data; got None")
        diffusion.check_data(x0)
        if _needs_register(diffusion):
            diffusion.register()
        return self.per_datum(diffusion, x0).sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> torch.Tensor:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.detach()


def _uniform_steps(x0: torch.Tensor, num_steps: int) -> torch.Tensor:
    return torch.randint(1, num_steps + 1, (x0.shape[0],), device=x0.device)


class StepSubsampledELBO(_DiffusionLoss):
    r"""Unbiased one-step estimate of −ELBO per datum (DESIGN.md §4).

    For each datum, draw ``t ~ r(t)`` and ``x_t ~ q(x_t | x_0)`` and return
    ``ℓ_t / r(t) + L_T``, where ``Σ_t ℓ_t + L_T = −ELBO`` in expectation.  One batched network
    call per evaluation, whatever T is.

    Args:
        importance: draw t with probability ∝ √E[ℓ_t²] (Improved DDPM), estimated by an
            exponential moving average of ℓ_t² once every step has been seen ``warmup`` times;
            uniform before that.  Each estimate stays unbiased: r is fixed before t is drawn.
        warmup: number of observations of each step before importance weights are used.
        decay: weight of the old value in the moving average of ℓ_t².
        uniform_mix: share of the uniform distribution mixed into r (keeps r(t) > 0).
    """

    def __init__(
        self, importance: bool = False, warmup: int = 10, decay: float = 0.9, uniform_mix: float = 1e-3
    ) -> None:
        super().__init__()
        if not 0 < uniform_mix <= 1:
            raise ValueError(f"uniform_mix: expected a value in (0, 1], got {uniform_mix}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay: expected a value in [0, 1), got {decay}")
        self.importance = importance
        self.warmup = warmup
        self.decay = decay
        self.uniform_mix = uniform_mix
        self._second_moment: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def step_probabilities(self, num_steps: int, device, dtype=torch.float32) -> torch.Tensor:
        """r(t) for t = 1..T as a ``(T,)`` tensor."""
        uniform = torch.full((num_steps,), 1.0 / num_steps, device=device, dtype=dtype)
        if not self.importance or self._second_moment is None:
            return uniform
        weights = self._second_moment.to(dtype).sqrt()
        weights = weights / weights.sum().clamp(min=torch.finfo(dtype).tiny)
        weights = (1 - self.uniform_mix) * weights + self.uniform_mix * uniform
        ready = (self._counts >= self.warmup).all()
        return torch.where(ready, weights, uniform)

    def _record(self, t: torch.Tensor, terms: torch.Tensor, num_steps: int) -> None:
        values = terms.detach().to(torch.float64) ** 2
        if self._second_moment is None or self._second_moment.shape[0] != num_steps:
            self._second_moment = torch.zeros(num_steps, dtype=torch.float64, device=t.device)
            self._counts = torch.zeros(num_steps, dtype=torch.long, device=t.device)
        index = t - 1
        sums = torch.zeros_like(self._second_moment).index_add_(0, index, values)
        counts = torch.zeros_like(self._counts).index_add_(0, index, torch.ones_like(index))
        seen = counts > 0
        batch_mean = sums / counts.clamp(min=1)
        first = self._counts == 0
        updated = torch.where(
            first, batch_mean, self.decay * self._second_moment + (1 - self.decay) * batch_mean
        )
        self._second_moment = torch.where(seen, updated, self._second_moment)
        self._counts = self._counts + counts

    def per_datum(self, diffusion, x0):
        T = diffusion.num_steps
        if self.importance:
            probs = self.step_probabilities(T, x0.device, torch.float32)
            t = torch.multinomial(probs, x0.shape[0], replacement=True) + 1
        else:
            t = _uniform_steps(x0, T)
        x_t, _ = q_sample(diffusion.schedule, x0, t)
        loc, log_var, _ = diffusion.reverse_mean_log_variance(x_t, t)
        terms = step_terms_given(diffusion, x0, t, x_t, loc, log_var)
        if self.importance:
            self._record(t, terms, T)
            weighted = terms / probs[t - 1].to(terms.dtype)
        else:
            weighted = terms * T  # 1 / r(t) with r uniform
        return weighted + prior_term(diffusion.schedule, x0)


class SimplifiedLoss(_DiffusionLoss):
    r"""L_simple = ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² per datum, t ~ U{1..T} (DESIGN.md §5).

    Summed over the datum's dimensions (and over the batch).  With ε-prediction and fixed
    σ_t it equals the per-step KLs with step t's weight changed from 1 to 1/λ_t, up to
    constants (see ``docs/derivation.md``).  Not a bound on −log p."""

    def per_datum(self, diffusion, x0):
        t = _uniform_steps(x0, diffusion.num_steps)
        x_t, noise = q_sample(diffusion.schedule, x0, t)
        eps = diffusion.predict_eps(x_t, t)
        return ((noise - eps) ** 2).reshape(x0.shape[0], -1).sum(1)


class HybridLoss(_DiffusionLoss):
    r"""Improved DDPM's hybrid objective L_simple + λ·L_vlb per datum.

    With one draw of t ~ U{1..T}: ``‖ε − ε_θ‖² + λ·T·ℓ_t``, where ℓ_t is evaluated with the
    reverse mean detached, so the vlb term trains only the variance (``variance="learned"``).

    Args:
        vlb_weight: λ (Improved DDPM: 0.001).
    """

    def __init__(self, vlb_weight: float = 1e-3) -> None:
        super().__init__()
        if vlb_weight < 0:
            raise ValueError(f"vlb_weight: expected λ >= 0, got {vlb_weight}")
        self.vlb_weight = vlb_weight

    def per_datum(self, diffusion, x0):
        T = diffusion.num_steps
        t = _uniform_steps(x0, T)
        x_t, noise = q_sample(diffusion.schedule, x0, t)
        loc, log_var, mean_output = diffusion.reverse_mean_log_variance(x_t, t)
        eps = predict_eps(diffusion.schedule, diffusion.mean, x_t, t, mean_output)
        simple = ((noise - eps) ** 2).reshape(x0.shape[0], -1).sum(1)
        vlb = step_terms_given(diffusion, x0, t, x_t, loc.detach(), log_var)
        return simple + self.vlb_weight * T * vlb
