"""pyro_diffusion: denoising diffusion models as probabilistic programs in Pyro.

The forward (noising) chain is a Pyro guide, the learned reverse chain a Pyro model, over the
same sites ``x_T … x_1, x_0``, on a grid of noise levels γ = −log SNR; ``pyro.infer.SVI``
optimizes the full ELBO by running them.
"""

from .bound import (
    BoundEstimate,
    bits_per_dim,
    bound,
    importance_weighted_bound,
    nll,
    prior_term,
    vlb_terms,
)
from .chains import StepDraw, site_name
from .decoders import DiscretizedGaussian
from .diffusion import Diffusion, GaussianDiffusion
from .losses import DiffusionELBO, HybridLoss, SimplifiedLoss
from .nets import MLPDenoiser, StepIndexed, UNetDenoiser
from .samplers import ancestral, ddim, sample
from .schedules import CosineGamma, LearnedGamma, LinearGamma, NoiseSchedule, Schedule

__version__ = "0.2.0"

__all__ = [
    "importance_weighted_bound",
    "Schedule",
    "NoiseSchedule",
    "LinearGamma",
    "CosineGamma",
    "LearnedGamma",
    "Diffusion",
    "GaussianDiffusion",
    "StepDraw",
    "site_name",
    "DiffusionELBO",
    "SimplifiedLoss",
    "HybridLoss",
    "vlb_terms",
    "nll",
    "bound",
    "BoundEstimate",
    "prior_term",
    "bits_per_dim",
    "ancestral",
    "ddim",
    "sample",
    "DiscretizedGaussian",
    "MLPDenoiser",
    "UNetDenoiser",
    "StepIndexed",
]
