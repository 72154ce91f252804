r"""Training runs: a configuration, the model it describes, and a run directory.

:class:`TrainConfig` describes a run completely (the data, the model, the objective, the
optimizer, validation and the moving average); the command line's ``train`` flags are
generated from its fields (:mod:`~pyro_diffusion.cli`).  :func:`build_diffusion` makes the
model, :func:`build_engine` its :class:`~pyro_diffusion.engine.Engine` (the package's one
training loop), :func:`fit` runs it, and :func:`train` is :func:`fit` into a run directory::

    config.json      the resolved :class:`TrainConfig` (JSON), written when the run starts
    metrics.json     loss history, steps, seconds, the validation history and the selected
                     checkpoint; ``evaluate`` adds the test bits/dim
    checkpoint.pt    the configuration, the data's event shape and levels, and the engine's
                     state (weights, optimizer, learning-rate schedule, moving average, best
                     checkpoint, data order, RNG states of every process, the loss's state);
                     tensors and plain values only, so it loads with
                     ``torch.load(..., weights_only=True)``; written atomically every
                     ``checkpoint_every`` steps
    *.png            loss curve, samples, the schedule γ at the model's levels

``train(config, out, resume=True)`` continues a run exactly where its checkpoint stopped: the
parameters after ``N`` steps are the same whether or not the run was interrupted.  A
checkpoint written under another configuration is refused (:class:`ConfigMismatchError`).

**Safe run directories** (:mod:`~pyro_diffusion.runs`).  One process writes a run at a time:
``train``, ``evaluate`` and ``compare`` hold an exclusive lock on their directory
(``.lock``; a second writer is refused at once) and remove the temporary files of a writer
that was killed.  Every file is written atomically.  Checkpoints are read with
``weights_only=True`` and checked (keys, types, shapes, finite weights) before anything is
built from them.  The checkpoint stores a fingerprint of the data (shape, dtype and SHA-256
of the training and test tensors); resuming, evaluating and sampling a run whose data changed
is refused, as is a checkpoint that disagrees with the run's ``config.json``.  The test
metrics record the ``checkpoint_step`` they were measured at, and resuming a run removes
them (they describe weights the run no longer has).
Under ``torch.distributed`` (``torchrun``) the same call trains data-parallel: every process
runs the engine on its share of each batch and process 0 writes the directory.

**Reloading.**  ``load_model(run_dir)`` rebuilds the trained
:class:`~pyro_diffusion.diffusion.Diffusion` in another process from the stored configuration
and the selected weights (the best validated checkpoint, else the moving average, else the
last weights); :func:`load_run` also returns the configuration and the data set.

**The model.**  :func:`build_diffusion` makes one :class:`~pyro_diffusion.diffusion.Diffusion`:
the schedule ``config.schedule`` from :data:`~pyro_diffusion.schedules.SCHEDULES` (the DDPM
tables ``linear``, ``cosine``, ``log-snr`` on their ``num_steps`` levels, or the functions of
time ``gamma-linear``, ``gamma-cosine``, ``learned`` on a ``num_steps``-level grid), the
network ``config.network`` (:data:`NETWORKS`), the decoder ``config.decoder`` (default
``"ddpm"``: the network's x̂ with variance β̃_2; discretized for K-level data), the mean
parameterization ``config.mean`` and the variance ``config.variance`` (default: the one the
objective needs).  With a tabulated schedule and the defaults this is exactly
:func:`~pyro_diffusion.diffusion.GaussianDiffusion`.

**The objectives** map onto the core losses, on the grid ``config.loss_steps`` (None: the
model's own T levels; K: a K-level grid; 0: continuous time) with the step draws
``config.times``:

=========  ======================================================  ==================
name       loss                                                    variances
=========  ======================================================  ==================
elbo       ``DiffusionELBO()``: −ELBO, one t ~ U{1..T} per datum   fixed ("large")
elbo-is    ``DiffusionELBO(times="importance")``                   fixed ("large")
simple     ``SimplifiedLoss()``: ‖ε − ε_θ‖²                        fixed ("large")
hybrid     ``HybridLoss()``: L_simple + λ·L_vlb                    learned
=========  ======================================================  ==================

**The optimizer** is ``torch.optim.Adam`` (fused on a GPU) over parameter groups: learning
rate ``lr`` (``schedule_lr`` for the schedule's parameters; 0 for a learned schedule's
endpoints with ``freeze_endpoints``), L2 ``weight_decay`` on the network's weights only;
``lr_final_fraction < 1`` adds ``torch.optim.lr_scheduler.ExponentialLR``; gradients are
clipped per element at ``clip_value`` and/or in norm at ``clip_norm``.

:data:`OBJECTIVES` and :data:`NETWORKS` are plain dicts: another module can add entries
(``OBJECTIVES["mine"] = Objective(...)``) and the CLI and
:mod:`~pyro_diffusion.experiments.compare` pick them up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyro
import torch
import torch.distributed as torch_dist
from pyro.infer import ELBO
from torch import nn
from tqdm.auto import tqdm

from . import engine as engine_module
from . import runs
from .baselines import to_levels
from .chains import TIME_SAMPLERS
from .data import CHANNELS_LAST, IMAGE_MODES, Dataset, load_dataset
from .decoders import DECODERS
from .diffusion import Diffusion
from .engine import SAMPLINGS, Engine, elbo_module, process_seed, world
from .losses import DiffusionELBO, HybridLoss, SimplifiedLoss
from .nets import MLPDenoiser, UNetDenoiser
from .parameterization import MEANS, VARIANCES
from .schedules import SCHEDULES, Schedule

__all__ = [
    "TrainConfig",
    "Objective",
    "OBJECTIVES",
    "SCHEDULES",
    "NETWORKS",
    "DataShape",
    "Fitted",
    "ConfigMismatchError",
    "elbo_module",
    "build_schedule",
    "build_diffusion",
    "make_loss",
    "parameter_settings",
    "param_groups",
    "make_optimizer",
    "build_engine",
    "split_validation",
    "load_run_data",
    "fit",
    "train",
    "load_model",
    "load_run",
    "load_checkpoint",
    "save_checkpoint",
    "read_metrics",
    "read_config",
    "write_metrics",
    "bound_bits_per_dim",
    "continuous_bound",
    "evaluate_run",
    "atomic_save",
    "write_json",
]

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.json"
#: the largest learning rate a configuration accepts (beyond it Adam only diverges)
MAX_LR = 10.0
#: upper limits of sizes whose tables or data would not fit in memory anyway
_LARGEST = {"num_steps": 1_000_000, "hidden": 65_536, "num_train": 100_000_000, "num_test": 100_000_000}
#: the keys a run's checkpoint must hold, with their types
CHECKPOINT_KEYS = {"config": dict, "data": dict, "engine": dict}

#: ``final_loss`` in a run's metrics: the per-datum training loss averaged over this many last
#: steps (the window of the progress bar's running loss)
FINAL_LOSS_STEPS = 50

#: the seed of the continuous-time test bound's draws (the same draws for every run)
EVALUATION_SEED = 12345


# ---------------------------------------------------------------------------- registries
@dataclass(frozen=True)
class Objective:
    """An entry of :data:`OBJECTIVES`: how to build the loss and which variances it needs.

    Args:
        make_loss: ``(num_steps=None, times=None) -> pyro.infer.ELBO``, a loss over the
            diffusion's model and guide on the grid ``num_steps`` (None: the model's own; K;
            0: continuous time) with the step draws ``times`` (None: the objective's own).
        variance: ``"large"``, ``"small"`` or ``"learned"`` (the denoiser then outputs twice
            the channels).
        is_bound: whether the training loss estimates −ELBO (so its values are in nats).
        description: one line for ``--help`` and tables.
        times: the step draws it accepts.
    """

    make_loss: Callable[..., ELBO]
    variance: str = "large"
    is_bound: bool = True
    description: str = ""
    times: tuple[str, ...] = TIME_SAMPLERS


OBJECTIVES: dict[str, Objective] = {
    "elbo": Objective(
        lambda num_steps=None, times=None: DiffusionELBO(num_steps, times or "uniform"),
        "large",
        True,
        "full ELBO, analytic per-step KLs, t ~ U{1..T}",
    ),
    "elbo-is": Objective(
        lambda num_steps=None, times=None: DiffusionELBO(num_steps, "importance"),
        "large",
        True,
        "full ELBO, t importance-sampled ∝ √E[ℓ_t²]",
        ("importance",),
    ),
    "simple": Objective(
        lambda num_steps=None, times=None: SimplifiedLoss(num_steps, times or "uniform"),
        "large",
        False,
        "L_simple = ‖ε − ε_θ‖², t ~ U{1..T}",
        ("uniform", "low-discrepancy"),
    ),
    "hybrid": Objective(
        lambda num_steps=None, times=None: HybridLoss(num_steps=num_steps),
        "learned",
        False,
        "L_simple + 0.001·L_vlb, learned variances",
        ("uniform",),
    ),
}


def _mlp(config: TrainConfig, event_shape, learned: bool, gamma_range: tuple[float, float]) -> nn.Module:
    fourier = None if config.fourier_min is None else (config.fourier_min, config.fourier_max)
    return MLPDenoiser(
        tuple(event_shape),
        config.hidden,
        config.depth,
        learned,
        gamma_range=gamma_range,
        dropout=config.dropout,
        fourier=fourier,
    )


def _unet(config: TrainConfig, event_shape, learned: bool, gamma_range: tuple[float, float]) -> nn.Module:
    if len(event_shape) != 3:
        raise ValueError(f"network: 'unet' needs image data (C, H, W), got event_shape {tuple(event_shape)}")
    if config.fourier_min is not None:
        raise ValueError("fourier_min: Fourier input features are an option of the MLP (network 'mlp')")
    return UNetDenoiser(
        event_shape[0],
        base=config.hidden,
        multipliers=(1, 2),
        dropout=config.dropout,
        learned_variance=learned,
        gamma_range=gamma_range,
    )


#: name → ``(config, event_shape, learned_variance, gamma_range) -> network(z, γ)``; ``gamma_range``
#: is the model's own range of noise levels (γ_1, γ_T), which the network's embedding spans
NETWORKS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "unet": _unet}


# ---------------------------------------------------------------------------- configuration
def _option(
    default, help: str, group: str, *, choices: Callable[[], Sequence[str]] | None = None, shown=None
):
    """A field of :class:`TrainConfig` with what the command line needs to offer it."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "shown": shown})


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _non_negative_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run (and must match when a run is resumed).

    ``steps`` (how far to train), ``device``, ``checkpoint_every``, ``progress`` and
    ``log_every`` may change between a run and its resumption; all other fields may not.
    ``schedule`` defaults to ``"log-snr"`` for K-level data and ``"linear"`` otherwise;
    ``network`` to ``"mlp"`` (:meth:`resolved`).  Values are checked when the configuration
    is made (``ValueError`` naming the field).  Every field is a ``pyro-diffusion train``
    flag (``--batch-size`` for ``batch_size``; :meth:`flags` gives the flags of a
    configuration)."""

    # data
    data: str = _option(
        "moons",
        "data set: moons, swissroll, gmm, digits (17 levels), digits8 (the digits as 8-bit data, 256 levels), "
        "a path to a .npy/.pt array (N, *event_shape) (uint8: 256 levels scaled to [−1, 1]; images channels-first "
        "or channels-last), or a folder of PNG/JPEG images",
        "data",
    )
    num_train: int = _option(20_000, "training points of a generated 2-D set", "data")
    num_test: int = _option(5_000, "test points of a generated 2-D set", "data")
    num_levels: int | None = _option(
        None,
        "K for a user file whose values take K evenly spaced levels in [−1, 1] (a discretized decoder); "
        "for uint8 arrays and image folders the number of levels 0..K−1 they hold",
        "data",
        shown="continuous for float data, 256 for uint8 data and image folders",
    )
    image_size: int | None = _option(
        None, "image folders: resize every image to S×S pixels", "data", shown="the images' own size"
    )
    image_mode: str = _option(
        "auto",
        "image folders: grey (1 channel), rgb (3 channels) or auto (grey when every image is)",
        "data",
        choices=lambda: IMAGE_MODES,
    )
    channels_last: str = _option(
        "auto",
        "arrays (N, A, B, C): yes, they are (N, H, W, C); no, (N, C, H, W); auto, decided from the shape "
        "(the end of size 1, 3 or 4)",
        "data",
        choices=lambda: CHANNELS_LAST,
    )
    val_size: int = _option(
        0,
        "hold this many training data out as a validation split (a fixed split, the same for every seed); "
        "the validation bound then selects the checkpoint",
        "validation",
    )
    eval_every: int = _option(
        0,
        "with --val-size: measure the validation bound every N steps (and at the last); 0: at the last only",
        "validation",
    )
    val_times: int = _option(
        16, "draws per validation datum of the validation bound (the same draws at every check)", "validation"
    )
    # objective
    objective: str = _option(
        "elbo",
        "training objective",
        "objective",
        choices=lambda: OBJECTIVES,
    )
    loss_steps: int | None = _option(
        None,
        "grid of the training loss: unset, the model's own T levels; K, a K-level grid; 0, continuous time",
        "objective",
        shown="the model's own grid",
    )
    times: str | None = _option(
        None,
        "how each datum's step is drawn: uniform, low-discrepancy (evenly spaced over the batch, one random "
        "shift) or importance (∝ √E[ℓ_t²])",
        "objective",
        choices=lambda: TIME_SAMPLERS,
        shown="the objective's",
    )
    # model
    num_steps: int = _option(1000, "T, the model's number of noise levels (its own grid)", "model")
    schedule: str | None = _option(
        None,
        "noise schedule: linear (DDPM), cosine (Improved DDPM), log-snr (log SNR linear in t), tabulated on T "
        "levels; gamma-linear, gamma-cosine, learned (VDM's learned γ = −log SNR), functions of time on a "
        "T-level grid",
        "model",
        choices=lambda: SCHEDULES,
        shown="log-snr for K-level data, linear otherwise",
    )
    beta_start: float | None = _option(
        None,
        "β_1 of the linear schedule",
        "model",
        shown="DDPM's 1000-step range of noise levels at T levels",
    )
    beta_end: float | None = _option(None, "β_T of the linear schedule", "model", shown="as for --beta-start")
    log_snr_max: float | None = _option(
        None,
        "log SNR at t = 1 of the log-snr schedule",
        "model",
        shown="7; for K-level data 7 + 2 ln((K − 1)/16), so that σ_1 is the same fraction of a level's "
        "width as at 17 levels (12.5 for 256)",
    )
    log_snr_min: float = _option(-9.0, "log SNR at t = T of the log-snr schedule", "model")
    gamma_min: float | None = _option(
        None,
        "γ = −log SNR at time 0 of gamma-linear, gamma-cosine, learned",
        "model",
        shown="−13.3, −10, −10",
    )
    gamma_max: float | None = _option(
        None, "γ = −log SNR at time 1 of gamma-linear, gamma-cosine, learned", "model", shown="5, 10, 6"
    )
    max_beta: float | None = _option(None, "largest β of the cosine schedule", "model", shown="0.9")
    schedule_hidden: int | None = _option(
        None, "sigmoid units of the learned schedule's shape network", "model", shown="1024"
    )
    learn_shape: bool = _option(True, "train the learned schedule's shape", "model")
    freeze_endpoints: bool = _option(
        False,
        "keep the learned schedule's endpoints γ(0), γ(1) at --gamma-min/--gamma-max (learning rate 0)",
        "model",
    )
    network: str | None = _option(
        None, "denoiser: mlp (on the flattened datum) or unet", "model", choices=lambda: NETWORKS, shown="mlp"
    )
    hidden: int = _option(256, "MLP width / U-Net base channels", "model")
    depth: int = _option(3, "residual blocks of the MLP", "model")
    dropout: float = _option(0.0, "dropout rate inside the network's blocks (MLP and U-Net)", "model")
    fourier_min: int | None = _option(
        None,
        "MLP: also feed sin/cos(2^n π z) of every entry for n = FOURIER_MIN … --fourier-max (fine bits)",
        "model",
        shown="none",
    )
    fourier_max: int | None = _option(
        None, "the largest n of --fourier-min's features", "model", shown="none"
    )
    mean: str = _option("eps", "what the network predicts: eps, x0, v or mu", "model", choices=lambda: MEANS)
    variance: str | None = _option(
        None,
        "reverse variances: small (the posterior's), large (β) or learned",
        "model",
        choices=lambda: VARIANCES,
        shown="the objective's",
    )
    decoder: str = _option(
        "ddpm",
        "p(x_0 | x_1): ddpm (the network's x̂, DDPM's variance), network (x̂ with a learned scale), plain (z_1/α_1)",
        "model",
        choices=lambda: DECODERS,
    )
    level_prior: bool | None = _option(
        None,
        "K-level data: the decoder's level masses reweighted by learned per-dimension level logits, "
        "started at the training data's level frequencies (for data that take few of the K levels)",
        "model",
        shown="on for K-level data whose training split takes fewer than half of the K levels",
    )
    anchor: float | None = _option(
        None, "the network sees γ − γ(0) + ANCHOR instead of γ (for a learned γ(0))", "model", shown="γ"
    )
    embed_gamma_min: float | None = _option(
        None, "noise level at the low end of the network's level embedding", "model", shown="the model's γ_1"
    )
    embed_gamma_max: float | None = _option(
        None, "noise level at the high end of the network's level embedding", "model", shown="the model's γ_T"
    )
    # optimizer
    steps: int = _option(2000, "optimizer steps (minibatches)", "optimizer")
    batch_size: int = _option(128, "minibatch size (per process under torchrun)", "optimizer")
    lr: float = _option(1e-3, "Adam learning rate", "optimizer")
    schedule_lr: float | None = _option(
        None, "learning rate of the schedule's parameters", "optimizer", shown="--lr"
    )
    weight_decay: float = _option(
        0.0, "L2 penalty on the network's weights (Adam's weight_decay)", "optimizer"
    )
    lr_final_fraction: float = _option(
        1.0, "decay the learning rate geometrically to lr × this at the last step (1: constant)", "optimizer"
    )
    clip_value: float | None = _option(
        None, "clip each gradient element to [−V, V]", "optimizer", shown="no clipping"
    )
    clip_norm: float | None = _option(
        None, "clip the gradients' total norm to N", "optimizer", shown="no clipping"
    )
    ema: float = _option(
        0.0,
        "decay of an exponential moving average of the weights, which is then validated and kept (0: none)",
        "optimizer",
    )
    sampling: str = _option(
        "epochs",
        "minibatches: epochs (without replacement, reshuffled every epoch) or replacement (i.i.d. rows)",
        "optimizer",
        choices=lambda: SAMPLINGS,
    )
    seed: int = _option(0, "seed of the weights, the data order and every noise draw", "optimizer")
    # run
    checkpoint_every: int = _option(500, "write a checkpoint every N steps", "run")
    device: str = _option("cpu", "torch device, e.g. cpu or cuda", "run")
    progress: bool = _option(True, "show progress bars", "run")
    log_every: int = _option(0, "print the loss every N steps (0: never)", "run")

    MUTABLE: typing.ClassVar[tuple[str, ...]] = (
        "steps",
        "device",
        "checkpoint_every",
        "progress",
        "log_every",
    )

    def __post_init__(self) -> None:
        self._check()

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the field when a value is out of range (done when the
        configuration is made; kept for callers that check explicitly)."""
        self._check()
        return self

    def _check(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        if not isinstance(self.data, (str, os.PathLike)) or not str(self.data):
            fail("data", "a data set name or a path")
        for name, registry in (
            ("objective", OBJECTIVES),
            ("mean", MEANS),
            ("decoder", DECODERS),
            ("sampling", SAMPLINGS),
        ):
            if getattr(self, name) not in registry:
                fail(name, f"one of {sorted(registry)}")
        for name, registry in (
            ("schedule", SCHEDULES),
            ("network", NETWORKS),
            ("variance", VARIANCES),
            ("times", TIME_SAMPLERS),
        ):
            if getattr(self, name) is not None and getattr(self, name) not in registry:
                fail(name, f"one of {sorted(registry)}")
        for name in (
            "steps",
            "batch_size",
            "num_steps",
            "hidden",
            "checkpoint_every",
            "num_train",
            "num_test",
            "val_times",
        ):
            if not _positive_int(getattr(self, name)):
                fail(name, "a positive integer")
        for name, most in _LARGEST.items():
            if getattr(self, name) > most:
                fail(name, f"a positive integer <= {most:,}")
        for name in ("depth", "seed", "val_size", "eval_every", "log_every"):
            if not _non_negative_int(getattr(self, name)):
                fail(name, "a non-negative integer")
        if self.loss_steps is not None and not _non_negative_int(self.loss_steps):
            fail("loss_steps", "None (the model's grid), 0 (continuous time) or K >= 1")
        for name in ("num_levels",):
            value = getattr(self, name)
            if value is not None and not (_positive_int(value) and value >= 2):
                fail(name, "None or an integer K >= 2")
        if self.image_size is not None and not (_positive_int(self.image_size) and self.image_size <= 4096):
            fail("image_size", "None or a side length in 1..4096 pixels")
        for name, allowed in (("image_mode", IMAGE_MODES), ("channels_last", CHANNELS_LAST)):
            if getattr(self, name) not in allowed:
                fail(name, f"one of {allowed}")
        if self.schedule_hidden is not None and not _positive_int(self.schedule_hidden):
            fail("schedule_hidden", "None or a positive integer")
        if self.seed >= runs.SEED_LIMIT:
            fail("seed", "an integer in [0, 2**32)")
        if not (_number(self.lr) and 0 < self.lr <= MAX_LR):
            fail("lr", f"a positive learning rate <= {MAX_LR:g}")
        if self.schedule_lr is not None and not (
            _number(self.schedule_lr) and 0 <= self.schedule_lr <= MAX_LR
        ):
            fail("schedule_lr", f"None or a learning rate in [0, {MAX_LR:g}]")
        if not (_number(self.weight_decay) and self.weight_decay >= 0):
            fail("weight_decay", "a number >= 0")
        if not (_number(self.dropout) and 0 <= self.dropout < 1):
            fail("dropout", "a rate in [0, 1)")
        if (self.fourier_min is None) != (self.fourier_max is None):
            fail("fourier_min", "both --fourier-min and --fourier-max, or neither")
        if self.fourier_min is not None and not (
            isinstance(self.fourier_min, int)
            and isinstance(self.fourier_max, int)
            and not isinstance(self.fourier_min, bool)
            and not isinstance(self.fourier_max, bool)
            and -8 <= self.fourier_min <= self.fourier_max <= 12
        ):
            fail("fourier_min", "integers with -8 <= fourier_min <= fourier_max <= 12")
        if not (_number(self.lr_final_fraction) and 0 < self.lr_final_fraction <= 1):
            fail("lr_final_fraction", "a value in (0, 1]")
        for name in ("clip_value", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not (_number(value) and value > 0):
                fail(name, "None or a positive number")
        if not (_number(self.ema) and (self.ema == 0 or 0 < self.ema < 1)):
            fail("ema", "0 (no average) or a decay in (0, 1)")
        if self.max_beta is not None and not (_number(self.max_beta) and 0 < self.max_beta < 1):
            fail("max_beta", "None or a value in (0, 1)")
        for name in (
            "log_snr_max",
            "log_snr_min",
            "beta_start",
            "beta_end",
            "gamma_min",
            "gamma_max",
            "anchor",
            "embed_gamma_min",
            "embed_gamma_max",
        ):
            value = getattr(self, name)
            if value is not None and not _number(value):
                fail(name, "a finite number")
        if (
            None not in (self.embed_gamma_min, self.embed_gamma_max)
            and not self.embed_gamma_min < self.embed_gamma_max
        ):
            raise ValueError(
                "embed_gamma_min, embed_gamma_max: expected min < max, "
                f"got {self.embed_gamma_min}, {self.embed_gamma_max}"
            )
        for name in ("learn_shape", "freeze_endpoints", "progress"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if self.level_prior is not None and not isinstance(self.level_prior, bool):
            fail("level_prior", "None (chosen from the data), True or False")
        if not isinstance(self.device, str):
            fail("device", "a torch device name such as 'cpu' or 'cuda'")
        if self.log_snr_max is not None and not self.log_snr_max > self.log_snr_min:
            raise ValueError(
                f"log_snr_max, log_snr_min: expected max > min, got {self.log_snr_max}, {self.log_snr_min}"
            )
        if self.gamma_min is not None and self.gamma_max is not None and not self.gamma_min < self.gamma_max:
            raise ValueError(
                f"gamma_min, gamma_max: expected gamma_min < gamma_max, got {self.gamma_min}, {self.gamma_max}"
            )
        objective = OBJECTIVES[self.objective]
        if self.times is not None and self.times not in objective.times:
            raise ValueError(
                f"times: objective {self.objective!r} takes {objective.times}, got {self.times!r}"
            )
        if self.loss_steps == 0 and (self.times == "importance" or self.objective == "elbo-is"):
            raise ValueError(
                "times: importance sampling needs a grid (loss_steps unset or K), not continuous time"
            )
        if objective.variance == "learned" and self.variance not in (None, "learned"):
            raise ValueError(
                f"variance: objective {self.objective!r} trains learned variances, got {self.variance!r}"
            )
        if self.eval_every and not self.val_size:
            raise ValueError("eval_every: checkpoint selection needs a validation split (val_size > 0)")
        if self.schedule is not None:
            learned = self.schedule in ("learned", "learned-multivariate")
            for name, wrong in (
                ("freeze_endpoints", self.freeze_endpoints and not learned),
                ("learn_shape", not self.learn_shape and not learned),
                ("schedule_hidden", self.schedule_hidden is not None and not learned),
                ("max_beta", self.max_beta is not None and self.schedule != "cosine"),
            ):
                if wrong:
                    raise ValueError(f"{name}: not an option of schedule {self.schedule!r}")

    def resolved(self, dataset: Dataset | DataShape | None = None) -> TrainConfig:
        """A copy with the data-dependent defaults filled in (schedule, network, level_prior:
        on for K-level data whose training split takes fewer than half of the K levels, such as
        the digits stored as 8-bit data, 17 of 256; off without the data themselves)."""
        values = {}
        if self.level_prior is None:
            values["level_prior"] = _few_levels_used(dataset)
        if self.schedule is None:
            values["schedule"] = "log-snr" if dataset is not None and dataset.num_levels else "linear"
        if self.network is None:
            values["network"] = "mlp"
        if self.log_snr_max is None:
            values["log_snr_max"] = default_log_snr_max(dataset.num_levels if dataset is not None else None)
        return dataclasses.replace(self, **values) if values else self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**values)

    def flags(self, *, skip: Sequence[str] = ("progress",)) -> list[str]:
        """The ``pyro-diffusion train`` flags that make this configuration (the fields that
        differ from the defaults, except those in ``skip``)."""
        default = TrainConfig()
        flags: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in skip or value == getattr(default, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
            else:
                flags += [flag, repr(value) if isinstance(value, float) else str(value)]
        return flags


def default_log_snr_max(num_levels: int | None) -> float:
    """The log-snr schedule's log SNR at t = 1 chosen for the data: 7 (σ_1 ≈ 0.03) for
    continuous data and for 17 levels, and for K levels 7 + 2 ln((K − 1)/16), which keeps σ_1
    the same fraction (about a quarter) of the spacing between levels, 2/(K − 1): 12.5 for
    256-level data, so the first steps resolve the levels the decoder must tell apart."""
    if not num_levels:
        return 7.0
    return 7.0 + 2.0 * math.log((num_levels - 1) / 16)


def _few_levels_used(dataset) -> bool:
    train = getattr(dataset, "train", None)
    if dataset is None or not dataset.num_levels or train is None:
        return False
    return to_levels(train, dataset.num_levels).unique().numel() < dataset.num_levels / 2


class ConfigMismatchError(ValueError):
    """A checkpoint was written under another configuration than the one asked for."""


class DataShape(NamedTuple):
    """What the model needs to know about its data: one datum's shape, and K for K-level
    data (None for continuous data).  A :class:`~pyro_diffusion.data.Dataset` has both."""

    event_shape: tuple[int, ...]
    num_levels: int | None = None


# ---------------------------------------------------------------------------- building
def build_schedule(config: TrainConfig, event_shape: tuple[int, ...] | None = None) -> Schedule:
    """The schedule named by ``config.schedule`` (see :data:`~pyro_diffusion.schedules.SCHEDULES`)
    at ``config.num_steps`` levels, with the configuration's options; ``event_shape``: the
    data's, for a per-dimension schedule (``learned-multivariate``)."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {config.schedule!r}")
    options = {
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "log_snr_max": 7.0 if config.log_snr_max is None else config.log_snr_max,
        "log_snr_min": config.log_snr_min,
        "learn_shape": config.learn_shape,
    }
    for name in ("gamma_min", "gamma_max"):
        if getattr(config, name) is not None:
            options[name] = float(getattr(config, name))
    if config.schedule_hidden is not None:
        options["hidden"] = config.schedule_hidden
    if config.max_beta is not None:
        options["max_beta"] = float(config.max_beta)
    if event_shape is not None:
        options["event_shape"] = tuple(event_shape)
    return SCHEDULES[config.schedule](config.num_steps, **options)


def build_diffusion(
    config: TrainConfig, dataset: Dataset | DataShape, *, device: str | torch.device | None = None
) -> Diffusion:
    """The :class:`~pyro_diffusion.diffusion.Diffusion` for ``config`` on ``dataset`` (a
    :class:`~pyro_diffusion.data.Dataset` or a :class:`DataShape`): the configuration's
    schedule, network, decoder (discretized for K-level data), mean and variance, and
    ``config.num_steps`` noise levels; weights initialized from ``config.seed``; on
    ``device`` (default ``config.device``).  The network's noise-level embedding spans
    [``embed_gamma_min``, ``embed_gamma_max``], by default the model's own levels (γ_1, γ_T),
    so that its resolution is spent where the chain lives."""
    config = config.resolved(dataset)
    objective = OBJECTIVES[config.objective]
    variance = config.variance or objective.variance
    gamma_range = (config.embed_gamma_min, config.embed_gamma_max)
    if None in gamma_range:
        with torch.random.fork_rng():  # the range alone; the generator's stream is left as it was
            levels = build_schedule(config, tuple(dataset.event_shape)).grid(config.num_steps).detach()
        if levels.dim() > 1:  # per-dimension levels: the network sees their mean
            levels = levels.reshape(levels.shape[0], -1).mean(1)
        gamma_range = (
            levels[0].item() if config.embed_gamma_min is None else config.embed_gamma_min,
            levels[-1].item() if config.embed_gamma_max is None else config.embed_gamma_max,
        )
    torch.manual_seed(config.seed)
    denoiser = NETWORKS[config.network](config, dataset.event_shape, variance == "learned", gamma_range)
    return Diffusion(
        denoiser,
        build_schedule(config, tuple(dataset.event_shape)),
        tuple(dataset.event_shape),
        mean=config.mean,
        variance=variance,
        decoder=config.decoder,
        num_levels=dataset.num_levels,
        level_prior=config.level_prior,
        num_steps=config.num_steps,
        anchor=config.anchor,
    ).to(device if device is not None else config.device)


def make_loss(config: TrainConfig) -> ELBO:
    """The objective's loss on the grid ``config.loss_steps`` with the draws ``config.times``."""
    return OBJECTIVES[config.objective].make_loss(num_steps=config.loss_steps, times=config.times)


def parameter_settings(
    lr: float, schedule_lr: float | None = None, weight_decay: float = 0.0, freeze_endpoints: bool = False
) -> Callable[[str], dict]:
    """Optimizer settings as a function of a parameter's name in
    ``diffusion.named_parameters()`` (``schedule.gamma_min``, ``denoiser.input.weight``,
    ``decoder_log_scale``): learning rate ``schedule_lr`` (None: ``lr``) for the schedule,
    ``lr`` for the rest, L2 ``weight_decay`` on the network only; ``freeze_endpoints``:
    learning rate 0 for the schedule's ``gamma_min`` and ``gamma_max``."""

    def per_param(name: str) -> dict:
        parts = name.split(".")
        schedule = parts[0] == "schedule"
        rate = schedule_lr if schedule and schedule_lr is not None else lr
        if freeze_endpoints and schedule and parts[-1] in ("gamma_min", "gamma_max"):
            rate = 0.0
        return {"lr": rate, "weight_decay": weight_decay if parts[0] == "denoiser" else 0.0}

    return per_param


def param_groups(module: nn.Module, settings: Callable[[str], dict]) -> list[dict]:
    """The optimizer's parameter groups: the trainable parameters of ``module``, one group per
    distinct setting of ``settings`` (:func:`parameter_settings`), in the order of
    ``named_parameters()``."""
    groups: dict[tuple, dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        args = settings(name)
        group = groups.setdefault(tuple(sorted(args.items())), {"params": [], **args})
        group["params"].append(param)
    return list(groups.values())


def make_optimizer(
    config: TrainConfig, diffusion: nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """``torch.optim.Adam`` (fused on a GPU) over the :func:`param_groups` of ``diffusion``;
    with ``lr_final_fraction < 1`` also an ``ExponentialLR`` whose factor per step takes the
    learning rate to ``lr · lr_final_fraction`` after ``config.steps`` steps (else None)."""
    settings = parameter_settings(config.lr, config.schedule_lr, config.weight_decay, config.freeze_endpoints)
    on_gpu = next(diffusion.parameters()).device.type == "cuda"
    optimizer = torch.optim.Adam(
        param_groups(diffusion, settings), lr=config.lr, fused=True if on_gpu else None
    )
    if config.lr_final_fraction == 1.0:
        return optimizer, None
    decay = config.lr_final_fraction ** (1.0 / config.steps)
    return optimizer, torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)


def build_engine(config: TrainConfig, diffusion: Diffusion, *, desc: str | None = None) -> Engine:
    """The :class:`~pyro_diffusion.engine.Engine` that trains ``diffusion`` as ``config``
    says: its loss (:func:`make_loss`), optimizer and learning-rate schedule
    (:func:`make_optimizer`), clipping, moving average, data order and validation (the bound
    on the training loss's grid, ``val_times`` draws per datum)."""
    optimizer, lr_scheduler = make_optimizer(config, diffusion)
    loss_steps, val_times = config.loss_steps, config.val_times

    def validate(model, data):
        return engine_module.validation_bound(model, data, num_steps=loss_steps, num_times=val_times)

    return Engine(
        diffusion,
        make_loss(config),
        optimizer,
        lr_scheduler=lr_scheduler,
        clip_value=config.clip_value,
        clip_norm=config.clip_norm,
        ema=config.ema,
        batch_size=config.batch_size,
        sampling=config.sampling,
        seed=config.seed,
        eval_every=config.eval_every,
        validate=validate,
        log_every=config.log_every,
        progress=config.progress,
        desc=desc or config.objective,
    )


def split_validation(train: torch.Tensor, val_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(training part, validation part) of ``train``: ``val_size`` data drawn by a fixed
    permutation (``seed``, the same for every configuration and training seed) are held out."""
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < train.shape[0]:
        raise ValueError(f"val_size: expected an integer in [0, {train.shape[0]}), got {val_size!r}")
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    return train[order[val_size:]], train[order[:val_size]]


def load_run_data(config: TrainConfig) -> Dataset:
    """The run's data set.  2-D sets are drawn with seed 0 whatever the run's seed, so that
    runs of different seeds see the same data and the same test split.  Images the U-Net
    cannot take (it halves height and width once) are refused here, before anything is written."""
    dataset = load_dataset(
        config.data,
        num_train=config.num_train,
        num_test=config.num_test,
        seed=0,
        num_levels=config.num_levels,
        image_size=config.image_size,
        image_mode=config.image_mode,
        channels_last=config.channels_last,
    )
    if config.network == "unet" and dataset.is_image and any(n % 2 for n in dataset.event_shape[1:]):
        height, width = dataset.event_shape[1:]
        raise ValueError(
            f"network: 'unet' needs images of even height and width, got {height}×{width}; resize them "
            "(an image folder: image_size=S with S even) or use network='mlp'"
        )
    return dataset


# ---------------------------------------------------------------------------- files (seams)
def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same directory, ``fsync``, then
    ``os.replace``: a reader never sees a half-written file, even if the process dies
    mid-write (:func:`pyro_diffusion.runs.atomic_save`)."""
    runs.atomic_save(obj, path)


def write_json(obj, path: str | Path) -> None:
    """Write JSON atomically (:func:`pyro_diffusion.runs.write_json`)."""
    runs.write_json(obj, path)


def read_json(path: str | Path, argument: str | None = None) -> dict:
    """The JSON object in ``path`` (``{}`` when there is none); malformed JSON is one
    :class:`~pyro_diffusion.runs.RunFileError` naming the file."""
    return runs.read_json(path, argument=argument)


def save_checkpoint(checkpoint: dict, out: str | Path) -> None:
    """Write a run's checkpoint (``out/checkpoint.pt``), atomically."""
    atomic_save(checkpoint, Path(out) / CHECKPOINT)


def load_checkpoint(path: str | Path, argument: str = "checkpoint") -> dict:
    """A checkpoint written by :func:`train` (a run directory or the file itself), loaded on
    the CPU with ``weights_only=True`` (tensors and plain Python values only; nothing in the
    file is executed) and checked: a file that is missing, empty, truncated, corrupt, of
    another format, or lacks the keys of a run's checkpoint is refused with one
    :class:`~pyro_diffusion.runs.RunFileError` (a ``ValueError``) naming ``argument`` and the
    file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    checkpoint = runs.load_checkpoint(path, argument=argument, required=CHECKPOINT_KEYS)
    state = checkpoint["engine"]
    for key, kind in (("model", dict), ("step", int)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise runs.RunFileError(
                f"{argument}: {path} is not a pyro-diffusion checkpoint: its engine state has no {key!r}"
            )
    if not isinstance(checkpoint["data"].get("event_shape"), list):
        raise runs.RunFileError(f"{argument}: {path} is not a pyro-diffusion checkpoint: no data event_shape")
    return checkpoint


def read_metrics(out: str | Path, argument: str = "metrics.json") -> dict:
    """A run's ``metrics.json`` (empty when there is none yet; malformed: a
    :class:`~pyro_diffusion.runs.RunFileError`)."""
    return read_json(Path(out) / METRICS, argument=argument)


def write_metrics(metrics: dict, out: str | Path) -> None:
    """Write a run's ``metrics.json``, atomically."""
    write_json(metrics, Path(out) / METRICS)


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in TrainConfig.MUTABLE}


# Fields that a run directory written by an earlier version lacks, with the value that version
# used (not today's default, where the two differ): the network's level embedding spanned
# γ ∈ [−15, 15] before the range became a field.  Fields added with a default that keeps the
# earlier behaviour (an option that is off) need no entry.
EARLIER_VALUES = {"embed_gamma_min": -15.0, "embed_gamma_max": 15.0}


def _config_from(values: dict, path, argument: str) -> TrainConfig:
    """``TrainConfig.from_dict(values)`` with a malformed configuration (unknown fields, bad
    values) reported as one :class:`~pyro_diffusion.runs.RunFileError` naming ``path``.  A field
    the file lacks (written by an earlier version) takes the value that version used
    (:data:`EARLIER_VALUES`), else the default."""
    values = {**{k: v for k, v in EARLIER_VALUES.items() if k not in values}, **values}
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise runs.RunFileError(
            f"{argument}: {path} holds an invalid configuration ({runs.one_line(error, 200)})"
        ) from None


def read_config(out: str | Path, argument: str = "--run") -> TrainConfig:
    """The :class:`TrainConfig` of the run directory ``out`` (its ``config.json``)."""
    path = Path(out) / CONFIG
    return _config_from(runs.read_json(path, argument=argument, missing_ok=False), path, argument)


def check_same_config(saved: dict, wanted: dict, where: str) -> None:
    """Raise :class:`ConfigMismatchError` listing the fields where two configurations differ
    (ignoring those a resumed run may change: steps, device, checkpoint_every, progress,
    log_every)."""
    defaults = TrainConfig().to_dict()  # fields added after a checkpoint was written
    a, b = _comparable({**defaults, **saved}), _comparable({**defaults, **wanted})
    keys = sorted(set(a) | set(b))
    diffs = [
        f"{k}: checkpoint has {a.get(k)!r}, asked for {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)
    ]
    if diffs:
        raise ConfigMismatchError(
            f"resume: the checkpoint in {where} was written under another configuration; "
            "refusing to continue it. Differences: " + "; ".join(diffs)
        )


# ---------------------------------------------------------------------------- fitting
class Fitted(NamedTuple):
    """What :func:`fit` returns: the resolved configuration, the diffusion holding the
    selected weights (in eval mode), the engine, the data set and the metrics."""

    config: TrainConfig
    diffusion: Diffusion
    engine: Engine
    dataset: Dataset
    metrics: dict


def _process_device(device: str) -> torch.device:
    """This process's device: under ``torch.distributed`` a bare ``cuda`` is the process's own
    GPU (``LOCAL_RANK``)."""
    device = torch.device(device)
    rank, world_size = world()
    if device.type == "cuda" and device.index is None and world_size > 1:
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        device = torch.device("cuda", local)
    return device


def fit(
    config: TrainConfig,
    *,
    dataset: Dataset | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    hooks: Sequence[Callable[[Engine], None]] = (),
    figures: bool = False,
) -> Fitted:
    """Train ``config`` with the engine; with ``out``, into (or continuing) a run directory.

    The data: ``dataset`` or :func:`load_run_data`; ``config.val_size`` training data held
    out (:func:`split_validation`).  The model: :func:`build_diffusion` (weights from
    ``config.seed``, after the global RNGs are seeded with it); the training: :func:`build_engine`,
    its draws continuing that stream (under ``torch.distributed`` every other process starts
    a stream of its own, :func:`~pyro_diffusion.engine.process_seed`), or the RNG states
    restored from the checkpoint.  Each step takes a minibatch and one optimizer step on the objective's
    loss; the recorded loss is per datum (nats for ``elbo``/``elbo-is``, an estimate of −ELBO).

    Args:
        config: the run's configuration.
        dataset: an already loaded data set.
        out: the run directory (created): ``config.json`` at the start, ``checkpoint.pt``
            every ``config.checkpoint_every`` steps and at the end, ``metrics.json``.  It must
            not hold a checkpoint unless ``resume``.
        resume: continue from ``out/checkpoint.pt``; the saved configuration must match
            ``config`` except for ``steps``/``device``/``checkpoint_every``/``progress``/``log_every``.
        stop_after: stop (after checkpointing) once this many steps are done in total, as if
            interrupted; for tests and time-boxed runs.
        hooks: called as ``hook(engine)`` after every optimizer step.
        figures: write loss-curve, sample and schedule figures into ``out`` at the end.

    Under ``torch.distributed`` every process calls it (with the same arguments); process 0
    writes the files.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if resume and out is None:
        raise ValueError("resume: needs a run directory (out)")
    rank, world_size = world()
    if out is not None:
        out = runs.check_out(out)
    runs.check_device(config.device)
    dataset = dataset or load_run_data(config)
    config = config.resolved(dataset)
    device = _process_device(config.device)
    with contextlib.ExitStack() as held:
        if out is not None and rank == 0:  # one writer per run directory; a second is refused
            held.enter_context(runs.RunLock(out, argument="--out"))
        return _fit(config, dataset, device, out, resume, stop_after, hooks, figures, rank, world_size)


def _fit(config, dataset, device, out, resume, stop_after, hooks, figures, rank, world_size) -> Fitted:
    checkpoint = None
    fingerprint = runs.dataset_fingerprint(dataset)
    if out is not None:
        if (out / CHECKPOINT).exists():
            if not resume:
                raise FileExistsError(
                    f"--out: {out} already holds a checkpoint; pass resume=True (--resume) to continue it "
                    "or choose another run directory"
                )
            checkpoint = load_checkpoint(out / CHECKPOINT, argument="--out")
            check_same_config(checkpoint["config"], config.to_dict(), str(out))
            runs.check_fingerprint(
                checkpoint.get("data_fingerprint"), fingerprint, where=out, argument="--data"
            )
        elif resume:
            raise FileNotFoundError(f"--resume: no checkpoint in {out}; start the run without --resume")

    train_data, val_data = dataset.train, None
    if config.val_size:
        train_data, val_data = split_validation(dataset.train, config.val_size)
    if checkpoint is None:  # the weights and then the training draws, one stream from the seed
        pyro.set_rng_seed(config.seed)  # torch, numpy and python
    diffusion = build_diffusion(config, dataset, device=device)
    if checkpoint is None and diffusion.level_prior:  # before the engine copies the weights (EMA)
        diffusion.init_level_prior(train_data.to(device))
    engine = build_engine(config, diffusion)
    if checkpoint is not None:
        runs.check_module_state(
            diffusion, checkpoint["engine"]["model"], path=out / CHECKPOINT, argument="--out"
        )
        try:
            engine.load_state_dict(checkpoint["engine"])
        except (KeyError, IndexError, TypeError, RuntimeError) as error:
            raise runs.RunFileError(
                f"--out: {out / CHECKPOINT} does not hold a resumable engine state ({runs.one_line(error, 160)})"
            ) from None
        if rank == 0:  # the test metrics describe weights this run is about to change
            metrics = read_metrics(out)
            if runs.invalidate_test_metrics(dict(metrics)) != metrics:
                write_metrics(runs.invalidate_test_metrics(metrics), out)
    else:
        if rank > 0:  # each process its own draws; process 0 continues the seed's stream
            pyro.set_rng_seed(process_seed(config.seed, rank))
        if out is not None and rank == 0:
            write_json(config.to_dict(), out / CONFIG)
            (out / METRICS).unlink(missing_ok=True)  # an earlier run's metrics describe other weights
    shape = {"event_shape": list(dataset.event_shape), "num_levels": dataset.num_levels}

    def save(engine: Engine) -> None:
        state = engine.state_dict()  # a collective under torch.distributed
        if rank == 0:
            save_checkpoint(
                {"config": config.to_dict(), "data": shape, "data_fingerprint": fingerprint, "engine": state},
                out,
            )
        if world_size > 1:  # no process reads the directory before process 0 has written it
            torch_dist.barrier()

    engine.run(
        train_data.to(device),
        config.steps,
        val_data=None if val_data is None else val_data.to(device),
        hooks=hooks,
        stop_after=stop_after,
        checkpoint_every=config.checkpoint_every,
        on_checkpoint=save if out is not None else None,
    )
    diffusion.load_state_dict(engine.selected_state_dict())
    diffusion.eval()

    history = engine.history
    metrics = read_metrics(out) if out is not None and rank == 0 else {}
    metrics.update(
        {
            "objective": config.objective,
            "steps": engine.step_count,
            "train_seconds": engine.seconds,
            "loss_history": history,
            # the progress bar's number: the per-datum loss averaged over the last 50 steps
            "final_loss": float(np.mean(history[-FINAL_LOSS_STEPS:])) if history else None,
            "finished": engine.step_count >= config.steps,
            "world_size": world_size,
            "selected": engine.selection,
        }
    )
    if engine.best is not None:
        metrics.update(
            best_step=engine.best["step"],
            val_bits_per_dim=engine.best["value"],
            val_history=engine.val_history,
        )
    if out is not None and rank == 0:
        write_metrics(metrics, out)
        if figures and engine.step_count >= config.steps:
            _figures(config, diffusion, dataset, history, out)
    if world_size > 1:
        torch_dist.barrier()
    return Fitted(config, diffusion, engine, dataset, metrics)


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    dataset: Dataset | None = None,
    stop_after: int | None = None,
    figures: bool = True,
) -> dict:
    """:func:`fit` into the run directory ``out`` (with figures by default); returns the
    metrics dict (also written to ``out/metrics.json``)."""
    return fit(
        config, dataset=dataset, out=out, resume=resume, stop_after=stop_after, figures=figures
    ).metrics


def _figures(config: TrainConfig, diffusion: Diffusion, dataset: Dataset, history, out: Path) -> None:
    from . import plots

    plots.loss_curves({config.objective: history}, out / "loss.png")
    samples = diffusion.sample(64 if dataset.is_image else 1000, progress=config.progress)
    if dataset.is_image:
        plots.sample_grid(samples, out / "samples.png")
    else:
        plots.scatter({"data": dataset.test[:1000], "samples": samples}, out / "samples.png")
    schedule_figure(diffusion, out / "schedule.png", label=config.schedule)


def schedule_figure(diffusion: Diffusion, path: str | Path, label: str = "") -> Path:
    """γ = −log SNR at the model's own T levels against t = (k − 1)/(T − 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        gammas = diffusion.grid().cpu().numpy()
    gammas = gammas.reshape(gammas.shape[0], -1)  # a per-dimension schedule: one curve per dimension
    times = np.linspace(0, 1, len(gammas))
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    lines = ax.plot(times, gammas, lw=1.5 if gammas.shape[1] == 1 else 0.5)
    if label:
        lines[0].set_label(label)
    ax.set(
        xlabel="t",
        ylabel="γ(t) = −log SNR(t)",
        title=f"schedule: γ ∈ [{gammas.min():.2f}, {gammas.max():.2f}]",
    )
    if label:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- using a run
def _read_run(out: str | Path, argument: str = "--run") -> tuple[dict, TrainConfig]:
    """The checked checkpoint of the run directory ``out`` and its configuration: the
    directory must hold ``config.json`` and ``checkpoint.pt``, the checkpoint must load
    (:func:`load_checkpoint`) and agree with ``config.json`` (else it is another run's)."""
    out = runs.check_run_dir(out, argument=argument, needs=(CONFIG, CHECKPOINT))
    saved = read_config(out, argument)
    checkpoint = load_checkpoint(out / CHECKPOINT, argument=argument)
    config = _config_from(checkpoint["config"], out / CHECKPOINT, argument)
    try:
        check_same_config(saved.to_dict(), config.to_dict(), str(out))
    except ConfigMismatchError as error:
        differences = str(error).split("Differences: ", 1)[-1].replace("asked for", "config.json has")
        raise runs.RunFileError(
            f"{argument}: {out / CHECKPOINT} belongs to another run than {out / CONFIG} ({differences})"
        ) from None
    return checkpoint, config


def _model_from(
    checkpoint: dict, config: TrainConfig, device, path=None, argument: str = "--run"
) -> Diffusion:
    shape = checkpoint["data"]
    try:
        data = DataShape(tuple(shape["event_shape"]), shape.get("num_levels"))
        diffusion = build_diffusion(config, data, device="cpu")
        weights = engine_module.selected_weights(checkpoint["engine"])
    except (KeyError, TypeError, ValueError) as error:
        raise runs.RunFileError(
            f"{argument}: {path} does not describe a model that can be rebuilt ({runs.one_line(error, 160)})"
        ) from None
    runs.load_module_state(diffusion, weights, path=path, argument=argument)
    return diffusion.to(device if device is not None else config.device).eval()


def load_model(out: str | Path, device: str | torch.device | None = None) -> Diffusion:
    """The trained :class:`~pyro_diffusion.diffusion.Diffusion` of the run directory ``out``,
    rebuilt from its stored configuration, with the selected weights (the best validated
    checkpoint, else the moving average, else the last weights), in eval mode, on ``device``
    (default: the run's).  Needs nothing but the directory: not the data, not the code that
    trained it.  A malformed or foreign checkpoint is one
    :class:`~pyro_diffusion.runs.RunFileError`.

    Example::

        >>> from pyro_diffusion.training import load_model
        >>> diffusion = load_model("runs/moons")
        >>> samples = diffusion.sample(1000)
    """
    checkpoint, config = _read_run(out, "run")
    if device is not None:
        device = runs.check_device(str(device), argument="device")
    else:
        runs.check_device(config.device, argument="device")
    return _model_from(checkpoint, config, device, Path(out) / CHECKPOINT, "run")


def _open_run(out, device, argument: str = "--run"):
    """(checkpoint, configuration, diffusion, data set) of a run, its data checked against
    the fingerprint stored with it."""
    checkpoint, config = _read_run(out, argument)
    if device is not None:
        config = dataclasses.replace(config, device=runs.check_device(device))
    else:
        runs.check_device(config.device)
    dataset = load_run_data(config)
    runs.check_fingerprint(
        checkpoint.get("data_fingerprint"), runs.dataset_fingerprint(dataset), where=out, argument="data"
    )
    diffusion = _model_from(checkpoint, config, device, Path(out) / CHECKPOINT, argument)
    return checkpoint, config, diffusion, dataset


def load_run(out: str | Path, device: str | None = None) -> tuple[TrainConfig, Diffusion, Dataset]:
    """The run's configuration, its trained diffusion (:func:`load_model`) and its data set
    (refused if it changed since the run was trained)."""
    _, config, diffusion, dataset = _open_run(out, device)
    return config, diffusion, dataset


def bound_bits_per_dim(
    diffusion: Diffusion,
    test: torch.Tensor,
    *,
    num_steps: int | None = None,
    batch_size: int = 300,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Test NLL bound in bits/dim from all the terms of a grid (None: the model's own T
    levels; K: a K-level grid), with its per-step profile.

    Returns ``{"bits_per_dim", "bits_per_dim_se", "profile_bits"}`` where ``profile_bits``
    has length T + 1 (entry i = mean term i in bits/dim, i = 0 the decoder term, i = T the
    prior term) and the standard error is over test data (one draw of each x_t per datum)."""
    torch.manual_seed(seed)
    device = diffusion.device
    rows = []
    with torch.no_grad():
        for start in tqdm(range(0, test.shape[0], batch_size), desc="evaluate", disable=not progress):
            batch = test[start : start + batch_size].to(device)
            rows.append(diffusion.vlb_terms(batch, num_steps=num_steps).cpu())
    terms = torch.cat(rows).double() / (diffusion.event_size * math.log(2))
    per_datum = terms.sum(1)
    return {
        "bits_per_dim": per_datum.mean().item(),
        "bits_per_dim_se": (per_datum.std() / math.sqrt(len(per_datum))).item(),
        "profile_bits": terms.mean(0).tolist(),
    }


def continuous_bound(
    diffusion: Diffusion,
    test: torch.Tensor,
    *,
    num_times: int = 100,
    seed: int = EVALUATION_SEED,
    progress: bool = False,
):
    """The continuous-time test bound (a :class:`~pyro_diffusion.bound.BoundEstimate` in
    bits/dim: ``num_times`` draws of the one-step estimator per datum), with the draws of
    ``seed`` (the same for every run, so runs are compared on the same draws); ``progress``:
    a progress bar over the draws."""
    from .bound import bound

    torch.manual_seed(seed)
    with torch.no_grad():
        return bound(
            diffusion, test.to(diffusion.device), num_steps=0, num_times=num_times, progress=progress
        )


def evaluate_run(
    out: str | Path,
    *,
    device: str | None = None,
    num_steps: int | None = None,
    num_times: int | None = None,
    importance_particles: int | None = None,
    progress: bool = False,
) -> dict:
    """``evaluate --run DIR``: the test bound in bits/dim into ``DIR/metrics.json``.

    On the grid of the run's training loss unless ``num_steps`` is given: on a grid (None the
    model's own, or K levels) all its terms once per test datum, with the per-step profile
    figure ``DIR/profile.png``; in continuous time (0) :func:`continuous_bound` with ``num_times``
    draws per datum (default 100).

    ``importance_particles`` = M: instead, the importance-weighted bound
    (:func:`~pyro_diffusion.bound.importance_weighted_bound`, M whole trajectories per estimate,
    two estimates per datum) on the chain of ``num_steps`` levels (None: the model's own grid;
    a grid is needed, not continuous time), stored as ``test_iw_bits_per_dim`` beside the
    ELBO.  Returns the updated metrics."""
    if num_times is not None and not _positive_int(num_times):
        raise ValueError(f"num_times: expected a positive integer, got {num_times!r}")
    if importance_particles is not None:
        if not _positive_int(importance_particles):
            raise ValueError(
                f"importance_particles: expected a positive integer, got {importance_particles!r}"
            )
        if num_steps == 0:
            raise ValueError(
                "num_steps: the importance-weighted bound needs a grid of K >= 2 levels, not continuous time"
            )
    out = runs.check_run_dir(out, needs=(CONFIG, CHECKPOINT))
    with runs.RunLock(out, argument="--run"):  # evaluate writes metrics.json: one writer at a time
        if importance_particles is not None:
            return _evaluate_importance_weighted(out, device, num_steps, importance_particles, progress)
        return _evaluate(out, device, num_steps, num_times, progress)


def _evaluate_importance_weighted(out: Path, device, num_steps, particles: int, progress) -> dict:
    from .bound import importance_weighted_bound

    checkpoint, config, diffusion, dataset = _open_run(out, device)
    levels = diffusion.grid(num_steps).shape[0]
    if levels < 2:
        raise ValueError("num_steps: the importance-weighted bound needs a grid of K >= 2 levels")
    metrics = read_metrics(out)
    metrics["checkpoint_step"] = checkpoint["engine"]["step"]
    torch.manual_seed(EVALUATION_SEED)
    with torch.no_grad():
        estimate = importance_weighted_bound(
            diffusion,
            dataset.test.to(diffusion.device),
            num_steps=num_steps,
            num_particles=particles,
            progress=progress,
        )
    value, se = estimate.dataset_mean()
    metrics.update(
        test_iw_bits_per_dim=value,
        test_iw_bits_per_dim_se=se,
        test_iw_num_steps=int(levels),
        test_iw_particles=particles,
    )
    write_metrics(metrics, out)
    return metrics


def _evaluate(out: Path, device, num_steps, num_times, progress) -> dict:
    from . import plots

    checkpoint, config, diffusion, dataset = _open_run(out, device)
    if num_steps is None:
        num_steps = config.loss_steps
    metrics = read_metrics(out)
    metrics["checkpoint_step"] = checkpoint["engine"]["step"]
    if num_steps == 0:
        num_times = num_times or 100
        estimate = continuous_bound(diffusion, dataset.test, num_times=num_times, progress=progress)
        value, se = estimate.dataset_mean()
        metrics.update(
            test_bits_per_dim=value, test_bits_per_dim_se=se, test_num_steps=0, test_num_times=num_times
        )
        metrics.pop("test_profile_bits", None)
    else:
        result = bound_bits_per_dim(
            diffusion, dataset.test, num_steps=num_steps, seed=config.seed, progress=progress
        )
        metrics.update(
            test_bits_per_dim=result["bits_per_dim"],
            test_bits_per_dim_se=result["bits_per_dim_se"],
            test_profile_bits=result["profile_bits"],
            test_num_steps=num_steps if num_steps is not None else diffusion.num_steps,
        )
        metrics.pop("test_num_times", None)
        plots.term_profile({config.objective: result["profile_bits"]}, out / "profile.png")
    write_metrics(metrics, out)
    return metrics
