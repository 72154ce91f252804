"""pyro_diffusion: denoising diffusion models as probabilistic programs in Pyro.

The forward (noising) chain is a Pyro guide, the learned reverse chain a Pyro model, over the
same sites ``x_T … x_1, x_0``; ``pyro.infer.SVI`` optimizes the full ELBO.
"""

from .bound import bits_per_dim, prior_term, q_sample, step_terms, vlb_terms
from .chains import ForwardChain, ReverseChain, site_name
from .data import GaussianMixture2D, load_dataset
from .decoders import DiscretizedGaussian
from .diffusion import GaussianDiffusion
from .losses import HybridLoss, SimplifiedLoss, StepSubsampledELBO
from .nets import MLPDenoiser, UNetDenoiser
from .optim import FusedAdam, FusedOptim
from .sampling import ancestral_sample
from .schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "NoiseSchedule",
    "GaussianDiffusion",
    "ForwardChain",
    "ReverseChain",
    "site_name",
    "StepSubsampledELBO",
    "SimplifiedLoss",
    "HybridLoss",
    "vlb_terms",
    "step_terms",
    "prior_term",
    "q_sample",
    "bits_per_dim",
    "ancestral_sample",
    "DiscretizedGaussian",
    "MLPDenoiser",
    "UNetDenoiser",
    "GaussianMixture2D",
    "load_dataset",
    "FusedOptim",
    "FusedAdam",
]
