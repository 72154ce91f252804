"""Bayesian workflows with a trained diffusion: the reverse chain as a prior inside other Pyro
models, conditioning on linear observations of x_0, and hand-over to ArviZ.

Every method takes any :class:`~pyro_diffusion.diffusion.Diffusion` (a DDPM from
``GaussianDiffusion``, or a continuous-time model with a learned schedule) and a
``num_steps`` argument: None runs on the model's own grid of noise levels, K on
``diffusion.grid(K)`` (for a tabulated DDPM schedule a respaced sub-grid of its steps).

* :mod:`.prior` — :class:`DiffusionPrior`: scoped sites, frozen weights, plates.
* :mod:`.observations` — :class:`LinearObservation`: ``y = A x_0 + σ_y ε`` (mask, denoising, blur, any A).
* :mod:`.smc` — twisted SMC (Wu et al. 2023) as a batched particle loop, ESS per step.
* :mod:`.nuts` — NUTS over the whole (non-centred) chain with :class:`pyro.infer.MCMC`.
* :mod:`.svi` — SVI with a guide over x_0 and the forward chain over x_{1:K}.
* :mod:`.variances` — per-level reverse variances estimated from the network (Analytic-DPM),
  for ``reverse_variance=`` of twisted SMC and MCGdiff.
* :mod:`.mcgdiff` — SMC with proposals from the observation in the noised space (MCGdiff),
  batched independent runs.
* :mod:`.ddrm` — DDRM for linear observations (SVD of A).
* :mod:`.heuristics` — replacement (masks, and any A through its SVD) and DPS baselines.
* :mod:`.mixture` — exact posteriors in any dimension: Gaussian-mixture priors, their exact
  denoiser, the posterior mixture, sliced Wasserstein and mode-weight metrics.
* :mod:`.result` — :class:`PosteriorResult`, what every method above returns.
* :mod:`.exact` — the exact conditional of the 2-D mixture, energy distance.
* :mod:`.arviz` — conversion to ``arviz.InferenceData`` and the paired comparison of bounds.
* :mod:`.pretrained` — the small cached models used by the examples and docs.

The ArviZ conversion is imported lazily (``from pyro_diffusion.inference import arviz``).
"""

from .ddrm import ddrm_sample
from .exact import energy_distance, energy_distance_se, mixture_conditional, mixture_evidence
from .heuristics import dps_sample, replacement_sample
from .mcgdiff import mcgdiff
from .mixture import (
    DiagonalMixture,
    MixtureDenoiser,
    mixture_diffusion,
    mixture_posterior,
    mode_weight_error,
    random_problem,
    sliced_wasserstein,
)
from .nuts import conditional_model, noise_from_draws, noise_model, nuts_conditional
from .observations import LinearObservation
from .prior import DiffusionPrior
from .result import PosteriorResult
from .smc import twisted_smc
from .svi import MonteCarloNormal, chain_guide, svi_conditional
from .variances import ReverseVariances, analytic_variances, ancestral_sample

__all__ = [
    "DiffusionPrior",
    "LinearObservation",
    "PosteriorResult",
    "twisted_smc",
    "mcgdiff",
    "ddrm_sample",
    "nuts_conditional",
    "conditional_model",
    "noise_model",
    "noise_from_draws",
    "svi_conditional",
    "chain_guide",
    "MonteCarloNormal",
    "replacement_sample",
    "dps_sample",
    "mixture_conditional",
    "mixture_evidence",
    "energy_distance",
    "energy_distance_se",
    "DiagonalMixture",
    "MixtureDenoiser",
    "mixture_diffusion",
    "mixture_posterior",
    "random_problem",
    "sliced_wasserstein",
    "mode_weight_error",
    "analytic_variances",
    "ReverseVariances",
    "ancestral_sample",
]
