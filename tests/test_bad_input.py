"""Malformed input, case by case: every bad value is refused with one line that names the
argument, and nothing already written is changed.

Tables:

* ``API_CASES`` — the core's public functions (schedules, networks, the diffusion, the bound,
  the samplers, the losses): each call must raise ``ValueError``/``TypeError`` whose message is
  one line naming the argument.
* ``DATA_CASES`` — user data files given to :func:`~pyro_diffusion.data.load_dataset`.
* ``RUN_FILE_CASES`` — run files (checkpoints, JSON) given to :mod:`pyro_diffusion.runs`.
* ``CLI_CASES`` — ``pyro-diffusion`` command lines against a finished run: exit status 2, one
  line on stderr naming the flag, no traceback, every file of the run unchanged byte for byte.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_diffusion as pd
from pyro_diffusion import runs
from pyro_diffusion.chains import StepDraw
from pyro_diffusion.data import load_dataset
from pyro_diffusion.decoders import DiscretizedGaussian
from pyro_diffusion.nets import MLPDenoiser, StepIndexed, UNetDenoiser
from pyro_diffusion.nets.embedding import NoiseLevelEmbedding
from pyro_diffusion.schedules import SCHEDULES, CosineGamma, LearnedGamma, LinearGamma, NoiseSchedule

CORE_FIX_PENDING = "core fix pending"

pytestmark = [  # warnings torch gives while the bad inputs are made, not the behaviour under test
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
]


def _one_line(text: str) -> bool:
    return "\n" not in text.strip()


# ============================================================================ core API
_cache: dict = {}


def diffusion():
    """A tiny DDPM on 2-D vectors, built once."""
    if "diffusion" not in _cache:
        torch.manual_seed(0)
        _cache["diffusion"] = pd.GaussianDiffusion(
            MLPDenoiser(2, hidden=8, depth=1), NoiseSchedule.linear(10), (2,)
        )
    return _cache["diffusion"]


def vdm():
    """A tiny continuous-time diffusion (a function-of-time schedule), built once."""
    if "vdm" not in _cache:
        torch.manual_seed(0)
        _cache["vdm"] = pd.Diffusion(
            MLPDenoiser(2, hidden=8, depth=1), LinearGamma(-5.0, 5.0), (2,), num_steps=8
        )
    return _cache["vdm"]


def x0(n: int = 4) -> torch.Tensor:
    return torch.zeros(n, 2)


def net():
    return MLPDenoiser(2, hidden=8, depth=1)


def sched():
    return NoiseSchedule.linear(10)


NAN = float("nan")
INF = float("inf")

# (id, call, argument the message must name, core fix pending)
API_CASES = [
    # ---- schedules
    ("betas-empty", lambda: NoiseSchedule(torch.tensor([])), "betas", False),
    ("betas-zero", lambda: NoiseSchedule(torch.tensor([0.0, 0.1])), "betas", False),
    ("betas-one", lambda: NoiseSchedule(torch.tensor([0.1, 1.0])), "betas", False),
    ("betas-negative", lambda: NoiseSchedule(torch.tensor([-0.1, 0.1])), "betas", False),
    ("betas-nan", lambda: NoiseSchedule(torch.tensor([NAN, 0.1])), "betas", False),
    ("betas-2d", lambda: NoiseSchedule(torch.full((2, 2), 0.1)), "betas", False),
    ("betas-string", lambda: NoiseSchedule("0.1"), "betas", False),
    ("betas-int", lambda: NoiseSchedule(torch.tensor([1, 2])), "betas", False),
    ("linear-T0", lambda: NoiseSchedule.linear(0), "num_steps", False),
    ("linear-T-negative", lambda: NoiseSchedule.linear(-5), "num_steps", False),
    ("linear-T-float", lambda: NoiseSchedule.linear(2.5), "num_steps", False),
    ("linear-T-bool", lambda: NoiseSchedule.linear(True), "num_steps", False),
    ("linear-beta-start-0", lambda: NoiseSchedule.linear(10, 0.0, 0.02), "beta_start", False),
    ("linear-beta-end-1.5", lambda: NoiseSchedule.linear(10, 1e-4, 1.5), "beta_end", False),
    ("linear-beta-nan", lambda: NoiseSchedule.linear(10, NAN, 0.02), "beta_start", False),
    ("cosine-T0", lambda: NoiseSchedule.cosine(0), "num_steps", False),
    ("cosine-max-beta-0", lambda: NoiseSchedule.cosine(10, max_beta=0.0), "max_beta", False),
    ("cosine-max-beta-1.5", lambda: NoiseSchedule.cosine(10, max_beta=1.5), "max_beta", False),
    ("cosine-offset-negative", lambda: NoiseSchedule.cosine(10, offset=-1.0), "offset", False),
    ("cosine-offset-nan", lambda: NoiseSchedule.cosine(10, offset=NAN), "offset", False),
    ("log-snr-increasing", lambda: NoiseSchedule.from_log_snr(torch.tensor([0.0, 1.0])), "log_snr", False),
    ("log-snr-empty", lambda: NoiseSchedule.from_log_snr(torch.tensor([])), "log_snr", False),
    ("log-snr-nan", lambda: NoiseSchedule.from_log_snr(torch.tensor([1.0, NAN])), "log_snr", False),
    ("gammas-decreasing", lambda: NoiseSchedule.from_gammas(torch.tensor([1.0, 0.0])), "gammas", False),
    ("gammas-inf", lambda: NoiseSchedule.from_gammas(torch.tensor([0.0, INF])), "gammas", False),
    ("grid-negative", lambda: sched().grid(-3), "num_steps", False),
    ("function-grid-none", lambda: LinearGamma().grid(), "num_steps", False),
    ("cosine-T-float", lambda: NoiseSchedule.cosine(2.5), "num_steps", False),
    ("from-gammas-2d", lambda: NoiseSchedule.from_gammas(torch.zeros(2, 2)), "gammas", False),
    ("linear-gamma-reversed", lambda: LinearGamma(5.0, -5.0), "gamma_min", False),
    ("linear-gamma-nan", lambda: LinearGamma(NAN, 5.0), "gamma_min", False),
    ("linear-gamma-inf", lambda: LinearGamma(-5.0, INF), "gamma_max", False),
    ("linear-gamma-string", lambda: LinearGamma("a", 5.0), "gamma_min", False),
    ("linear-gamma-equal", lambda: LinearGamma(1.0, 1.0), "gamma_min", False),
    ("cosine-gamma-reversed", lambda: CosineGamma(5.0, -5.0), "gamma_min", False),
    ("learned-hidden-0", lambda: LearnedGamma(hidden=0), "hidden", False),
    ("learned-hidden-float", lambda: LearnedGamma(hidden=2.5), "hidden", False),
    ("learned-reversed", lambda: LearnedGamma(6.0, -10.0, hidden=4), "gamma_min", False),
    ("grid-0", lambda: sched().grid(0), "num_steps", False),
    ("grid-float", lambda: LinearGamma().grid(2.5), "num_steps", False),
    ("subgrid-0", lambda: sched().subgrid_steps(0), "num_steps", False),
    ("subgrid-too-many", lambda: sched().subgrid_steps(11), "num_steps", False),
    ("schedule-times-long", lambda: LinearGamma()(torch.tensor([0, 1])), "t", False),
    ("schedule-times-2d", lambda: LinearGamma()(torch.zeros(2, 2)), "t", False),
    ("schedule-times-outside", lambda: LinearGamma()(torch.tensor([1.5])), "t", False),
    ("schedule-times-nan", lambda: LinearGamma()(torch.tensor([NAN])), "t", False),
    (
        "registry-log-snr-reversed",
        lambda: SCHEDULES["log-snr"](10, log_snr_max=-9.0, log_snr_min=7.0),
        "log_snr",
        False,
    ),
    # ---- networks
    ("mlp-shape-0", lambda: MLPDenoiser(0), "event_shape", False),
    ("mlp-shape-negative", lambda: MLPDenoiser((2, -1)), "event_shape", False),
    ("mlp-shape-string", lambda: MLPDenoiser("2"), "event_shape", False),
    ("mlp-shape-empty", lambda: MLPDenoiser(()), "event_shape", False),
    ("mlp-hidden-0", lambda: MLPDenoiser(2, hidden=0), "hidden", False),
    ("mlp-hidden-float", lambda: MLPDenoiser(2, hidden=2.5), "hidden", False),
    ("mlp-depth-negative", lambda: MLPDenoiser(2, depth=-1), "depth", False),
    ("mlp-gamma-range-reversed", lambda: MLPDenoiser(2, gamma_range=(5.0, -5.0)), "gamma_range", False),
    ("mlp-gamma-range-nan", lambda: MLPDenoiser(2, gamma_range=(NAN, 5.0)), "gamma_range", False),
    ("unet-channels-0", lambda: UNetDenoiser(0), "channels", False),
    ("unet-base-0", lambda: UNetDenoiser(1, base=0), "base", False),
    ("unet-multipliers-empty", lambda: UNetDenoiser(1, multipliers=()), "multipliers", False),
    ("unet-multiplier-0", lambda: UNetDenoiser(1, multipliers=(1, 0)), "multipliers", False),
    ("unet-channels-float", lambda: UNetDenoiser(1.5), "channels", False),
    ("unet-dropout-1.5", lambda: UNetDenoiser(1, dropout=1.5), "dropout", False),
    ("unet-dropout-negative", lambda: UNetDenoiser(1, dropout=-0.1), "dropout", False),
    ("embedding-dim-odd", lambda: NoiseLevelEmbedding(3), "dim", False),
    ("embedding-dim-0", lambda: NoiseLevelEmbedding(0), "dim", False),
    ("step-indexed-network", lambda: StepIndexed("net", sched()), "network", False),
    ("step-indexed-schedule", lambda: StepIndexed(net(), LinearGamma()), "schedule", False),
    # ---- the diffusion
    ("diffusion-denoiser", lambda: pd.Diffusion("net", sched(), (2,)), "denoiser", False),
    ("diffusion-schedule-string", lambda: pd.Diffusion(net(), "linear", (2,)), "schedule", False),
    ("diffusion-event-shape-0", lambda: pd.Diffusion(net(), sched(), (0,)), "event_shape", False),
    ("diffusion-event-shape-negative", lambda: pd.Diffusion(net(), sched(), (-2,)), "event_shape", False),
    ("diffusion-event-shape-string", lambda: pd.Diffusion(net(), sched(), "ab"), "event_shape", False),
    ("diffusion-mean", lambda: pd.Diffusion(net(), sched(), (2,), mean="bogus"), "mean", False),
    ("diffusion-variance", lambda: pd.Diffusion(net(), sched(), (2,), variance="bogus"), "variance", False),
    ("diffusion-decoder", lambda: pd.Diffusion(net(), sched(), (2,), decoder="bogus"), "decoder", False),
    ("diffusion-num-levels-1", lambda: pd.Diffusion(net(), sched(), (2,), num_levels=1), "num_levels", False),
    (
        "diffusion-num-levels-float",
        lambda: pd.Diffusion(net(), sched(), (2,), num_levels=2.5),
        "num_levels",
        False,
    ),
    (
        "diffusion-num-steps-0",
        lambda: pd.Diffusion(net(), LinearGamma(), (2,), num_steps=0),
        "num_steps",
        False,
    ),
    (
        "diffusion-guide-order",
        lambda: pd.Diffusion(net(), sched(), (2,), guide_order="bogus"),
        "guide_order",
        False,
    ),
    ("diffusion-anchor-nan", lambda: pd.Diffusion(net(), sched(), (2,), anchor=NAN), "anchor", False),
    (
        "diffusion-autocast-int8",
        lambda: pd.Diffusion(net(), sched(), (2,), autocast_dtype=torch.int8),
        "autocast_dtype",
        False,
    ),
    (
        "diffusion-autocast-string",
        lambda: pd.Diffusion(net(), sched(), (2,), autocast_dtype="bfloat16"),
        "autocast_dtype",
        False,
    ),
    ("diffusion-name-empty", lambda: pd.Diffusion(net(), sched(), (2,), name=""), "name", False),
    ("diffusion-name-int", lambda: pd.Diffusion(net(), sched(), (2,), name=3), "name", False),
    (
        "gaussian-diffusion-schedule",
        lambda: pd.GaussianDiffusion(net(), LinearGamma(), (2,)),
        "schedule",
        False,
    ),
    (
        "gaussian-diffusion-decoder",
        lambda: pd.GaussianDiffusion(net(), sched(), (2,), decoder="bogus"),
        "decoder",
        False,
    ),
    ("diffusion-grid-0", lambda: diffusion().grid(0), "num_steps", False),
    ("denoise-shape", lambda: diffusion().denoise(torch.zeros(4, 3), torch.zeros(4)), "z", False),
    # ---- the bound
    (
        "nll-steps-per-call-negative",
        lambda: pd.nll(diffusion(), x0(), steps_per_call=-3),
        "steps_per_call",
        False,
    ),
    ("nll-steps-per-call-0", lambda: pd.nll(diffusion(), x0(), steps_per_call=0), "steps_per_call", False),
    (
        "nll-steps-per-call-float",
        lambda: pd.nll(diffusion(), x0(), steps_per_call=2.5),
        "steps_per_call",
        False,
    ),
    ("nll-max-items-0", lambda: pd.nll(diffusion(), x0(), max_items=0), "max_items", False),
    ("nll-max-items-negative", lambda: pd.nll(diffusion(), x0(), max_items=-1), "max_items", False),
    ("nll-num-steps-negative", lambda: pd.nll(diffusion(), x0(), num_steps=-1), "num_steps", False),
    ("nll-num-steps-float", lambda: pd.nll(diffusion(), x0(), num_steps=2.5), "num_steps", False),
    ("nll-num-times-1", lambda: pd.nll(vdm(), x0(), num_steps=0, num_times=1), "num_times", False),
    ("nll-num-times-float", lambda: pd.nll(vdm(), x0(), num_steps=0, num_times=2.5), "num_times", False),
    ("nll-x0-nan", lambda: pd.nll(diffusion(), torch.full((2, 2), NAN)), "x0", False),
    ("nll-x0-inf", lambda: pd.nll(diffusion(), torch.full((2, 2), INF)), "x0", False),
    ("nll-x0-shape", lambda: pd.nll(diffusion(), torch.zeros(4, 3)), "x0", False),
    ("nll-x0-integer", lambda: pd.nll(diffusion(), torch.zeros(4, 2, dtype=torch.long)), "x0", False),
    ("nll-x0-list", lambda: pd.nll(diffusion(), [[0.0, 0.0]]), "x0", False),
    ("nll-x0-empty-batch", lambda: pd.nll(diffusion(), torch.zeros(0, 2)), "x0", False),
    ("nll-x0-huge-values", lambda: pd.nll(diffusion(), torch.full((2, 2), 1e30)), "x0", False),
    ("nll-unknown-keyword", lambda: pd.nll(diffusion(), x0(), bogus=1), "bogus", False),
    ("nll-num-steps-bool", lambda: pd.nll(diffusion(), x0(), num_steps=True), "num_steps", False),
    (
        "vlb-terms-steps-per-call-0",
        lambda: pd.vlb_terms(diffusion(), x0(), steps_per_call=0),
        "steps_per_call",
        False,
    ),
    ("prior-term-x0-shape", lambda: pd.prior_term(diffusion(), torch.zeros(4, 3)), "x0", False),
    ("diffusion-nll-x0-shape", lambda: diffusion().nll(torch.zeros(4, 3)), "x0", False),
    ("diffusion-model-x0-shape", lambda: diffusion().model(torch.zeros(4, 3)), "x0", False),
    ("diffusion-guide-integer", lambda: diffusion().guide(torch.zeros(4, 2, dtype=torch.long)), "x0", False),
    ("diffusion-model-no-count", lambda: diffusion().model(), "num_samples", False),
    ("vlb-terms-max-items-0", lambda: pd.vlb_terms(diffusion(), x0(), max_items=0), "max_items", False),
    ("bound-num-times-0", lambda: pd.bound(vdm(), x0(), num_times=0), "num_times", False),
    ("bound-max-items-0", lambda: pd.bound(vdm(), x0(), max_items=0), "max_items", False),
    ("bound-num-steps-1", lambda: pd.bound(diffusion(), x0(), num_steps=1), "num_steps", False),
    ("bits-per-dim-terms", lambda: pd.bits_per_dim(diffusion(), "terms"), "terms", False),
    # ---- sampling
    ("sample-0", lambda: pd.sample(diffusion(), 0), "num_samples", False),
    ("sample-negative", lambda: pd.sample(diffusion(), -1), "num_samples", False),
    ("sample-float", lambda: pd.sample(diffusion(), 2.5), "num_samples", False),
    ("sample-bool", lambda: pd.sample(diffusion(), True), "num_samples", False),
    ("sample-method", lambda: pd.sample(diffusion(), 2, method="bogus"), "method", False),
    ("sample-num-steps-0", lambda: pd.sample(diffusion(), 2, num_steps=0), "num_steps", False),
    ("sample-eta-negative", lambda: pd.sample(diffusion(), 2, method="ddim", eta=-0.5), "eta", False),
    ("sample-eta-2", lambda: pd.sample(diffusion(), 2, method="ddim", eta=2.0), "eta", False),
    ("sample-eta-nan", lambda: pd.sample(diffusion(), 2, method="ddim", eta=NAN), "eta", False),
    ("sample-eta-ancestral", lambda: pd.sample(diffusion(), 2, eta=0.5), "eta", False),
    ("sample-x-T-shape", lambda: pd.sample(diffusion(), 2, x_T=torch.zeros(3, 2)), "x_T", False),
    ("sample-x-T-nan", lambda: pd.sample(diffusion(), 2, x_T=torch.full((2, 2), NAN)), "x_T", False),
    ("sample-dtype-int", lambda: pd.sample(diffusion(), 2, dtype=torch.int64), "dtype", False),
    ("sample-callback", lambda: pd.sample(diffusion(), 2, callback="print"), "callback", False),
    (
        "ancestral-gammas-decreasing",
        lambda: pd.ancestral(diffusion(), x0(2), torch.tensor([1.0, 0.0])),
        "gammas",
        False,
    ),
    ("ancestral-gammas-empty", lambda: pd.ancestral(diffusion(), x0(2), torch.tensor([])), "gammas", False),
    (
        "ancestral-gammas-nan",
        lambda: pd.ancestral(diffusion(), x0(2), torch.tensor([0.0, NAN])),
        "gammas",
        False,
    ),
    (
        "ancestral-x-shape",
        lambda: pd.ancestral(diffusion(), torch.zeros(2, 3), diffusion().grid()),
        "x",
        False,
    ),
    ("ddim-eta-2", lambda: pd.ddim(diffusion(), x0(2), diffusion().grid(), eta=2.0), "eta", False),
    ("ddim-eta-string", lambda: pd.ddim(diffusion(), x0(2), diffusion().grid(), eta="0"), "eta", False),
    # ---- losses
    ("elbo-num-steps-negative", lambda: pd.DiffusionELBO(num_steps=-1), "num_steps", False),
    ("elbo-num-steps-float", lambda: pd.DiffusionELBO(num_steps=2.5), "num_steps", False),
    ("elbo-times", lambda: pd.DiffusionELBO(times="bogus"), "times", False),
    ("elbo-warmup-negative", lambda: pd.DiffusionELBO(warmup=-1), "warmup", False),
    ("elbo-warmup-float", lambda: pd.DiffusionELBO(warmup=2.5), "warmup", False),
    ("elbo-decay-1", lambda: pd.DiffusionELBO(decay=1.0), "decay", False),
    ("elbo-decay-nan", lambda: pd.DiffusionELBO(decay=NAN), "decay", False),
    ("elbo-uniform-mix-0", lambda: pd.DiffusionELBO(uniform_mix=0.0), "uniform_mix", False),
    ("elbo-uniform-mix-nan", lambda: pd.DiffusionELBO(uniform_mix=NAN), "uniform_mix", False),
    (
        "elbo-minimize-variance-grid",
        lambda: pd.DiffusionELBO(minimize_variance=True),
        "minimize_variance",
        False,
    ),
    ("elbo-importance-continuous", lambda: pd.DiffusionELBO(num_steps=0, times="importance"), "times", False),
    ("elbo-no-data", lambda: pd.DiffusionELBO().loss(diffusion().model, diffusion().guide), "x0", False),
    (
        "elbo-nan-data",
        lambda: pd.DiffusionELBO().loss(diffusion().model, diffusion().guide, torch.full((2, 2), NAN)),
        "x0",
        False,
    ),
    ("simple-num-steps-negative", lambda: pd.SimplifiedLoss(num_steps=-2), "num_steps", False),
    ("simple-times", lambda: pd.SimplifiedLoss(times="bogus"), "times", False),
    ("simple-importance", lambda: pd.SimplifiedLoss(times="importance"), "times", False),
    ("hybrid-weight-nan", lambda: pd.HybridLoss(vlb_weight=NAN), "vlb_weight", False),
    ("hybrid-weight-negative", lambda: pd.HybridLoss(vlb_weight=-1.0), "vlb_weight", False),
    ("hybrid-weight-inf", lambda: pd.HybridLoss(vlb_weight=INF), "vlb_weight", False),
    ("hybrid-weight-string", lambda: pd.HybridLoss(vlb_weight="0.1"), "vlb_weight", False),
    ("hybrid-weight-bool", lambda: pd.HybridLoss(vlb_weight=True), "vlb_weight", False),
    # ---- step draws, decoders, site names
    ("step-draw-times", lambda: StepDraw("bogus"), "times", False),
    ("step-draw-index-float", lambda: _fixed_draw(torch.tensor([1.0, 2.0, 3.0, 4.0])), "index", False),
    ("step-draw-index-range", lambda: _fixed_draw(torch.tensor([0, 3, 4, 5])), "index", False),
    (
        "discretized-levels-1",
        lambda: DiscretizedGaussian(torch.zeros(2), torch.ones(2), 1),
        "num_levels",
        False,
    ),
    (
        "discretized-levels-float",
        lambda: DiscretizedGaussian(torch.zeros(2), torch.ones(2), 2.5),
        "num_levels",
        False,
    ),
    (
        "discretized-levels-bool",
        lambda: DiscretizedGaussian(torch.zeros(2), torch.ones(2), True),
        "num_levels",
        False,
    ),
    ("site-name-negative", lambda: pd.site_name(-1), "t", False),
    ("site-name-float", lambda: pd.site_name(2.5), "t", False),
]


def _fixed_draw(index: torch.Tensor):
    loss = pd.DiffusionELBO()
    loss.make_draw = lambda: StepDraw(index=index)
    return loss.loss(diffusion().model, diffusion().guide, x0(4))


def _api_params():
    for name, call, argument, pending in API_CASES:
        marks = [pytest.mark.xfail(strict=True, reason=CORE_FIX_PENDING)] if pending else []
        yield pytest.param(call, argument, id=name, marks=marks)


@pytest.mark.parametrize("call, argument", _api_params())
def test_core_api_refuses(call, argument):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    message = str(info.value)
    assert _one_line(message), message
    assert argument in message, message


# ============================================================================ user data files
class Trap:
    """Unpickling this creates the directory ``marker``: proof that a file's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _npy_header(shape, descr="<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _write(path: Path, make) -> Path:
    """Write the bad file ``path`` with ``make(path)``."""
    make(path)
    return path


