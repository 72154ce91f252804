r"""Training runs: a configuration, a model built from it, and a loop over an objective.

A run is a directory::

    config.json      the :class:`TrainConfig` (JSON), written when the run starts
    metrics.json     training loss history, steps, seconds; ``evaluate`` adds test bits/dim
    checkpoint.pt    model, optimizer and learning-rate schedule state, RNG states (torch,
                     CUDA, numpy, python), the data-order state and the objective's own state;
                     tensors and plain Python values only, so it loads with
                     ``torch.load(..., weights_only=True)``; written atomically every
                     ``checkpoint_every`` steps (temp file, then ``os.replace``)
    *.png            figures (:mod:`~pyro_diffusion.plots`)

``train(config, out, resume=True)`` continues a run exactly where its checkpoint stopped:
the parameters after ``N`` steps are the same whether or not the run was interrupted.  A
checkpoint written under another configuration is refused (:class:`ConfigMismatchError`).

**The model.**  :func:`build_diffusion` makes one :class:`~pyro_diffusion.diffusion.Diffusion`:
the schedule ``config.schedule`` from :data:`~pyro_diffusion.schedules.SCHEDULES` (the DDPM
tables ``linear``, ``cosine``, ``log-snr`` on their ``num_steps`` levels, or the functions of
time ``gamma-linear``, ``gamma-cosine``, ``learned`` on a ``num_steps``-level grid), the
network ``config.network`` (:data:`NETWORKS`), DDPM's decoder (``decoder="ddpm"``: the
network's x̂ with variance β̃_2; discretized for K-level data) and the variance the objective
asks for.  With a tabulated schedule this is exactly
:func:`~pyro_diffusion.diffusion.GaussianDiffusion`.

**The objectives** map onto the core losses:

=========  ======================================================  ==================
name       loss                                                    variances
=========  ======================================================  ==================
elbo       ``DiffusionELBO()``: −ELBO, one t ~ U{1..T} per datum   fixed ("large")
elbo-is    ``DiffusionELBO(times="importance")``                   fixed ("large")
simple     ``SimplifiedLoss()``: ‖ε − ε_θ‖²                        fixed ("large")
hybrid     ``HybridLoss()``: L_simple + λ·L_vlb                    learned
=========  ======================================================  ==================

**The optimizer.**  The loss of the model/guide pair is an ``nn.Module`` through Pyro's
``ELBOModule`` (``loss(model, guide)``, :func:`elbo_module`), and a ``torch.optim.Adam`` over
its parameters takes one step per minibatch: one optimizer for all parameters, its state a
plain ``state_dict``.  The programs run under ``pyro.settings`` ``module_local_params=True``,
so nothing is entered into Pyro's global param store.  ``lr_final_fraction < 1`` adds
``torch.optim.lr_scheduler.ExponentialLR``.

:data:`OBJECTIVES` and :data:`NETWORKS` are plain dicts: another module can add entries
(``OBJECTIVES["mine"] = Objective(...)``) and the CLI and
:mod:`~pyro_diffusion.experiments.compare` pick them up.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import ELBO
from torch import nn
from tqdm.auto import tqdm

from .data import Dataset, load_dataset
from .diffusion import Diffusion
from .losses import DiffusionELBO, HybridLoss, SimplifiedLoss
from .nets import MLPDenoiser, UNetDenoiser
from .parameterization import MEANS
from .schedules import SCHEDULES, Schedule

__all__ = [
    "TrainConfig",
    "Objective",
    "OBJECTIVES",
    "SCHEDULES",
    "NETWORKS",
    "ConfigMismatchError",
    "elbo_module",
    "build_schedule",
    "build_diffusion",
    "make_optimizer",
    "train",
    "load_checkpoint",
    "load_run",
    "bound_bits_per_dim",
    "evaluate_run",
    "atomic_save",
    "write_json",
]

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.json"


# ---------------------------------------------------------------------------- registries
@dataclass(frozen=True)
class Objective:
    """An entry of :data:`OBJECTIVES`: how to build the loss and which variances it needs.

    Args:
        make_loss: ``() -> pyro.infer.ELBO``, a loss over the diffusion's model and guide.
        variance: ``"large"``, ``"small"`` or ``"learned"`` (the denoiser then outputs twice
            the channels).
        is_bound: whether the training loss estimates −ELBO (so its values are in nats).
        description: one line for ``--help`` and tables.
    """

    make_loss: Callable[[], ELBO]
    variance: str = "large"
    is_bound: bool = True
    description: str = ""


OBJECTIVES: dict[str, Objective] = {
    "elbo": Objective(DiffusionELBO, "large", True, "full ELBO, analytic per-step KLs, t ~ U{1..T}"),
    "elbo-is": Objective(
        lambda: DiffusionELBO(times="importance"),
        "large",
        True,
        "full ELBO, t importance-sampled ∝ √E[ℓ_t²]",
    ),
    "simple": Objective(SimplifiedLoss, "large", False, "L_simple = ‖ε − ε_θ‖², t ~ U{1..T}"),
    "hybrid": Objective(HybridLoss, "learned", False, "L_simple + 0.001·L_vlb, learned variances"),
}


def _mlp(config: TrainConfig, event_shape, learned: bool, gamma_range: tuple[float, float]) -> nn.Module:
    return MLPDenoiser(tuple(event_shape), config.hidden, config.depth, learned, gamma_range=gamma_range)


def _unet(config: TrainConfig, event_shape, learned: bool, gamma_range: tuple[float, float]) -> nn.Module:
    if len(event_shape) != 3:
        raise ValueError(f"network: 'unet' needs image data (C, H, W), got event_shape {tuple(event_shape)}")
    return UNetDenoiser(
        event_shape[0], base=config.hidden, multipliers=(1, 2), learned_variance=learned, gamma_range=gamma_range
    )


#: name → ``(config, event_shape, learned_variance, gamma_range) -> network(z, γ)``; ``gamma_range``
#: is the model's own range of noise levels (γ_1, γ_T), which the network's embedding spans
NETWORKS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "unet": _unet}


# ---------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Everything that determines a run (and must match when a run is resumed).

    ``steps`` (how far to train), ``device``, ``checkpoint_every`` and ``progress`` may change
    between a run and its resumption; all other fields may not.  ``schedule`` defaults to
    ``"log-snr"`` for K-level data and ``"linear"`` otherwise; ``network`` to ``"mlp"``.
    ``num_steps`` is T, the model's number of noise levels (the table's length for the DDPM
    schedules, the grid's for the functions of time).  ``beta_start``/``beta_end`` set the
    ``linear`` table, ``log_snr_max``/``log_snr_min`` the ``log-snr`` one,
    ``gamma_min``/``gamma_max`` (None: the schedule's defaults) the endpoints of
    ``gamma-linear``, ``gamma-cosine`` and ``learned``."""

    data: str = "moons"
    objective: str = "elbo"
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    lr_final_fraction: float = 1.0
    seed: int = 0
    num_steps: int = 1000
    schedule: str | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    log_snr_max: float = 7.0
    log_snr_min: float = -9.0
    gamma_min: float | None = None
    gamma_max: float | None = None
    network: str | None = None
    hidden: int = 256
    depth: int = 3
    mean: str = "eps"
    num_train: int = 20_000
    num_test: int = 5_000
    num_levels: int | None = None
    checkpoint_every: int = 500
    device: str = "cpu"
    progress: bool = True
    extra: dict = field(default_factory=dict)

    MUTABLE = ("steps", "device", "checkpoint_every", "progress")

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the field when a value is out of range."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {sorted(OBJECTIVES)}, got {self.objective!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.network is not None and self.network not in NETWORKS:
            raise ValueError(f"network: expected one of {sorted(NETWORKS)}, got {self.network!r}")
        if self.mean not in MEANS:
            raise ValueError(f"mean: expected one of {MEANS}, got {self.mean!r}")
        for name in ("steps", "batch_size", "num_steps", "hidden", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"depth: expected a non-negative integer, got {self.depth!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if not 0 < self.lr_final_fraction <= 1:
            raise ValueError(f"lr_final_fraction: expected a value in (0, 1], got {self.lr_final_fraction!r}")
        if not self.log_snr_max > self.log_snr_min:
            raise ValueError(
                f"log_snr_max, log_snr_min: expected max > min, got {self.log_snr_max}, {self.log_snr_min}"
            )
        if self.gamma_min is not None and self.gamma_max is not None and not self.gamma_min < self.gamma_max:
            raise ValueError(
                f"gamma_min, gamma_max: expected gamma_min < gamma_max, got {self.gamma_min}, {self.gamma_max}"
            )
        return self

    def resolved(self, dataset: Dataset | None = None) -> TrainConfig:
        """A copy with the data-dependent defaults filled in (schedule, network)."""
        config = dataclasses.replace(self)
        if config.schedule is None:
            config.schedule = "log-snr" if dataset is not None and dataset.num_levels else "linear"
        if config.network is None:
            config.network = "mlp"
        return config.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**values)


