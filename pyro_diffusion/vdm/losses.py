r"""The discrete- and continuous-time bounds as losses for ``pyro.infer.SVI``.

Both take the chain pair of one :class:`~pyro_diffusion.vdm.ContinuousDiffusion`
(``vdm.model``, ``vdm.guide``) and return, per datum, one unbiased draw of −ELBO
(``L_diffusion + L_decoder + L_prior``), summed over the batch as Pyro's ELBOs are:

* :class:`ContinuousTimeELBO` — ``½ γ'(t) ‖ε − ε̂_θ(z_t)‖²`` with ``t ~ U(0, 1)``;
* :class:`DiscreteTimeELBO` — ``T/2 · expm1(γ(t_i) − γ(t_{i−1})) ‖ε − ε̂_θ(z_{t_i})‖²`` with
  ``i ~ U{1..T}``.

Times are drawn with **low-discrepancy sampling** by default (VDM): one ``u ~ U(0, 1)`` per
batch and ``t_k = (u + k/B) mod 1``.  Each t_k is marginally uniform, so every datum's term
stays unbiased; the batch covers [0, 1] evenly, which lowers the variance of the batch sum.

**Variance minimization for the schedule's shape** (``minimize_variance=True``, VDM §4.1 /
appendix): the continuous-time bound depends on the schedule only through γ(0) and γ(1), so
E[L] has zero gradient with respect to the shape ŝ; the shape can instead be trained to
minimize the estimator's variance Var[L] = E[L²] − E[L]², whose gradient is ∇E[L²] =
E[2 L ∇L].  The loss does this in the same backward pass: it hangs a hook on the shape's
outputs ŝ(t_k), ŝ'(t_k) that multiplies the gradient arriving there by ``2 L_k`` (detached).
The endpoints and the denoiser keep the gradient of the bound; the shape parameters receive
the gradient of Σ_k L_k², an unbiased estimate of ∇(B·Var[L]).  (In discrete time the bound
does depend on the shape, so :class:`DiscreteTimeELBO` trains it on the bound by default.)
"""

from __future__ import annotations

import torch

from ..losses import _DiffusionLoss
from .diffusion import ContinuousDiffusion, _sum_event

__all__ = [
    "ContinuousTimeELBO",
    "DiscreteTimeELBO",
    "ContinuousSimplifiedLoss",
    "low_discrepancy_times",
    "uniform_times",
]


def uniform_times(batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``batch`` independent draws t ~ U(0, 1), float64."""
    return torch.rand(batch, dtype=torch.float64, device=device, generator=generator)


def low_discrepancy_times(batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``t_k = (u + k/B) mod 1`` for k = 0..B−1 with one u ~ U(0, 1): each t_k ~ U(0, 1)
    marginally, and the B times are evenly spaced (VDM's low-discrepancy sampler), float64."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive integer, got {batch!r}")
    u = torch.rand((), dtype=torch.float64, device=device, generator=generator)
    return torch.remainder(u + torch.arange(batch, dtype=torch.float64, device=device) / batch, 1.0)


def vdm_of(model, guide) -> ContinuousDiffusion:
    """The ContinuousDiffusion behind ``(vdm.model, vdm.guide)``, or a TypeError."""
    owners = []
    for program, role in ((model, "model"), (guide, "guide")):
        owner = getattr(program, "__self__", None)
        if not isinstance(owner, ContinuousDiffusion):
            raise TypeError(
                f"{role}: expected a ContinuousDiffusion's {role} (vdm.{role}), got {program!r:.80}"
            )
        owners.append(owner)
    if owners[0] is not owners[1]:
        raise ValueError("model, guide: expected the two chains of the same ContinuousDiffusion")
    return owners[0]


class _VDMLoss(_DiffusionLoss):
    """The core losses' plumbing (:class:`pyro_diffusion.losses._DiffusionLoss`) for a
    :class:`ContinuousDiffusion`, with uniform or low-discrepancy times."""

    def __init__(self, low_discrepancy: bool = True) -> None:
        super().__init__()
        self.low_discrepancy = low_discrepancy

    def owner(self, model, guide) -> ContinuousDiffusion:
        return vdm_of(model, guide)

    def times(self, x0: torch.Tensor) -> torch.Tensor:
        sampler = low_discrepancy_times if self.low_discrepancy else uniform_times
        return sampler(x0.shape[0], device=x0.device)


class _BoundLoss(_VDMLoss):
    num_steps: int | None = None

    def __init__(self, low_discrepancy: bool = True, minimize_variance: bool = True) -> None:
        super().__init__(low_discrepancy)
        self.minimize_variance = minimize_variance

    def per_datum(self, vdm, x0):
        terms = vdm.loss_terms(x0, self.times(x0), self.num_steps)
        total = terms.total
        if self.minimize_variance and torch.is_grad_enabled() and total.requires_grad:
            factor = 2 * total.detach()
            for output in terms.shape_outputs:
                if output.requires_grad:
                    # entries k and B + k belong to datum k when times were stacked (discrete)
                    repeat = output.shape[0] // factor.shape[0]
                    scale = factor.repeat(repeat).to(output.dtype)
                    output.register_hook(lambda grad, scale=scale: grad * scale)
        return total


class ContinuousTimeELBO(_BoundLoss):
    r"""Unbiased one-draw estimate of the continuous-time −ELBO per datum (T → ∞):

        ½ γ'(t) ‖ε − ε̂_θ(z_t, γ(t))‖² + L_decoder + L_prior,   t ~ U(0, 1), ε ~ N(0, I).

    Args:
        low_discrepancy: draw the batch's times evenly spaced with a random shift (default).
        minimize_variance: send the gradient of the estimator's second moment, not of the
            bound, to the schedule's shape parameters (module docstring).  The bound is
            invariant to the shape in continuous time, so this changes no expectation.
    """


class DiscreteTimeELBO(_BoundLoss):
    r"""Unbiased one-draw estimate of the T-step −ELBO per datum:

        T/2 · expm1(γ(t_i) − γ(t_{i−1})) ‖ε − ε̂_θ(z_{t_i})‖² + L_decoder + L_prior,
        i ~ U{1..T}, t_i = i/T.

    Args:
        num_steps: T.
        low_discrepancy: as in :class:`ContinuousTimeELBO` (times rounded up to the grid).
        minimize_variance: default False: for finite T the bound depends on the shape, which
            is then trained on the bound.
    """

    def __init__(self, num_steps: int, low_discrepancy: bool = True, minimize_variance: bool = False) -> None:
        super().__init__(low_discrepancy, minimize_variance)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: expected a positive integer T, got {num_steps!r}")
        self.num_steps = num_steps


class ContinuousSimplifiedLoss(_VDMLoss):
    r"""L_simple on a γ-schedule: ‖ε − ε̂_θ(z_t, γ(t))‖² per datum with t ~ U(0, 1)
    (DDPM's objective, uniform in time).  Not a bound; trains only the denoiser (a learned
    schedule gets no gradient from it except through z_t)."""

    def per_datum(self, vdm, x0):
        with torch.no_grad():
            gamma = vdm.schedule(self.times(x0)).gamma
        z, noise = vdm.diffuse(x0, gamma)
        return _sum_event((noise - vdm.predict_eps(z, gamma)) ** 2)