def _npy(array, **kwargs):
    def make(path):
        with open(path, "wb") as handle:  # np.save(path) would append .npy to other names
            np.save(handle, array, **kwargs)

    return make


def _pt(obj):
    """Save ``obj`` (or what ``obj()`` makes, for tensors that warn when made)."""
    return lambda path: torch.save(obj() if callable(obj) else obj, path)


def _bytes(data: bytes):
    return lambda path: path.write_bytes(data)


def _renamed(save, suffix):
    def make(path):
        other = path.with_name(path.stem + "_src" + suffix)
        save(other)
        os.replace(other, path)

    return make


def _truncated_pt(path):
    torch.save(torch.zeros(64, 2), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


GOOD = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32)

# (id, file name, how to write it, what the message must say besides "data")
DATA_CASES = [
    ("npy-unicode", "x.npy", _npy(np.array([["a", "b"], ["c", "d"]])), "unicode"),
    ("npy-bytes", "x.npy", _npy(np.array([[b"a", b"b"], [b"c", b"d"]])), "byte strings"),
    ("npy-datetime", "x.npy", _npy(np.zeros((3, 2), dtype="datetime64[D]")), "datetimes"),
    ("npy-timedelta", "x.npy", _npy(np.zeros((3, 2), dtype="timedelta64[s]")), "timedeltas"),
    ("npy-structured", "x.npy", _npy(np.zeros(4, dtype=[("a", "f4"), ("b", "f4")])), "structured"),
    ("npy-object", "x.npy", _npy(np.array([[1, None]] * 3, dtype=object), allow_pickle=True), "objects"),
    ("npy-longdouble", "x.npy", _npy(np.zeros((3, 2), dtype=np.longdouble)), "float"),
    ("npy-complex", "x.npy", _npy(np.zeros((3, 2), dtype=complex)), "complex"),
    ("npy-void", "x.npy", _npy(np.zeros((3, 2), dtype="V4")), "raw bytes"),
    ("npy-zip-renamed", "x.npy", _pt(torch.zeros(3, 2)), "zip"),
    ("npy-npz-renamed", "x.npy", _renamed(lambda p: np.savez(p, a=GOOD), ".npz"), "zip"),
    ("npy-pickle-renamed", "x.npy", lambda p: p.write_bytes(pickle.dumps([1, 2])), "NumPy header"),
    ("npy-empty", "x.npy", _bytes(b""), "empty"),
    ("npy-text", "x.npy", _bytes(b"1,2\n3,4\n"), "NumPy header"),
    ("npy-directory", "x.npy", lambda p: p.mkdir(), "directory"),
    ("npy-huge-shape", "x.npy", _bytes(_npy_header((10**9, 10**6)) + b"\0" * 64), "claims"),
    ("npy-truncated", "x.npy", _bytes(_npy_header((1000, 10)) + b"\0" * 64), "truncated"),
    ("npy-damaged-header", "x.npy", _bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4 xx}\n"), "header"),
    ("npy-bad-version", "x.npy", _bytes(b"\x93NUMPY\x09\x00" + b"\0" * 64), "header"),
    ("npy-flat", "x.npy", _npy(np.zeros(5, dtype=np.float32)), "(N, 1)"),
    ("npy-scalar", "x.npy", _npy(np.float32(1.0)), "N >= 2"),
    ("npy-one-row", "x.npy", _npy(np.zeros((1, 2), dtype=np.float32)), "N >= 2"),
    ("npy-empty-event", "x.npy", _npy(np.zeros((4, 0), dtype=np.float32)), "empty event shape"),
    ("npy-nan", "x.npy", _npy(np.full((4, 2), np.nan)), "NaN"),
    ("npy-inf", "x.npy", _npy(np.full((4, 2), -np.inf)), "infinite"),
    ("npy-1e30", "x.npy", _npy(np.full((4, 2), 1e30)), "|x| <="),
    ("npy-1e300", "x.npy", _npy(np.full((4, 2), 1e300)), "|x| <="),
    ("npy-minus-1e7", "x.npy", _npy(np.full((4, 2), -1e7, dtype=np.float32)), "|x| <="),
    ("npy-int64-huge", "x.npy", _npy(np.full((4, 2), 2**62, dtype=np.int64)), "|x| <="),
    ("npy-uint64-huge", "x.npy", _npy(np.full((4, 2), 2**64 - 1, dtype=np.uint64)), "|x| <="),
    ("npy-levels-mismatch", "x.npy", _npy(GOOD), "17-level"),
    ("pt-sparse", "x.pt", _pt(torch.eye(4).to_sparse()), "dense"),
    ("pt-sparse-csr", "x.pt", _pt(lambda: torch.eye(4).to_sparse_csr()), "dense"),
    ("pt-meta", "x.pt", _pt(torch.empty(4, 2, device="meta")), "meta"),
    ("pt-complex", "x.pt", _pt(torch.zeros(4, 2, dtype=torch.complex64)), "complex"),
    ("pt-dict", "x.pt", _pt({"x": torch.zeros(4, 2)}), "single tensor"),
    ("pt-list", "x.pt", _pt([torch.zeros(4, 2)]), "single tensor"),
    ("pt-string", "x.pt", _pt("hello"), "single tensor"),
    ("pt-npy-renamed", "x.pt", _npy(GOOD), ".npy"),
    ("pt-npz-renamed", "x.pt", _renamed(lambda p: np.savez(p, a=GOOD), ".npz"), "zip"),
    ("pt-empty", "x.pt", _bytes(b""), "empty"),
    ("pt-directory", "x.pt", lambda p: p.mkdir(), "directory"),
    ("pt-text", "x.pt", _bytes(b"not a tensor file"), "not a readable"),
    ("pt-truncated", "x.pt", _truncated_pt, "truncated"),
    ("pt-flat", "x.pt", _pt(torch.zeros(5)), "(N, 1)"),
    ("pt-nan", "x.pt", _pt(torch.full((4, 2), float("nan"))), "NaN"),
    ("pt-1e30", "x.pt", _pt(torch.full((4, 2), 1e30)), "|x| <="),
    ("pt-one-row", "x.pt", _pt(torch.zeros(1, 3)), "N >= 2"),
]
if hasattr(torch, "quantize_per_tensor"):
    DATA_CASES.append(
        (
            "pt-quantized",
            "x.pt",
            _pt(lambda: torch.quantize_per_tensor(torch.zeros(4, 2), 0.1, 0, torch.qint8)),
            "quantized",
        )
    )