class ConfigMismatchError(ValueError):
    """A checkpoint was written under another configuration than the one asked for."""


# ---------------------------------------------------------------------------- building
def build_schedule(config: TrainConfig) -> Schedule:
    """The schedule named by ``config.schedule`` (see :data:`~pyro_diffusion.schedules.SCHEDULES`)
    at ``config.num_steps`` levels, with the configuration's options."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {config.schedule!r}")
    options = {
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "log_snr_max": config.log_snr_max,
        "log_snr_min": config.log_snr_min,
    }
    for name in ("gamma_min", "gamma_max"):
        if getattr(config, name) is not None:
            options[name] = float(getattr(config, name))
    return SCHEDULES[config.schedule](config.num_steps, **options)


def build_diffusion(config: TrainConfig, dataset: Dataset) -> Diffusion:
    """The :class:`~pyro_diffusion.diffusion.Diffusion` for ``config`` on ``dataset``: DDPM's
    decoder (discretized for K-level data, ``dataset.num_levels``; Gaussian otherwise), the
    variance the objective needs, ``config.num_steps`` noise levels; a network whose noise-level
    embedding spans the model's own levels (γ_1, γ_T), so that its resolution is spent where the
    chain lives; weights initialized from ``config.seed``; on ``config.device``."""
    config = config.resolved(dataset)
    objective = OBJECTIVES[config.objective]
    learned = objective.variance == "learned"
    with torch.random.fork_rng():  # the range alone; the generator's stream is left as it was
        levels = build_schedule(config).grid(config.num_steps).detach()
    gamma_range = (levels[0].item(), levels[-1].item())
    torch.manual_seed(config.seed)
    denoiser = NETWORKS[config.network](config, dataset.event_shape, learned, gamma_range)
    return Diffusion(
        denoiser,
        build_schedule(config),
        dataset.event_shape,
        mean=config.mean,
        variance=objective.variance,
        decoder="ddpm",
        num_levels=dataset.num_levels,
        num_steps=config.num_steps,
    ).to(config.device)


def elbo_module(diffusion: Diffusion, loss: ELBO) -> nn.Module:
    """``loss(model, guide)``: Pyro's ``ELBOModule`` over the diffusion's programs in their
    ``nn.Module`` forms (``diffusion.model_module()``, ``guide_module()``: run with
    module-local parameters, nothing in Pyro's param store).  ``module(x0)`` returns the differentiable loss (a sum over the
    batch ``x0``); ``module.parameters()`` are the diffusion's."""
    if not isinstance(loss, ELBO):
        raise TypeError(f"loss: expected a pyro.infer.ELBO instance, got {type(loss).__name__}")
    return loss(diffusion.model_module(), diffusion.guide_module())


