"""Bayesian workflows with a trained diffusion: the reverse chain as a prior inside other Pyro
models, conditioning on linear observations of x_0, and hand-over to ArviZ.

* :mod:`.prior` — :class:`DiffusionPrior`: scoped sites, frozen weights, plates.
* :mod:`.observations` — :class:`LinearObservation`: ``y = A x_0 + σ_y ε`` (mask, denoising, blur, any A).
* :mod:`.smc` — twisted SMC (Wu et al. 2023) on :class:`pyro.infer.SMCFilter`, ESS per step.
* :mod:`.nuts` — NUTS over the whole (non-centred) chain with :class:`pyro.infer.MCMC`.
* :mod:`.svi` — SVI with a guide over x_0 and the forward chain over x_{1:T}.
* :mod:`.heuristics` — replacement and DPS baselines.
* :mod:`.exact` — the exact conditional of the 2-D mixture, energy distance.
* :mod:`.arviz` — conversion to ``arviz.InferenceData`` and the paired comparison of bounds.
* :mod:`.pretrained` — the small cached models used by the examples and docs.

The ArviZ conversion is imported lazily (``from pyro_diffusion.inference import arviz``).
"""

from .exact import energy_distance, energy_distance_se, mixture_conditional, mixture_evidence
from .heuristics import dps_sample, replacement_sample
from .nuts import NUTSResult, conditional_model, nuts_conditional
from .observations import LinearObservation
from .prior import DiffusionPrior, predict_x0, reverse_step
from .smc import SMCResult, twisted_smc
from .svi import SVIResult, chain_guide, svi_conditional

__all__ = [
    "DiffusionPrior",
    "reverse_step",
    "predict_x0",
    "LinearObservation",
    "twisted_smc",
    "SMCResult",
    "nuts_conditional",
    "conditional_model",
    "NUTSResult",
    "svi_conditional",
    "chain_guide",
    "SVIResult",
    "replacement_sample",
    "dps_sample",
    "mixture_conditional",
    "mixture_evidence",
    "energy_distance",
    "energy_distance_se",
]