@pytest.mark.parametrize("name, make, expected", [pytest.param(*c[1:], id=c[0]) for c in DATA_CASES])
def test_bad_data_files_are_refused(tmp_path, name, make, expected):
    path = _write(tmp_path / name, make)
    before = sorted(p.name for p in tmp_path.iterdir())
    num_levels = 17 if expected == "17-level" else None
    with pytest.raises(ValueError) as info:
        load_dataset(path, num_levels=num_levels)
    message = str(info.value)
    assert _one_line(message), message
    assert message.startswith("data: ") and str(path) in message, message
    assert expected in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_booby_trapped_data_file_never_runs(tmp_path, suffix, kind):
    marker = tmp_path / "PWNED"
    path = tmp_path / f"trap{suffix}"
    if kind == "pickle":
        path.write_bytes(pickle.dumps(Trap(marker)))
    else:
        torch.save({"x": Trap(marker)}, path)
    with pytest.raises(ValueError, match="data: "):
        load_dataset(path)
    assert not marker.exists()


BAD_LOAD_ARGUMENTS = [
    ("num-train-0", {"name": "moons", "num_train": 0}, "num_train"),
    ("num-train-float", {"name": "moons", "num_train": 2.5}, "num_train"),
    ("num-train-bool", {"name": "moons", "num_train": True}, "num_train"),
    ("num-test-negative", {"name": "moons", "num_test": -1}, "num_test"),
    ("test-fraction-0", {"name": "moons", "test_fraction": 0.0}, "test_fraction"),
    ("test-fraction-1", {"name": "moons", "test_fraction": 1.0}, "test_fraction"),
    ("test-fraction-nan", {"name": "moons", "test_fraction": NAN}, "test_fraction"),
    ("name-int", {"name": 3}, "name"),
    ("name-unknown", {"name": "mnist"}, "data"),
    ("name-csv", {"name": "x.csv"}, "data"),
    ("missing-file", {"name": "absent/x.npy"}, "data"),
]


