"""Networks called as ``network(z, γ)`` with γ the noise level, and the adapter for networks
written for integer DDPM steps."""

from .adapters import StepIndexed
from .embedding import NoiseLevelEmbedding
from .mlp import MLPDenoiser
from .unet import UNetDenoiser

__all__ = ["NoiseLevelEmbedding", "MLPDenoiser", "UNetDenoiser", "StepIndexed"]
