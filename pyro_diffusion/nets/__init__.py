"""Denoiser networks ``denoiser(x_t, t)`` with 1-based integer steps t."""

from .embedding import StepEmbedding
from .mlp import MLPDenoiser
from .unet import UNetDenoiser

__all__ = ["StepEmbedding", "MLPDenoiser", "UNetDenoiser"]