@pytest.mark.parametrize("kwargs, argument", [pytest.param(c[1], c[2], id=c[0]) for c in BAD_LOAD_ARGUMENTS])
def test_bad_load_dataset_arguments(kwargs, argument):
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as info:
        load_dataset(**kwargs)
    assert _one_line(str(info.value)) and argument in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "make, shape",
    [
        pytest.param(_npy(GOOD[:, :1]), (1,), id="vectors-N-1"),
        pytest.param(_npy(np.random.default_rng(1).normal(size=(20, 3))), (3,), id="vectors-N-3"),
        pytest.param(_npy(GOOD.astype(">f4")), (2,), id="big-endian"),
        pytest.param(_npy(GOOD.astype(np.float16)), (2,), id="float16"),
        pytest.param(_npy(np.asfortranarray(GOOD)), (2,), id="fortran-order"),
        pytest.param(_npy(np.ones((20, 2), dtype=bool)), (2,), id="bool"),
        pytest.param(_npy(np.arange(40, dtype=np.uint16).reshape(20, 2)), (2,), id="uint16"),
    ],
)
def test_valid_npy_variants_load(tmp_path, make, shape):
    data = load_dataset(_write(tmp_path / "ok.npy", make))
    assert data.event_shape == shape and data.train.dtype == torch.float32
    assert torch.isfinite(data.train).all()


@pytest.mark.parametrize(
    "tensor",
    [
        pytest.param(torch.randn(20, 2, requires_grad=True), id="requires-grad"),
        pytest.param(torch.nn.Parameter(torch.randn(20, 2)), id="parameter"),
        pytest.param(torch.randn(20, 2).bfloat16(), id="bfloat16"),
        pytest.param(torch.randn(40, 2)[::2], id="strided-view"),
    ],
)
def test_valid_pt_variants_load(tmp_path, tensor):
    torch.save(tensor, tmp_path / "ok.pt")
    data = load_dataset(tmp_path / "ok.pt")
    assert data.event_shape == (2,) and not data.train.requires_grad and data.train.dtype == torch.float32


# ============================================================================ run files
def _checkpoint(**changes):
    values = {"config": {"data": "moons"}, "model": {"w": torch.zeros(2)}, "step": 3}
    values.update(changes)
    return {k: v for k, v in values.items() if v is not _DROP}


_DROP = object()


def _corrupt(path):
    weights = torch.full((16,), 0.123)
    torch.save(_checkpoint(model={"w": weights}), path)
    data = path.read_bytes()
    where = data.index(weights.numpy().tobytes())
    path.write_bytes(data[:where] + b"\x00" * 8 + data[where + 8 :])  # two weights zeroed


