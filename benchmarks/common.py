"""Shared pieces of the benchmarks: problems, interleaved timing, peak memory, result rows.

Timing: every variant of one comparison runs in the same process, one block of ``inner``
calls per variant in turn, ``reps`` rounds (A B C A B C …), so that a burst of load on the
shared machine hits every variant alike.  A figure is the median over rounds of the time
per call; a ratio is the median over rounds of the per-round ratio (paired, so slow drifts
of the machine cancel).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the
call; on CPU the rise of the process's peak resident set (``VmHWM`` in
``/proc/self/status``, reset by writing 5 to ``/proc/self/clear_refs``) above the resident
set before the call.  The CPU figure is coarse (allocator caching, page granularity) and is
``None`` where ``/proc`` does not allow it.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pyro_diffusion import Diffusion, GaussianDiffusion, MLPDenoiser, NoiseSchedule, UNetDenoiser
from pyro_diffusion.data import load_dataset

__all__ = [
    "SIZES",
    "Problem",
    "Row",
    "ModelModule",
    "GuideModule",
    "make_problem",
    "interleaved",
    "median",
    "paired_ratio",
    "peak_memory_mb",
    "sync",
]

SIZES = ("mlp2d", "digits", "unet32")


@dataclass
class Problem:
    """One benchmark problem: a diffusion with its network and a batch of data."""

    name: str
    diffusion: Diffusion
    x0: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.x0.device


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    size: str
    variant: str
    ms: float | None = None  # median time per call
    ratio: float | None = None  # median paired ratio against the benchmark's baseline
    peak_mb: float | None = None
    note: str = ""

    def cells(self) -> list[str]:
        def fmt(value, spec):
            return "-" if value is None else format(value, spec)

        return [
            self.benchmark,
            self.size,
            self.variant,
            fmt(self.ms, ".3f"),
            fmt(self.ratio, ".3f"),
            fmt(self.peak_mb, ".1f"),
            self.note,
        ]


class ModelModule(nn.Module):
    """``diffusion.model`` as a plain ``nn.Module`` (its parameters are the diffusion's) that,
    unlike ``diffusion.model_module()``, leaves ``module_local_params`` alone: under the
    default setting every evaluation enters the parameters in Pyro's param store.  Keyword
    arguments (``steps=``, ``num_steps=``, which the losses pass) go through."""

    def __init__(self, diffusion: Diffusion) -> None:
        super().__init__()
        self.diffusion = diffusion

    def forward(self, *args, **kwargs):
        return self.diffusion.model(*args, **kwargs)


class GuideModule(nn.Module):
    """``diffusion.guide`` as an ``nn.Module`` with no parameters of its own (the diffusion is
    held without being registered as a submodule)."""

    def __init__(self, diffusion: Diffusion) -> None:
        super().__init__()
        object.__setattr__(self, "_diffusion", diffusion)

    def forward(self, *args, **kwargs):
        return self._diffusion.guide(*args, **kwargs)


def make_problem(
    size: str,
    device: torch.device | str,
    num_steps: int = 1000,
    batch: int | None = None,
    seed: int = 0,
    decoder: str = "discretized",
) -> Problem:
    """The benchmark problems, all DDPM-style (:func:`~pyro_diffusion.GaussianDiffusion`:
    tabulated linear schedule of ``num_steps`` levels, ε-prediction, σ_t² = β_t, the decoder
    centred at the network's x̂ with variance β̃_2):

    * ``"mlp2d"``: :class:`MLPDenoiser` ``(2,)`` (hidden 128, depth 3) on 2-D two-moons,
      batch 128, Gaussian decoder.
    * ``"digits"``: :class:`UNetDenoiser` ``(1, base=32)`` (multipliers (1, 2)) on
      scikit-learn's 8×8 digits ``(1, 8, 8)``, batch 128, discretized decoder with K = 17.
    * ``"unet32"``: :class:`UNetDenoiser` (base 64, multipliers (1, 2, 2)) on synthetic
      ``(3, 32, 32)`` data with 256 levels, batch 64 (meant for GPUs).

    ``decoder``: ``"discretized"`` (default) or ``"gaussian"`` for the image problems (the
    MLP's is always Gaussian)."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
    if decoder not in ("discretized", "gaussian"):
        raise ValueError(f"decoder: expected 'discretized' or 'gaussian', got {decoder!r}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    schedule = NoiseSchedule.linear(num_steps)
    if size == "mlp2d":
        data = load_dataset("moons", num_train=4096, num_test=16, seed=seed).train
        x0 = data[: batch or 128].float()
        diffusion = GaussianDiffusion(MLPDenoiser(2, hidden=128, depth=3), schedule, (2,))
    elif size == "digits":
        data = load_dataset("digits").train
        x0 = data[: batch or 128].float()
        net = UNetDenoiser(1, base=32, multipliers=(1, 2))
        diffusion = GaussianDiffusion(net, schedule, (1, 8, 8), decoder=decoder, num_levels=17)
    else:
        n = batch or 64
        levels = torch.randint(0, 256, (n, 3, 32, 32), generator=generator)
        x0 = levels.float() / 127.5 - 1
        net = UNetDenoiser(3, base=64, multipliers=(1, 2, 2))
        diffusion = GaussianDiffusion(net, schedule, (3, 32, 32), decoder=decoder, num_levels=256)
    diffusion = diffusion.to(device)
    return Problem(size, diffusion, x0.to(device))


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA timings need it; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    variants: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    reps: int,
    inner: int,
    warmup: int = 2,
) -> tuple[dict[str, list[float]], dict[str, float | None]]:
    """Time each variant in turn, ``reps`` rounds of ``inner`` calls.

    Returns ``(times, peaks)``: per variant the list of per-round milliseconds per call, and
    the peak memory of its last warm-up call (:func:`peak_memory_mb`; the first call of a
    variant also pays for one-off set-up such as caches and lazy imports).  At least two
    warm-up calls are made."""
    peaks: dict[str, float | None] = {}
    for name, fn in variants.items():
        for _ in range(max(1, warmup - 1)):
            fn()
        peaks[name] = peak_memory_mb(fn, device)
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / inner * 1e3)
    return times, peaks


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of ``times[numerator][r] / times[denominator][r]``."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """Hand memory that glibc keeps cached back to the system, so that the next peak is
    measured from what is really in use (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory of one call of ``fn`` above what was in use before it, in MiB (see the
    module docstring for how, on CUDA and on CPU)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) / 1024
