r"""Learned noise schedules and the continuous-time bound (Variational Diffusion Models).

The chain is written through γ(t) = −log SNR(t) on t ∈ [0, 1] (:mod:`.schedules`); the
bound in discrete time (T steps) and in continuous time (T → ∞), its Pyro model and guide
(:mod:`.diffusion`), and the losses for ``SVI`` with low-discrepancy times and VDM's
variance-minimizing gradient for the schedule's shape (:mod:`.losses`).  See
``docs/learned_schedules.md``.
"""

from .diffusion import (
    BoundEstimate,
    BoundTerms,
    ContinuousDiffusion,
    NoiseLevelDenoiser,
    discrete_times,
    snr_step_kl,
)
from .losses import (
    ContinuousSimplifiedLoss,
    ContinuousTimeELBO,
    DiscreteTimeELBO,
    low_discrepancy_times,
    uniform_times,
)
from .schedules import (
    CosineGamma,
    GammaAt,
    GammaSchedule,
    LearnedGamma,
    LinearGamma,
    TabulatedGamma,
    alpha_sigma,
)

__all__ = [
    "GammaAt",
    "GammaSchedule",
    "LinearGamma",
    "CosineGamma",
    "TabulatedGamma",
    "LearnedGamma",
    "alpha_sigma",
    "NoiseLevelDenoiser",
    "ContinuousDiffusion",
    "BoundTerms",
    "BoundEstimate",
    "snr_step_kl",
    "discrete_times",
    "ContinuousTimeELBO",
    "DiscreteTimeELBO",
    "ContinuousSimplifiedLoss",
    "low_discrepancy_times",
    "uniform_times",
]