def _zip_of_other_files(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")


def _corrupt_header(path):
    torch.save(_checkpoint(), path)
    data = bytearray(path.read_bytes())
    data[30:60] = b"\x00" * 30
    path.write_bytes(bytes(data))


# (id, how to write checkpoint.pt, what the message must say)
CHECKPOINT_CASES = [
    ("missing", None, "no such file"),
    ("empty", _bytes(b""), "empty"),
    ("directory", lambda p: p.mkdir(), "directory"),
    ("text", _bytes(b"hello, world"), "not a readable"),
    ("npy-renamed", _npy(GOOD), ".npy"),
    ("npz-renamed", _renamed(lambda p: np.savez(p, a=GOOD), ".npz"), "zip archive"),
    ("zip-of-other-files", _zip_of_other_files, "zip archive"),
    ("truncated", lambda p: (torch.save(_checkpoint(), p), p.write_bytes(p.read_bytes()[:200])), "truncated"),
    ("corrupt-weights", _corrupt, "checksum"),
    ("corrupt-header", _corrupt_header, "checkpoint"),
    (
        "legacy-pickle-of-a-class",
        lambda p: p.write_bytes(pickle.dumps(_checkpoint(config=Path("x")))),
        "never unpickled",
    ),
    ("pickle-of-numpy", _pt({"config": {}, "model": {}, "step": 1, "rng": np.zeros(3)}), "never unpickled"),
    ("list", _pt([1, 2, 3]), "expected a pyro-diffusion checkpoint"),
    ("tensor", _pt(torch.zeros(3)), "expected a pyro-diffusion checkpoint"),
    ("missing-model", _pt(_checkpoint(model=_DROP)), "missing 'model'"),
    ("missing-step", _pt(_checkpoint(step=_DROP)), "missing 'step'"),
    ("missing-config", _pt(_checkpoint(config=_DROP)), "missing 'config'"),
    ("step-string", _pt(_checkpoint(step="3")), "'step'"),
    ("step-bool", _pt(_checkpoint(step=True)), "'step'"),
    ("step-negative", _pt(_checkpoint(step=-4)), "'step'"),
    ("config-list", _pt(_checkpoint(config=[1])), "'config'"),
    ("model-list", _pt(_checkpoint(model=[torch.zeros(2)])), "'model'"),
    ("model-non-tensor", _pt(_checkpoint(model={"w": 1.0})), "'model'"),
    ("model-sparse", _pt(_checkpoint(model={"w": torch.eye(3).to_sparse()})), "dense"),
    ("model-meta", _pt(_checkpoint(model={"w": torch.empty(3, device="meta")})), "meta"),
    ("model-nan", _pt(_checkpoint(model={"w": torch.tensor([float("nan")])})), "NaN"),
    ("model-inf", _pt(_checkpoint(model={"w": torch.tensor([float("inf")])})), "infinite"),
]


@pytest.mark.parametrize("make, expected", [pytest.param(c[1], c[2], id=c[0]) for c in CHECKPOINT_CASES])
def test_bad_checkpoints_are_refused(tmp_path, make, expected):
    path = tmp_path / "checkpoint.pt"
    if make is not None:
        make(path)
    with pytest.raises(runs.RunFileError) as info:
        runs.load_checkpoint(path, argument="--run")
    message = str(info.value)
    assert _one_line(message) and message.startswith("--run: ") and str(path) in message, message
    assert expected in message, message


@pytest.mark.parametrize("kind", ["pickle", "torch.save", "nested"])
def test_a_booby_trapped_checkpoint_never_runs(tmp_path, kind):
    marker = tmp_path / "PWNED"
    path = tmp_path / "checkpoint.pt"
    if kind == "pickle":
        path.write_bytes(pickle.dumps(Trap(marker)))
    elif kind == "torch.save":
        torch.save(Trap(marker), path)
    else:
        torch.save(_checkpoint(model={"w": torch.zeros(2), "payload": Trap(marker)}), path)
    with pytest.raises(runs.RunFileError, match="never unpickled"):
        runs.load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "state, expected",
    [
        pytest.param({"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}, "another shape", id="shape"),
        pytest.param({"weight": torch.zeros(2, 2)}, "missing 1 weights", id="missing"),
        pytest.param(
            {"weight": torch.zeros(2, 2), "bias": torch.zeros(2), "extra": torch.zeros(1)},
            "unexpected",
            id="unexpected",
        ),
    ],
)
def test_weights_of_another_model_are_refused(state, expected):
    module = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(runs.RunFileError, match=expected) as info:
        runs.load_module_state(module, state, path="run/checkpoint.pt", argument="--run")
    assert _one_line(str(info.value)) and "run/checkpoint.pt" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


JSON_CASES = [
    ("malformed", b"{not json", "not valid JSON"),
    ("truncated", b'{"steps": 10, "lr"', "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("list", b"[1, 2]", "expected an object"),
    ("string", b'"config"', "expected an object"),
    ("null", b"null", "expected an object"),
    ("binary", b"\xff\xfe\x00garbage", "not UTF-8"),
    ("deeply-nested", b"[" * 100_000 + b"]" * 100_000, "config.json"),
    ("nan-only", b"NaN", "expected an object"),
]


@pytest.mark.parametrize("data, expected", [pytest.param(c[1], c[2], id=c[0]) for c in JSON_CASES])
def test_bad_json_files_are_refused(tmp_path, data, expected):
    path = tmp_path / "config.json"
    path.write_bytes(data)
    with pytest.raises(runs.RunFileError) as info:
        runs.read_json(path)
    message = str(info.value)
    assert _one_line(message) and message.startswith("config.json: ") and expected in message, message
    assert path.read_bytes() == data


def test_json_that_is_a_directory_or_missing(tmp_path):
    (tmp_path / "metrics.json").mkdir()
    with pytest.raises(runs.RunFileError, match="metrics.json: .* is a directory"):
        runs.read_json(tmp_path / "metrics.json")
    with pytest.raises(runs.RunFileError, match="no such file"):
        runs.read_json(tmp_path / "absent.json", missing_ok=False)
    assert runs.read_json(tmp_path / "absent.json") == {}


@pytest.mark.parametrize(
    "values, expected",
    [
        pytest.param({"bogus": 1}, "bogus", id="unknown-field"),
        pytest.param({"steps": "ten"}, "steps", id="wrong-type"),
        pytest.param({"steps": -1}, "steps", id="out-of-range"),
    ],
)
def test_bad_configurations_are_refused(tmp_path, values, expected):
    from dataclasses import dataclass

    @dataclass
    class Config:
        steps: int = 1

        def __post_init__(self):
            if not isinstance(self.steps, int) or self.steps < 1:
                raise ValueError(f"steps: expected a positive integer, got {self.steps!r}")

    path = tmp_path / "config.json"
    runs.write_json(values, path)
    with pytest.raises(runs.RunFileError) as info:
        runs.read_config(path, lambda v: Config(**v))
    assert _one_line(str(info.value)) and expected in str(info.value) and "config.json" in str(info.value)


# ============================================================================ values of flags
FLAG_CASES = [
    ("out-empty", lambda p: runs.check_out(""), "--out"),
    ("out-blank", lambda p: runs.check_out("   "), "--out"),
    ("out-none", lambda p: runs.check_out(None), "--out"),
    ("out-nul", lambda p: runs.check_out("a\x00b"), "--out"),
    ("out-is-a-file", lambda p: runs.check_out(_write(p / "file", _bytes(b"x"))), "--out"),
    ("run-missing", lambda p: runs.check_run_dir(p / "absent"), "--run"),
    ("run-empty", lambda p: runs.check_run_dir(""), "--run"),
    ("run-is-a-file", lambda p: runs.check_run_dir(_write(p / "file", _bytes(b"x"))), "--run"),
    ("run-lacks-files", lambda p: runs.check_run_dir(p, needs=("config.json",)), "--run"),
    ("device-empty", lambda p: runs.check_device(""), "--device"),
    ("device-none", lambda p: runs.check_device(None), "--device"),
    ("device-meta", lambda p: runs.check_device("meta"), "--device"),
    ("device-tpu", lambda p: runs.check_device("tpu"), "--device"),
    ("device-bogus", lambda p: runs.check_device("gpu0"), "--device"),
    ("device-cuda-index", lambda p: runs.check_device("cuda:99"), "--device"),
    ("seed-negative", lambda p: runs.check_seed(-1), "--seed"),
    ("seed-2-64", lambda p: runs.check_seed(2**64), "--seed"),
    ("seed-float", lambda p: runs.check_seed(2.5), "--seed"),
    ("seed-bool", lambda p: runs.check_seed(True), "--seed"),
    ("num-0", lambda p: runs.check_sample_count(0, 2), "--num"),
    ("num-10-12", lambda p: runs.check_sample_count(10**12, 2), "--num"),
    ("num-images", lambda p: runs.check_sample_count(10**8, 3 * 64 * 64), "--num"),
    ("finite-nan", lambda p: runs.check_finite(NAN, argument="--lr"), "--lr"),
    ("finite-range", lambda p: runs.check_finite(1e300, argument="--lr", low=0, high=10), "--lr"),
]
if not torch.cuda.is_available():
    FLAG_CASES.append(("device-cuda", lambda p: runs.check_device("cuda"), "--device"))
if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
    FLAG_CASES.append(("device-mps", lambda p: runs.check_device("mps"), "--device"))


@pytest.mark.parametrize("call, argument", [pytest.param(c[1], c[2], id=c[0]) for c in FLAG_CASES])
def test_bad_flag_values_are_refused(tmp_path, call, argument):
    with pytest.raises(runs.RunError) as info:
        call(tmp_path)
    message = str(info.value)
    assert _one_line(message) and message.startswith(argument + ":"), message


# ============================================================================ writing safely
@pytest.mark.parametrize("code", ["ENOSPC", "EROFS", "EACCES"])
@pytest.mark.parametrize("writer", ["atomic_save", "write_json"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, code, writer):
    import errno

    path = tmp_path / ("checkpoint.pt" if writer == "atomic_save" else "metrics.json")
    getattr(runs, writer)({"step": 1}, path)
    before = path.read_bytes()

    def fail(fd):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(runs.os, "fsync", fail)
    with pytest.raises(runs.RunFileError) as info:
        getattr(runs, writer)({"step": 2}, path)
    assert _one_line(str(info.value)) and str(info.value).startswith("--out: cannot write")
    assert os.strerror(getattr(errno, code)) in str(info.value)
    assert path.read_bytes() == before
    assert runs.temp_files(tmp_path) == []


def test_a_directory_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(runs.RunError, match="--out: .* not a directory"):
        runs.RunLock(tmp_path / "file").acquire()
    with pytest.raises(runs.RunError, match="--out: cannot create"):
        runs.RunLock(tmp_path / "file" / "below").acquire()


def test_the_lock_refuses_a_second_writer_and_survives_a_dead_one(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    hold = (
        "import sys, time\nfrom pyro_diffusion import runs\n"
        f"lock = runs.RunLock({str(run)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runs.RunLockedError) as info:
            runs.RunLock(run).acquire()
        message = str(info.value)
        assert _one_line(message) and message.startswith("--out: ") and f"pid {holder.pid}" in message
        holder.kill()  # kill -9: its lock ends with it
        holder.wait()
        (run / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
        with runs.RunLock(run):  # taken at once; the killed writer's temp file is gone
            assert runs.temp_files(run) == []
            assert (run / runs.LOCK).read_text().strip() == str(os.getpid())
        assert not (run / runs.LOCK).exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_file_with_garbage_is_taken(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.LOCK).write_text("999999999\n")
    with runs.RunLock(run):
        with runs.RunLock(run):  # re-entrant within a process
            pass
        assert runs.RunLock.held(run)
    assert not runs.RunLock.held(run)


def test_fingerprints_notice_changed_data(tmp_path):
    class Data:
        def __init__(self, train, test):
            self.train, self.test = train, test

    data = Data(torch.zeros(4, 2), torch.ones(2, 2))
    saved = runs.dataset_fingerprint(data)
    runs.check_fingerprint(
        saved, runs.dataset_fingerprint(Data(torch.zeros(4, 2), torch.ones(2, 2))), where="run"
    )
    for changed in (
        Data(torch.zeros(4, 2).index_fill(0, torch.tensor([1]), 1e-7), torch.ones(2, 2)),
        Data(torch.zeros(5, 2), torch.ones(2, 2)),
        Data(torch.zeros(4, 2).double(), torch.ones(2, 2)),
        Data(torch.zeros(4, 2), torch.ones(3, 2)),
    ):
        with pytest.raises(runs.DataChangedError) as info:
            runs.check_fingerprint(saved, runs.dataset_fingerprint(changed), where="runs/x")
        assert (
            _one_line(str(info.value))
            and str(info.value).startswith("--data: ")
            and "runs/x" in str(info.value)
        )
    with pytest.raises(runs.DataChangedError, match="no fingerprint"):
        runs.check_fingerprint(None, saved, where="runs/x")


# ============================================================================ the command line
TINY = ["--num-steps", "20", "--hidden", "16", "--depth", "1", "--batch-size", "32", "--no-progress"]
SMALL_DATA = ["--num-train", "200", "--num-test", "40"]


def _main(argv) -> int:
    """``pyro-diffusion ARGV`` in this process: the exit status (argparse's included)."""
    from pyro_diffusion.cli import main

    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1


def _snapshot(root: Path) -> dict:
    """Every file and directory under ``root``, files with their bytes."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def runs_made(tmp_path_factory):
    """Two finished runs (moons; a user's .npy file), and a checkpoint of another configuration."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "points.npy"
    np.save(data, np.random.default_rng(0).normal(size=(60, 2)).astype(np.float32))
    made = {"root": root, "data": data}
    for name, extra in (
        ("moons", ["--data", "moons", *SMALL_DATA]),
        ("user", ["--data", data]),
        ("other", ["--data", "moons", *SMALL_DATA, "--hidden", "8"]),
    ):
        status = _main(
            ["train", "--out", root / name, "--steps", "6", "--checkpoint-every", "3", *TINY, *extra]
        )
        assert status == 0, name
        made[name] = root / name
    return made


class Ctx:
    """What a case's command line and setup see: the copied run, its checkpoint, a tmp dir."""

    def __init__(self, tmp: Path, made: dict, which: str = "moons"):
        self.tmp = tmp
        self.run = tmp / "run"
        shutil.copytree(made[which], self.run)
        self.checkpoint = self.run / "checkpoint.pt"
        self.made = made
        self.marker = tmp / "PWNED"
        self.data = tmp / "points.npy"
        shutil.copy(made["data"], self.data)
        self.cleanups: list = []

    def bad_data(self, name: str) -> Path:
        """The file of the data case ``name`` (from ``DATA_CASES``)."""
        (entry,) = [c for c in DATA_CASES if c[0] == name]
        return _write(self.tmp / entry[1], entry[2])


def _checkpoint_mutation(kind: str):
    """Setups that replace the run's checkpoint with a bad one."""

    def setup(ctx: Ctx):
        path = ctx.checkpoint
        if kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated":
            path.write_bytes(path.read_bytes()[:300])
        elif kind == "junk":
            path.write_bytes(b"this is not a checkpoint\n" * 10)
        elif kind == "npy":
            _npy(GOOD)(path)
        elif kind == "npz":
            _renamed(lambda p: np.savez(p, a=GOOD), ".npz")(path)
        elif kind == "trap-pickle":
            path.write_bytes(pickle.dumps(Trap(ctx.marker)))
        elif kind == "trap-torch":
            checkpoint = torch.load(path, weights_only=True)
            checkpoint["engine"]["payload"] = Trap(ctx.marker)
            torch.save(checkpoint, path)
        elif kind == "missing-engine":
            checkpoint = torch.load(path, weights_only=True)
            del checkpoint["engine"]
            torch.save(checkpoint, path)
        elif kind == "list":
            torch.save([1, 2], path)
        elif kind == "foreign":
            shutil.copy(ctx.made["other"] / "checkpoint.pt", path)
        elif kind == "other-shape":
            checkpoint = torch.load(path, weights_only=True)
            model = checkpoint["engine"]["model"]
            name = next(k for k, v in model.items() if v.dim() == 2)
            model[name] = torch.zeros(model[name].shape[0] + 1, model[name].shape[1])
            torch.save(checkpoint, path)
        elif kind == "nan-weights":
            checkpoint = torch.load(path, weights_only=True)
            model = checkpoint["engine"]["model"]
            name = next(k for k, v in model.items() if v.is_floating_point())
            model[name] = torch.full_like(model[name], float("nan"))
            torch.save(checkpoint, path)
        elif kind == "sparse-weights":
            checkpoint = torch.load(path, weights_only=True)
            model = checkpoint["engine"]["model"]
            name = next(k for k, v in model.items() if v.dim() == 2)
            model[name] = model[name].to_sparse()
            torch.save(checkpoint, path)
        elif kind == "no-fingerprint":
            checkpoint = torch.load(path, weights_only=True)
            del checkpoint["data_fingerprint"]
            torch.save(checkpoint, path)
        elif kind == "directory":
            path.unlink()
            path.mkdir()
        else:  # pragma: no cover
            raise AssertionError(kind)

    return setup


def _config_mutation(kind: str, name: str = "config.json"):
    def setup(ctx: Ctx):
        path = ctx.run / name
        if kind == "malformed":
            path.write_text('{"steps": 6,')
        elif kind == "list":
            path.write_text("[1, 2]")
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "unknown-field":
            values = runs.read_json(path)
            values["bogus"] = 1
            path.write_text(__import__("json").dumps(values))
        elif kind == "bad-value":
            values = runs.read_json(path)
            values["steps"] = -1
            path.write_text(__import__("json").dumps(values))
        elif kind == "wrong-type":
            values = runs.read_json(path)
            values["lr"] = "fast"
            path.write_text(__import__("json").dumps(values))
        elif kind == "missing":
            path.unlink()
        else:  # pragma: no cover
            raise AssertionError(kind)

    return setup


def _change_data(ctx: Ctx):
    """Change one value of the data file the run was trained on (restored after the case)."""
    path = ctx.made["data"]
    original = path.read_bytes()
    ctx.cleanups.append(lambda: path.write_bytes(original))
    array = np.load(path)
    array[0, 0] += 0.5
    np.save(path, array)


RESUME = lambda c: ["train", "--out", c.run, "--resume", "--steps", "9", "--no-progress"]  # noqa: E731
EVALUATE = lambda c: ["evaluate", "--run", c.run, "--no-progress"]  # noqa: E731
SAMPLE = lambda c: ["sample", "--run", c.run, "--num", "4", "--no-progress"]  # noqa: E731
NEW = lambda c, *flags: ["train", "--out", c.tmp / "new", "--steps", "2", *TINY, *SMALL_DATA, *flags]  # noqa: E731

# (id, argv(ctx), setup(ctx) or None, text the one line must hold, which base run)
CLI_CASES = [
    # ---- train: the run directory
    ("train-out-empty", lambda c: ["train", "--out", "", *TINY], None, "--out", "moons"),
    ("train-out-blank", lambda c: ["train", "--out", "   ", *TINY], None, "--out", "moons"),
    (
        "train-out-is-a-file",
        lambda c: ["train", "--out", c.run / "config.json", *TINY],
        None,
        "--out",
        "moons",
    ),
    (
        "train-existing-run",
        lambda c: ["train", "--out", c.run, "--steps", "9", *TINY, *SMALL_DATA],
        None,
        "--out",
        "moons",
    ),
    (
        "train-resume-nothing",
        lambda c: ["train", "--out", c.tmp / "empty", "--resume", *TINY],
        lambda c: (c.tmp / "empty").mkdir(),
        "--resume",
        "moons",
    ),
    ("train-resume-changed-lr", lambda c: [*RESUME(c), "--lr", "0.1"], None, "lr: checkpoint has", "moons"),
    (
        "train-resume-changed-hidden",
        lambda c: [*RESUME(c), "--hidden", "32"],
        None,
        "hidden: checkpoint has",
        "moons",
    ),
    # ---- train: values of flags
    ("train-steps-0", lambda c: NEW(c, "--steps", "0"), None, "--steps", "moons"),
    ("train-steps-negative", lambda c: NEW(c, "--steps", "-1"), None, "--steps", "moons"),
    ("train-steps-text", lambda c: NEW(c, "--steps", "ten"), None, "--steps", "moons"),
    ("train-steps-float", lambda c: NEW(c, "--steps", "1e3"), None, "--steps", "moons"),
    ("train-batch-size-0", lambda c: NEW(c, "--batch-size", "0"), None, "--batch-size", "moons"),
    ("train-lr-1e300", lambda c: NEW(c, "--lr", "1e300"), None, "--lr", "moons"),
    ("train-lr-nan", lambda c: NEW(c, "--lr", "nan"), None, "--lr", "moons"),
    ("train-lr-inf", lambda c: NEW(c, "--lr", "inf"), None, "--lr", "moons"),
    ("train-lr-0", lambda c: NEW(c, "--lr", "0"), None, "--lr", "moons"),
    ("train-lr-negative", lambda c: NEW(c, "--lr", "-0.1"), None, "--lr", "moons"),
    ("train-lr-text", lambda c: NEW(c, "--lr", "fast"), None, "--lr", "moons"),
    (
        "train-lr-final-fraction-0",
        lambda c: NEW(c, "--lr-final-fraction", "0"),
        None,
        "--lr-final-fraction",
        "moons",
    ),
    (
        "train-lr-final-fraction-2",
        lambda c: NEW(c, "--lr-final-fraction", "2"),
        None,
        "--lr-final-fraction",
        "moons",
    ),
    ("train-num-steps-0", lambda c: NEW(c, "--num-steps", "0"), None, "--num-steps", "moons"),
    ("train-num-steps-1e9", lambda c: NEW(c, "--num-steps", str(10**9)), None, "--num-steps", "moons"),
    ("train-hidden-0", lambda c: NEW(c, "--hidden", "0"), None, "--hidden", "moons"),
    ("train-depth-negative", lambda c: NEW(c, "--depth", "-1"), None, "--depth", "moons"),
    (
        "train-checkpoint-every-0",
        lambda c: NEW(c, "--checkpoint-every", "0"),
        None,
        "--checkpoint-every",
        "moons",
    ),
    ("train-seed-2-64", lambda c: NEW(c, "--seed", str(2**64)), None, "--seed", "moons"),
    ("train-seed-negative", lambda c: NEW(c, "--seed", "-1"), None, "--seed", "moons"),
    ("train-seed-text", lambda c: NEW(c, "--seed", "zero"), None, "--seed", "moons"),
    ("train-device-meta", lambda c: NEW(c, "--device", "meta"), None, "--device", "moons"),
    ("train-device-tpu", lambda c: NEW(c, "--device", "tpu"), None, "--device", "moons"),
    ("train-device-empty", lambda c: NEW(c, "--device", ""), None, "--device", "moons"),
    ("train-device-bogus", lambda c: NEW(c, "--device", "gpu"), None, "--device", "moons"),
    ("train-device-cuda-99", lambda c: NEW(c, "--device", "cuda:99"), None, "--device", "moons"),
    ("train-schedule-bogus", lambda c: NEW(c, "--schedule", "bogus"), None, "--schedule", "moons"),
    ("train-objective-bogus", lambda c: NEW(c, "--objective", "bogus"), None, "--objective", "moons"),
    ("train-network-bogus", lambda c: NEW(c, "--network", "bogus"), None, "--network", "moons"),
    ("train-network-unet-on-vectors", lambda c: NEW(c, "--network", "unet"), None, "--network", "moons"),
    (
        "train-beta-start-0",
        lambda c: NEW(c, "--beta-start", "0", "--beta-end", "0.02"),
        None,
        "--beta-start",
        "moons",
    ),
    (
        "train-beta-end-2",
        lambda c: NEW(c, "--beta-start", "1e-4", "--beta-end", "2"),
        None,
        "--beta-end",
        "moons",
    ),
    (
        "train-log-snr-reversed",
        lambda c: NEW(c, "--log-snr-max", "-9", "--log-snr-min", "7"),
        None,
        "--log-snr-max",
        "moons",
    ),
    (
        "train-gamma-reversed",
        lambda c: NEW(c, "--schedule", "gamma-linear", "--gamma-min", "5", "--gamma-max", "-5"),
        None,
        "--gamma-min",
        "moons",
    ),
    (
        "train-gamma-nan",
        lambda c: NEW(c, "--schedule", "gamma-linear", "--gamma-min", "nan"),
        None,
        "--gamma-min",
        "moons",
    ),
    ("train-ema-1.5", lambda c: NEW(c, "--ema", "1.5"), None, "--ema", "moons"),
    ("train-clip-norm-0", lambda c: NEW(c, "--clip-norm", "0"), None, "--clip-norm", "moons"),
    (
        "train-weight-decay-negative",
        lambda c: NEW(c, "--weight-decay", "-1"),
        None,
        "--weight-decay",
        "moons",
    ),
    ("train-val-size-too-big", lambda c: NEW(c, "--val-size", "100000"), None, "--val-size", "moons"),
    ("train-eval-every-without-val", lambda c: NEW(c, "--eval-every", "5"), None, "--eval-every", "moons"),
    ("train-num-train-0", lambda c: NEW(c, "--num-train", "0"), None, "--num-train", "moons"),
    (
        "train-num-levels-1",
        lambda c: NEW(c, "--data", c.data, "--num-levels", "1"),
        None,
        "--num-levels",
        "moons",
    ),
    (
        "train-num-levels-wrong",
        lambda c: NEW(c, "--data", c.data, "--num-levels", "17"),
        None,
        "--data",
        "moons",
    ),
    ("train-data-unknown", lambda c: NEW(c, "--data", "mnist"), None, "--data", "moons"),
    ("train-data-missing", lambda c: NEW(c, "--data", c.tmp / "absent.npy"), None, "--data", "moons"),
    ("train-data-empty-name", lambda c: NEW(c, "--data", ""), None, "--data", "moons"),
]
for _name in (
    "npy-unicode",
    "npy-object",
    "npy-datetime",
    "npy-structured",
    "npy-longdouble",
    "npy-zip-renamed",
    "npy-npz-renamed",
    "npy-empty",
    "npy-directory",
    "npy-huge-shape",
    "npy-truncated",
    "npy-1e30",
    "npy-nan",
    "npy-flat",
    "pt-sparse",
    "pt-meta",
    "pt-dict",
    "pt-npy-renamed",
):
    CLI_CASES.append(
        (f"train-data-{_name}", lambda c, n=_name: NEW(c, "--data", c.bad_data(n)), None, "--data", "moons")
    )

# ---- bad checkpoints, for every command that reads one
for _kind in (
    "empty",
    "truncated",
    "junk",
    "npy",
    "npz",
    "trap-pickle",
    "trap-torch",
    "missing-engine",
    "list",
    "foreign",
    "other-shape",
    "nan-weights",
    "sparse-weights",
    "no-fingerprint",
    "directory",
):
    for _command, _argv, _flag in (
        ("resume", RESUME, "--out"),
        ("evaluate", EVALUATE, "--run"),
        ("sample", SAMPLE, "--run"),
    ):
        _expected = "lr" if (_kind == "foreign" and _command == "resume") else _flag
        if _kind == "no-fingerprint":
            _expected = "fingerprint"
        if _kind == "foreign" and _command == "resume":
            _expected = "hidden: checkpoint has 8"
        CLI_CASES.append(
            (f"{_command}-checkpoint-{_kind}", _argv, _checkpoint_mutation(_kind), _expected, "moons")
        )

# ---- bad run files
for _kind in ("malformed", "list", "empty", "unknown-field", "bad-value", "wrong-type"):
    for _command, _argv, _flag in (
        ("resume", RESUME, "--out"),
        ("evaluate", EVALUATE, "--run"),
        ("sample", SAMPLE, "--run"),
    ):
        CLI_CASES.append((f"{_command}-config-{_kind}", _argv, _config_mutation(_kind), _flag, "moons"))
for _command, _argv in (("evaluate", EVALUATE), ("sample", SAMPLE)):
    CLI_CASES.append(
        (f"{_command}-config-missing", _argv, _config_mutation("missing"), "not a run directory", "moons")
    )
for _kind in ("malformed", "list"):
    for _command, _argv in (("resume", RESUME), ("evaluate", EVALUATE)):
        CLI_CASES.append(
            (
                f"{_command}-metrics-{_kind}",
                _argv,
                _config_mutation(_kind, "metrics.json"),
                "metrics.json",
                "moons",
            )
        )

# ---- the data changed under a run
for _command, _argv in (("resume", RESUME), ("evaluate", EVALUATE), ("sample", SAMPLE)):
    CLI_CASES.append(
        (
            f"{_command}-data-changed",
            lambda c, a=_argv: [*a(c)],
            lambda c: _change_data(c),
            "data changed",
            "user",
        )
    )

CLI_CASES += [
    # ---- evaluate: flags
    ("evaluate-run-empty", lambda c: ["evaluate", "--run", ""], None, "--run", "moons"),
    ("evaluate-run-missing", lambda c: ["evaluate", "--run", c.tmp / "absent"], None, "--run", "moons"),
    (
        "evaluate-run-is-a-file",
        lambda c: ["evaluate", "--run", c.run / "config.json"],
        None,
        "--run",
        "moons",
    ),
    ("evaluate-run-not-a-run", lambda c: ["evaluate", "--run", c.tmp], None, "--run", "moons"),
    (
        "evaluate-num-steps-negative",
        lambda c: [*EVALUATE(c), "--num-steps", "-1"],
        None,
        "--num-steps",
        "moons",
    ),
    ("evaluate-num-times-0", lambda c: [*EVALUATE(c), "--num-times", "0"], None, "--num-times", "moons"),
    ("evaluate-device-meta", lambda c: [*EVALUATE(c), "--device", "meta"], None, "--device", "moons"),
    ("evaluate-device-empty", lambda c: [*EVALUATE(c), "--device", ""], None, "--device", "moons"),
    ("evaluate-device-tpu", lambda c: [*EVALUATE(c), "--device", "tpu"], None, "--device", "moons"),
    # ---- sample: flags
    ("sample-run-empty", lambda c: ["sample", "--run", ""], None, "--run", "moons"),
    ("sample-run-missing", lambda c: ["sample", "--run", c.tmp / "absent"], None, "--run", "moons"),
    ("sample-num-0", lambda c: [*SAMPLE(c)[:-3], "--num", "0"], None, "--num", "moons"),
    ("sample-num-10-12", lambda c: [*SAMPLE(c)[:-3], "--num", str(10**12)], None, "--num", "moons"),
    ("sample-num-text", lambda c: [*SAMPLE(c)[:-3], "--num", "many"], None, "--num", "moons"),
    ("sample-num-steps-0", lambda c: [*SAMPLE(c), "--num-steps", "0"], None, "--num-steps", "moons"),
    ("sample-sampler-bogus", lambda c: [*SAMPLE(c), "--sampler", "bogus"], None, "--sampler", "moons"),
    ("sample-eta-2", lambda c: [*SAMPLE(c), "--sampler", "ddim", "--eta", "2"], None, "--eta", "moons"),
    ("sample-eta-nan", lambda c: [*SAMPLE(c), "--sampler", "ddim", "--eta", "nan"], None, "--eta", "moons"),
    ("sample-eta-ancestral", lambda c: [*SAMPLE(c), "--eta", "0.5"], None, "--eta", "moons"),
    ("sample-seed-2-64", lambda c: [*SAMPLE(c), "--seed", str(2**64)], None, "--seed", "moons"),
    ("sample-seed-negative", lambda c: [*SAMPLE(c), "--seed", "-1"], None, "--seed", "moons"),
    ("sample-device-meta", lambda c: [*SAMPLE(c), "--device", "meta"], None, "--device", "moons"),
    ("sample-device-empty", lambda c: [*SAMPLE(c), "--device", ""], None, "--device", "moons"),
    ("sample-out-empty", lambda c: [*SAMPLE(c), "--out", ""], None, "--out", "moons"),
    ("sample-out-directory", lambda c: [*SAMPLE(c), "--out", c.run], None, "--out", "moons"),
    # ---- compare: flags
    (
        "compare-out-empty",
        lambda c: ["compare", "--out", "", "--data", "moons", *TINY],
        None,
        "--out",
        "moons",
    ),
    (
        "compare-out-is-a-file",
        lambda c: ["compare", "--out", c.run / "config.json", "--data", "moons", *TINY],
        None,
        "--out",
        "moons",
    ),
    (
        "compare-seeds-negative",
        lambda c: ["compare", "--out", c.tmp / "cmp", "--seeds", "-1", *TINY],
        None,
        "--seed",
        "moons",
    ),
    (
        "compare-seeds-2-64",
        lambda c: ["compare", "--out", c.tmp / "cmp", "--seeds", str(2**64), *TINY],
        None,
        "--seed",
        "moons",
    ),
    (
        "compare-objective-bogus",
        lambda c: ["compare", "--out", c.tmp / "cmp", "--objectives", "bogus"],
        None,
        "--objective",
        "moons",
    ),
    (
        "compare-samples-0",
        lambda c: ["compare", "--out", c.tmp / "cmp", "--samples", "0"],
        None,
        "--samples",
        "moons",
    ),
    (
        "compare-vdm-bogus",
        lambda c: ["compare", "--out", c.tmp / "cmp", "--vdm", "bogus", *TINY],
        None,
        "--vdm",
        "moons",
    ),
    (
        "compare-lr-1e300",
        lambda c: ["compare", "--out", c.tmp / "cmp", "--lr", "1e300", *TINY],
        None,
        "--lr",
        "moons",
    ),
    (
        "compare-device-meta",
        lambda c: [
            "compare",
            "--out",
            c.tmp / "cmp",
            "--device",
            "meta",
            "--data",
            "moons",
            *TINY,
            *SMALL_DATA,
        ],
        None,
        "--device",
        "moons",
    ),
    ("no-command", lambda c: [], None, "required", "moons"),
    ("unknown-command", lambda c: ["fly"], None, "fly", "moons"),
    ("unknown-flag", lambda c: ["train", "--out", c.tmp / "new", "--bogus"], None, "--bogus", "moons"),
]
if not torch.cuda.is_available():
    CLI_CASES += [
        ("train-device-cuda", lambda c: NEW(c, "--device", "cuda"), None, "--device", "moons"),
        ("evaluate-device-cuda", lambda c: [*EVALUATE(c), "--device", "cuda"], None, "--device", "moons"),
        ("sample-device-cuda", lambda c: [*SAMPLE(c), "--device", "cuda"], None, "--device", "moons"),
        ("resume-device-cuda", lambda c: [*RESUME(c), "--device", "cuda"], None, "--device", "moons"),
    ]
if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
    CLI_CASES.append(("train-device-mps", lambda c: NEW(c, "--device", "mps"), None, "--device", "moons"))


@pytest.mark.parametrize("argv, setup, expected, which", [pytest.param(*c[1:], id=c[0]) for c in CLI_CASES])
def test_cli_refuses_with_one_line_and_changes_nothing(
    runs_made, tmp_path, capsys, argv, setup, expected, which
):
    ctx = Ctx(tmp_path, runs_made, which)
    try:
        if setup is not None:
            setup(ctx)
        command = argv(ctx)
        before = _snapshot(tmp_path)
        capsys.readouterr()
        status = _main(command)
        captured = capsys.readouterr()
    finally:
        for cleanup in ctx.cleanups:
            cleanup()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1, captured.err
    assert expected in lines[0], lines[0]
    assert lines[0].startswith("pyro-diffusion"), lines[0]
    assert _snapshot(tmp_path) == before, "a refused command changed files"
    assert not ctx.marker.exists(), "a checkpoint's pickled code ran"


# ============================================================================ whole runs
def _cli(*argv, timeout=120):
    """``python -m pyro_diffusion.cli ARGV`` in a fresh process: (status, stdout, stderr)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "pyro_diffusion.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return done.returncode, done.stdout, done.stderr


def test_the_entry_point_prints_one_line_and_no_traceback(runs_made, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs_made["moons"], run)
    marker = tmp_path / "PWNED"
    (run / "checkpoint.pt").write_bytes(pickle.dumps(Trap(marker)))
    for argv, flag in (
        (["evaluate", "--run", run], "--run"),
        (["train", "--out", "", "--steps", "2"], "--out"),
        (["sample", "--run", runs_made["moons"], "--device", "meta"], "--device"),
    ):
        status, out, err = _cli(*argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2 and len(lines) == 1 and flag in lines[0] and "Traceback" not in err + out, err
    assert not marker.exists()


def test_kill_9_mid_run_then_resume(tmp_path):
    """A run killed with SIGKILL (perhaps mid-write) refuses no one after it: its lock ends
    with it, the temporary file of the write it was killed in is removed by the next writer,
    and the last checkpoint loads and resumes.  While it runs, a second writer is refused."""
    import signal
    import subprocess
    import sys
    import time

    from pyro_diffusion.training import load_checkpoint

    run = tmp_path / "run"
    argv = ["train", "--out", run, "--steps", "1000000", "--checkpoint-every", "2", *TINY, *SMALL_DATA]
    writer = subprocess.Popen(
        [sys.executable, "-m", "pyro_diffusion.cli", *map(str, argv)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        while not (run / "checkpoint.pt").exists():
            assert writer.poll() is None, writer.stderr.read().decode()
            assert time.monotonic() < deadline, "the run wrote no checkpoint"
            time.sleep(0.05)
        status, out, err = _cli("train", "--out", run, "--resume", "--steps", "10", "--no-progress")
        assert status == 2 and f"in use by another pyro-diffusion process (pid {writer.pid})" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        time.sleep(0.2)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
        writer.wait()
        writer.stderr.close()
    (run / ".checkpoint.pt.killed0.tmp").write_bytes(b"the first half of a checkpoint")  # a write cut short
    step = load_checkpoint(run)["engine"]["step"]
    assert step >= 2
    assert _main(["train", "--out", run, "--resume", "--steps", step + 3, "--no-progress"]) == 0
    assert runs.temp_files(run) == [] and not (run / runs.LOCK).exists()
    assert load_checkpoint(run)["engine"]["step"] == step + 3
    assert runs.read_json(run / "metrics.json")["steps"] == step + 3


def test_a_booby_trapped_checkpoint_never_runs_on_any_path(runs_made, tmp_path, capsys):
    from pyro_diffusion.inference import DiffusionPrior, pretrained
    from pyro_diffusion.training import load_model, load_run

    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    shutil.copytree(runs_made["moons"], run)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    checkpoint["engine"]["payload"] = Trap(marker)
    torch.save(checkpoint, run / "checkpoint.pt")
    compare_out = tmp_path / "compare"
    (compare_out / "elbo" / "seed0").mkdir(parents=True)
    shutil.copy(run / "checkpoint.pt", compare_out / "elbo" / "seed0" / "checkpoint.pt")
    before = _snapshot(tmp_path)
    for argv, flag in (
        (["train", "--out", run, "--resume", "--steps", "9", "--no-progress"], "--out"),
        (["evaluate", "--run", run, "--no-progress"], "--run"),
        (["sample", "--run", run, "--num", "3", "--no-progress"], "--run"),
        (
            ["compare", "--out", compare_out, "--objectives", "elbo", "--seeds", "0", "--data", "moons"]
            + [
                "--steps",
                "6",
                "--checkpoint-every",
                "3",
                "--samples",
                "5",
                "--no-baselines",
                *TINY,
                *SMALL_DATA,
            ],
            "--out",
        ),
    ):
        capsys.readouterr()
        assert _main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0] and "never unpickled" in lines[0], lines
    for load in (load_model, load_run):
        with pytest.raises(runs.RunFileError, match="never unpickled"):
            DiffusionPrior(load(run)[1] if load is load_run else load(run))
    assert _snapshot(tmp_path) == before
    # the cached models of the inference examples are read with weights_only=True too
    cache = pretrained.cache_path("gmm", "simple", 10, 5, "linear", tmp_path / "cache")
    cache.parent.mkdir()
    cache.write_bytes(pickle.dumps(Trap(marker)))
    with pytest.raises(Exception):  # noqa: B017 - refused, whatever the error type
        pretrained.load_or_train("gmm", "simple", num_steps=10, train_steps=5, root=tmp_path / "cache")
    assert not marker.exists()


@pytest.mark.parametrize("dim", [1, 3])
def test_vectors_of_any_dimension_train_sample_and_evaluate(tmp_path, dim):
    data = tmp_path / f"points{dim}.npy"
    np.save(data, np.random.default_rng(dim).normal(size=(40, dim)).astype(np.float32))
    run = tmp_path / "run"
    assert _main(["train", "--out", run, "--data", data, "--steps", "4", *TINY]) == 0
    assert (run / "samples.png").stat().st_size > 0
    assert _main(["sample", "--run", run, "--num", "5", "--no-progress"]) == 0
    assert torch.load(run / "samples_seed0.pt", weights_only=True).shape == (5, dim)
    assert (run / "samples_seed0.png").exists()
    assert _main(["evaluate", "--run", run, "--no-progress"]) == 0


def test_metrics_record_their_checkpoint_step_and_a_resume_drops_them(runs_made, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs_made["moons"], run)
    assert _main(["evaluate", "--run", run, "--no-progress"]) == 0
    metrics = runs.read_json(run / "metrics.json")
    assert metrics["checkpoint_step"] == 6 and "test_bits_per_dim" in metrics
    assert _main(["train", "--out", run, "--resume", "--steps", "9", "--no-progress"]) == 0
    metrics = runs.read_json(run / "metrics.json")
    assert metrics["steps"] == 9
    assert not [k for k in metrics if k.startswith("test_") or k == "checkpoint_step"], sorted(metrics)
    assert _main(["evaluate", "--run", run, "--no-progress"]) == 0
    assert runs.read_json(run / "metrics.json")["checkpoint_step"] == 9


def test_an_empty_out_writes_nothing_into_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in (["train", "--out", "", "--steps", "2", *TINY], ["compare", "--out", "", *TINY]):
        assert _main(command) == 2
        assert "--out" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS"])
def test_a_full_or_read_only_disk_fails_in_one_line_and_keeps_the_checkpoint(
    runs_made, tmp_path, monkeypatch, capsys, code
):
    import errno

    run = tmp_path / "run"
    shutil.copytree(runs_made["moons"], run)
    before = _snapshot(tmp_path)

    def fail(fd):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(runs.os, "fsync", fail)
    capsys.readouterr()
    assert _main(["train", "--out", run, "--resume", "--steps", "9", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1
        and "--out: cannot write" in lines[0]
        and os.strerror(getattr(errno, code)) in lines[0]
    )
    assert _snapshot(tmp_path) == before  # the last checkpoint, and no temporary file
