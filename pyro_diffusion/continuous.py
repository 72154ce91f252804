"""Alias of :mod:`pyro_diffusion.vdm` (learned schedules and the continuous-time bound)."""

from .vdm import *  # noqa: F401,F403
from .vdm import __all__  # noqa: F401