# ---------------------------------------------------------------------------- files
def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``: a
    reader never sees a half-written file, even if the process dies mid-write."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(obj, path: str | Path) -> None:
    """Write JSON atomically (temp file, then ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`train`, loaded on the CPU with ``weights_only=True``
    (tensors and plain Python values only; no arbitrary object is unpickled).  A file that
    holds anything else (e.g. a checkpoint of an earlier version, with numpy RNG state) is
    refused with a ``ValueError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint: {path} holds objects other than tensors and plain values (a checkpoint "
            "written by an earlier version of pyro_diffusion?), so it is not loaded; start a new run"
        ) from error


# ---------------------------------------------------------------------------- data order
class BatchOrder:
    """Minibatches drawn without replacement from a shuffled order, reshuffled each epoch by
    a private generator; :meth:`state_dict` captures where it stands."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size = size
        self.batch_size = min(batch_size, size)
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(size, generator=self.generator)
        self.position = 0
        self.epoch = 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.size:
            self.order = torch.randperm(self.size, generator=self.generator)
            self.position = 0
            self.epoch += 1
        index = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return index

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "order": self.order.clone(),
            "position": self.position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()
        self.position = state["position"]
        self.epoch = state["epoch"]


def _rng_state(device: str) -> dict:
    """The global RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _loss_state(loss) -> dict:
    """The objective's own tensors (e.g. the importance sampler's running ℓ_t² history)."""
    return {k: v.detach().clone() for k, v in vars(loss).items() if isinstance(v, torch.Tensor)}


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in TrainConfig.MUTABLE}


def check_same_config(saved: dict, wanted: dict, where: str) -> None:
    """Raise :class:`ConfigMismatchError` listing the fields where two configurations differ
    (ignoring those a resumed run may change: steps, device, checkpoint_every, progress)."""
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


# ---------------------------------------------------------------------------- the loop
def make_optimizer(
    config: TrainConfig, parameters
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """``torch.optim.Adam`` at ``config.lr`` over ``parameters``; with
    ``lr_final_fraction < 1`` also an ``ExponentialLR`` whose factor per step takes the
    learning rate to ``lr · lr_final_fraction`` after ``config.steps`` steps (else None)."""
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    if config.lr_final_fraction == 1.0:
        return optimizer, None
    decay = config.lr_final_fraction ** (1.0 / config.steps)
    return optimizer, torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)


def load_run_data(config: TrainConfig) -> Dataset:
    """The run's data set.  2-D sets are drawn with seed 0 whatever the run's seed, so that
    runs of different seeds see the same data and the same test split."""
    return load_dataset(
        config.data,
        num_train=config.num_train,
        num_test=config.num_test,
        seed=0,
        num_levels=config.num_levels,
    )


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    dataset: Dataset | None = None,
    stop_after: int | None = None,
    figures: bool = True,
) -> dict:
    """Train ``config`` and write the run directory ``out``.

    Each step takes a minibatch (``config.batch_size`` training data, without replacement
    within an epoch), evaluates the objective's loss through :func:`elbo_module` and takes one
    Adam step; the recorded loss is the loss per datum (nats for ``elbo``/``elbo-is``, an
    estimate of −ELBO).

    Args:
        config: the run's configuration.
        out: the run directory (created).  It must not hold a checkpoint unless ``resume``.
        resume: continue from ``out/checkpoint.pt``; the saved configuration must match
            ``config`` except for ``steps``/``device``/``checkpoint_every``/``progress``.
        dataset: an already loaded data set (else ``load_dataset(config.data, …)``).
        stop_after: stop (after checkpointing) once this many steps are done in total, as if
            interrupted; for tests and time-boxed runs.
        figures: write loss-curve and sample figures at the end.

    Returns:
        the metrics dict (also written to ``out/metrics.json``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.validate()
    dataset = dataset or load_run_data(config)
    config = config.resolved(dataset)
    checkpoint_path = out / CHECKPOINT
    checkpoint = None
    if checkpoint_path.exists():
        if not resume:
            raise FileExistsError(
                f"out: {out} already holds a checkpoint; pass resume=True (--resume) to continue it "
                "or choose another run directory"
            )
        checkpoint = load_checkpoint(checkpoint_path)
        check_same_config(checkpoint["config"], config.to_dict(), str(out))
    elif resume:
        raise FileNotFoundError(f"resume: no checkpoint in {out}; start the run without --resume")

    diffusion = build_diffusion(config, dataset)
    loss = OBJECTIVES[config.objective].make_loss()
    module = elbo_module(diffusion, loss)
    optimizer, lr_schedule = make_optimizer(config, module.parameters())
    data = dataset.train.to(config.device)
    order = BatchOrder(data.shape[0], config.batch_size, config.seed)

    history: list[float] = []
    step = 0
    seconds = 0.0
    if checkpoint is not None:
        diffusion.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optim"])
        if lr_schedule is not None:
            lr_schedule.load_state_dict(checkpoint["lr_schedule"])
        for key, value in checkpoint["loss_state"].items():
            setattr(loss, key, value.to(config.device))
        order.load_state_dict(checkpoint["order"])
        _set_rng_state(checkpoint["rng"])
        history = list(checkpoint["history"])
        step = checkpoint["step"]
        seconds = checkpoint["seconds"]
    else:
        pyro.set_rng_seed(config.seed)  # torch, numpy and python
        write_json(config.to_dict(), out / CONFIG)

    def save() -> None:
        atomic_save(
            {
                "config": config.to_dict(),
                "model": diffusion.state_dict(),
                "optim": optimizer.state_dict(),
                "lr_schedule": None if lr_schedule is None else lr_schedule.state_dict(),
                "loss_state": _loss_state(loss),
                "order": order.state_dict(),
                "rng": _rng_state(config.device),
                "history": history,
                "step": step,
                "seconds": seconds,
            },
            checkpoint_path,
        )

    target = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(total=config.steps, initial=step, desc=config.objective, disable=not config.progress)
    started = time.perf_counter()
    diffusion.train()
    while step < target:
        batch = data[order.next()]
        optimizer.zero_grad(set_to_none=True)
        value = module(batch)
        value.backward()
        optimizer.step()
        if lr_schedule is not None:
            lr_schedule.step()
        value = value.item() / batch.shape[0]
        if not math.isfinite(value):
            bar.close()
            raise FloatingPointError(f"training: loss became {value} at step {step + 1}")
        history.append(value)
        step += 1
        if step % 10 == 0 or step == target:
            recent = history[-50:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4g}")
        bar.update(1)
        if step % config.checkpoint_every == 0 or step == target:
            seconds += time.perf_counter() - started
            started = time.perf_counter()
            save()
    bar.close()
    diffusion.eval()

    metrics = read_json(out / METRICS)
    metrics.update(
        {
            "objective": config.objective,
            "steps": step,
            "train_seconds": seconds,
            "loss_history": history,
            "final_loss": float(np.mean(history[-100:])) if history else None,
            "finished": step >= config.steps,
        }
    )
    write_json(metrics, out / METRICS)
    if figures and step >= config.steps:
        from . import plots

        plots.loss_curves({config.objective: history}, out / "loss.png")
        samples = diffusion.sample(64 if dataset.is_image else 1000)
        if dataset.is_image:
            plots.sample_grid(samples, out / "samples.png")
        else:
            plots.scatter({"data": dataset.test[:1000], "samples": samples}, out / "samples.png")
    return metrics


# ---------------------------------------------------------------------------- using a run
def load_run(out: str | Path, device: str | None = None) -> tuple[TrainConfig, Diffusion, Dataset]:
    """Rebuild a run's configuration, trained diffusion (from its checkpoint, in eval mode) and
    data set."""
    out = Path(out)
    if not (out / CONFIG).exists() or not (out / CHECKPOINT).exists():
        raise FileNotFoundError(f"run: {out} is not a run directory (needs {CONFIG} and {CHECKPOINT})")
    checkpoint = load_checkpoint(out / CHECKPOINT)
    config = TrainConfig.from_dict(checkpoint["config"])
    if device is not None:
        config.device = device
    dataset = load_run_data(config)
    diffusion = build_diffusion(config, dataset)
    diffusion.load_state_dict(checkpoint["model"])
    diffusion.eval()
    return config, diffusion, dataset


def bound_bits_per_dim(
    diffusion: Diffusion,
    test: torch.Tensor,
    *,
    batch_size: int = 300,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Test NLL bound in bits/dim from all T + 1 terms on the model's own grid, with its
    per-step profile.

    Returns ``{"bits_per_dim", "bits_per_dim_se", "profile_bits"}`` where ``profile_bits``
    has length T + 1 (entry i = mean term i in bits/dim, i = 0 the decoder term, i = T the
    prior term) and the standard error is over test data (one draw of each x_t per datum)."""
    torch.manual_seed(seed)
    device = diffusion.device
    rows = []
    for start in tqdm(range(0, test.shape[0], batch_size), desc="evaluate", disable=not progress):
        rows.append(diffusion.vlb_terms(test[start : start + batch_size].to(device)).cpu())
    terms = torch.cat(rows).double() / (diffusion.event_size * math.log(2))
    per_datum = terms.sum(1)
    return {
        "bits_per_dim": per_datum.mean().item(),
        "bits_per_dim_se": (per_datum.std() / math.sqrt(len(per_datum))).item(),
        "profile_bits": terms.mean(0).tolist(),
    }


def evaluate_run(out: str | Path, *, device: str | None = None, progress: bool = False) -> dict:
    """``evaluate --run DIR``: test bits/dim (all T terms) into ``DIR/metrics.json``, with the
    per-step profile figure ``DIR/profile.png``; returns the updated metrics."""
    from . import plots

    out = Path(out)
    config, diffusion, dataset = load_run(out, device)
    result = bound_bits_per_dim(diffusion, dataset.test, seed=config.seed, progress=progress)
    metrics = read_json(out / METRICS)
    metrics.update(
        {
            "test_bits_per_dim": result["bits_per_dim"],
            "test_bits_per_dim_se": result["bits_per_dim_se"],
            "test_profile_bits": result["profile_bits"],
        }
    )
    write_json(metrics, out / METRICS)
    plots.term_profile({config.objective: result["profile_bits"]}, out / "profile.png")
    return metrics
