r"""The training engine: the one loop that trains every diffusion in this package.

``pyro-diffusion train`` (:func:`~pyro_diffusion.training.fit`), ``compare``, the schedule
study (:mod:`~pyro_diffusion.experiments.schedule_study`), the cached models of
:mod:`~pyro_diffusion.inference.pretrained` and data-parallel training under ``torchrun``
(:mod:`~pyro_diffusion.distributed`) all train through :class:`Engine`:

* **the loss** is Pyro's ``ELBOModule`` of the diffusion's model and guide
  (:func:`elbo_module`: ``loss(model, guide)``, an ``nn.Module`` whose parameters are the
  diffusion's, run with module-local parameters so nothing enters Pyro's param store); under
  ``torch.distributed`` it is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`;
* **a step** (:func:`optimizer_step`, the package's only call of ``optimizer.step()``):
  ``zero_grad``, the loss (a sum over the batch), ``backward``, optional gradient clipping
  (per element, ``clip_value``; or of the total norm, ``clip_norm``), one step of a plain
  ``torch.optim`` optimizer, then its ``torch.optim.lr_scheduler`` if any;
* **after each step**: the caller's hooks, an exponential moving average of the weights
  (:func:`ema_model`, a ``torch.optim.swa_utils.AveragedModel``), the validation bound on a
  held-out split every ``eval_every`` steps and at the end (the best checkpoint is kept),
  the loss history (read back from the device every few steps, not at every step), the
  progress bar, and a checkpoint callback every ``checkpoint_every`` steps.

Which weights a finished run stands for (:meth:`Engine.selected_state_dict`): the best
validated ones when there is a validation split, else the moving average when there is one,
else the last.  :meth:`Engine.state_dict` holds everything a resumed run needs — weights,
optimizer, learning-rate schedule, the average, the best checkpoint, the data order, the
global RNG states and the loss's own state of every process — as tensors and plain values,
so that it loads with ``torch.load(..., weights_only=True)``; a run resumed from it takes
bit-for-bit the same steps as one that was never interrupted.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from pyro.infer import ELBO
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

__all__ = [
    "Engine",
    "BatchOrder",
    "SAMPLINGS",
    "elbo_module",
    "optimizer_step",
    "ema_model",
    "validation_bound",
    "selected_weights",
    "world",
    "process_seed",
    "rng_state",
    "set_rng_state",
]

#: how minibatches are drawn: without replacement, reshuffled every epoch; or i.i.d. uniform rows
SAMPLINGS = ("epochs", "replacement")

#: the seed of the validation bound's draws (the same draws at every check)
VALIDATION_SEED = 2024


def elbo_module(diffusion: nn.Module, loss: ELBO) -> nn.Module:
    """``loss(model, guide)``: Pyro's ``ELBOModule`` over the diffusion's programs in their
    ``nn.Module`` forms (``diffusion.model_module()``, ``guide_module()``: run with
    module-local parameters, nothing in Pyro's param store).  ``module(x0)`` returns the
    differentiable loss (a sum over the batch ``x0``); ``module.parameters()`` are the
    diffusion's."""
    if not isinstance(loss, ELBO):
        raise TypeError(f"loss: expected a pyro.infer.ELBO instance, got {type(loss).__name__}")
    return loss(diffusion.model_module(), diffusion.guide_module())


def optimizer_step(
    module: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    *,
    scale: float = 1.0,
    clip_value: float | None = None,
    clip_norm: float | None = None,
    inputs: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One optimizer step on ``module(batch)``; returns that loss, detached (no read-back).

    ``zero_grad``; ``backward`` of ``scale · module(batch)`` (into ``inputs`` only, when
    given); the gradients of the optimizer's parameters clipped per element to
    ``[−clip_value, clip_value]`` and/or to total norm ``clip_norm``; ``optimizer.step()``.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = module(batch)
    (loss if scale == 1 else loss * scale).backward(inputs=list(inputs) if inputs is not None else None)
    if clip_value is not None or clip_norm is not None:
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if clip_value is not None:
            nn.utils.clip_grad_value_(parameters, clip_value)
        if clip_norm is not None:
            nn.utils.clip_grad_norm_(parameters, clip_norm)
    optimizer.step()
    return loss.detach()


def ema_model(module: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``module``'s parameters as a
    ``torch.optim.swa_utils.AveragedModel``: the first ``update_parameters`` copies the
    weights, the n-th after it moves the average by ``1 − min(decay, n / (n + 9))`` towards
    them (the decay ramps up over the first steps).  Buffers are copied, not averaged."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise ValueError(f"ema: expected a decay in (0, 1), got {decay!r}")
    floor = 1.0 - float(decay)

    def average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        weight = torch.clamp(9.0 / (num_averaged.to(torch.float64) + 9.0), min=floor)
        return torch.lerp(averaged, current, weight.to(averaged.dtype))

    return AveragedModel(module, avg_fn=average, use_buffers=False)


@torch.no_grad()
def validation_bound(
    diffusion: nn.Module,
    data: torch.Tensor,
    *,
    num_steps: int | None = 0,
    num_times: int = 16,
    seed: int = VALIDATION_SEED,
) -> float:
    """The bound in bits/dim on ``data`` (the mean of ``num_times`` draws of the one-step
    estimator per datum, :func:`~pyro_diffusion.bound.bound`, on the grid ``num_steps``: None
    the model's own, K levels, 0 continuous time), with the same draws at every call (seed
    ``seed``; the global RNG is left as it was), so checkpoints are compared on equal terms."""
    from .bound import bound

    with torch.random.fork_rng(devices=[data.device] if data.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return bound(diffusion, data, num_steps=num_steps, num_times=num_times).dataset_mean()[0]


def process_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s training draws under ``torch.distributed`` (rank > 0;
    process 0 continues the stream of ``seed`` that drew the weights): a stream independent of
    every run's, from ``numpy.random.SeedSequence([seed, rank])``."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless ``torch.distributed`` is
    initialized."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------- data order
class BatchOrder:
    """Minibatch indices for one process.

    ``sampling="epochs"``: without replacement from a shuffled order, reshuffled each epoch by
    a private generator (seed ``seed``); ``"replacement"``: ``torch.randint`` rows from it.
    With ``world_size`` W processes every process draws the same combined batch of W ·
    ``batch_size`` indices and takes its own slice, so the W processes together see what one
    process with the combined batch would.  :meth:`state_dict` captures where it stands."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        *,
        sampling: str = "epochs",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling: expected one of {SAMPLINGS}, got {sampling!r}")
        if world_size > 1 and batch_size * world_size > size and sampling == "epochs":
            raise ValueError(
                f"batch_size: {batch_size} per process × {world_size} processes exceeds the {size} training data"
            )
        self.size = size
        self.sampling = sampling
        self.rank, self.world_size = rank, world_size
        self.batch_size = min(batch_size, size) if world_size == 1 and sampling == "epochs" else batch_size
        self.combined = self.batch_size * world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(size, generator=self.generator) if sampling == "epochs" else None
        self.position = 0
        self.epoch = 0

    def next(self) -> torch.Tensor:
        if self.sampling == "replacement":
            index = torch.randint(0, self.size, (self.combined,), generator=self.generator)
        else:
            if self.position + self.combined > self.size:
                self.order = torch.randperm(self.size, generator=self.generator)
                self.position = 0
                self.epoch += 1
            index = self.order[self.position : self.position + self.combined]
            self.position += self.combined
        if self.world_size == 1:
            return index
        return index[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "order": None if self.order is None else self.order.clone(),
            "position": self.position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = None if state["order"] is None else state["order"].clone()
        self.position = state["position"]
        self.epoch = state["epoch"]


# ---------------------------------------------------------------------------- RNG state
def rng_state(device: torch.device | str | None = None) -> dict:
    """The global RNG states (torch, CUDA when ``device`` is a GPU, numpy, python) as tensors
    and plain values (loadable with ``weights_only=True``)."""
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
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
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
    """The loss's own tensors (e.g. the importance sampler's running ℓ_t² history), on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in vars(loss).items() if isinstance(v, torch.Tensor)}


def selected_weights(state: dict) -> dict:
    """The weights a run stands for, from an :meth:`Engine.state_dict`: the best validated
    checkpoint, else the moving average, else the last weights."""
    if state.get("best"):
        return state["best"]["weights"]
    if state.get("ema"):
        prefix = "module."
        return {k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)}
    return state["model"]


# ---------------------------------------------------------------------------- the engine
class Engine:
    """Trains one diffusion: the package's training loop (module docstring).

    Args:
        diffusion: the :class:`~pyro_diffusion.diffusion.Diffusion` (on its device).
        loss: a Pyro ELBO over its programs (e.g. :class:`~pyro_diffusion.losses.DiffusionELBO`).
        optimizer: a ``torch.optim`` optimizer over ``diffusion``'s parameters.
        lr_scheduler: a ``torch.optim.lr_scheduler`` scheduler of ``optimizer``, stepped after
            every optimizer step, or None.
        clip_value, clip_norm: gradient clipping per element / of the total norm (None: off).
        ema: decay of the moving average of the weights (0: none; :func:`ema_model`).
        batch_size: minibatch size (per process under ``torch.distributed``).
        sampling: ``"epochs"`` or ``"replacement"`` (:class:`BatchOrder`).
        seed: seed of the data order.
        eval_every: with validation data, check every that many steps (and at the last
            step); 0: at the last step only.
        validate: ``(diffusion, data) -> float``, lower is better (default
            :func:`validation_bound` in continuous time, 16 draws per datum).
        log_every: print a line every that many steps (0: never); validation checks are
            printed too when it is set.
        progress: show a progress bar (process 0 only).
        desc: the bar's and the log lines' label.
        device_ids: ``DistributedDataParallel``'s ``device_ids`` (None: from the
            diffusion's device).

    Under ``torch.distributed`` the loss module is wrapped in ``DistributedDataParallel``
    and the loss handed to ``backward`` is ``W ·`` the local sum, so that after DDP's
    average of the gradients the step is the one a single process takes on the loss summed
    over the combined batch (:mod:`~pyro_diffusion.distributed`).  Every process keeps the
    same average and validates the same replica, so all of them hold the same best
    checkpoint without communicating.
    """

    def __init__(
        self,
        diffusion: nn.Module,
        loss: ELBO,
        optimizer: torch.optim.Optimizer,
        *,
        lr_scheduler=None,
        clip_value: float | None = None,
        clip_norm: float | None = None,
        ema: float = 0.0,
        batch_size: int = 128,
        sampling: str = "epochs",
        seed: int = 0,
        eval_every: int = 0,
        validate: Callable[[nn.Module, torch.Tensor], float] | None = None,
        log_every: int = 0,
        progress: bool = False,
        desc: str = "train",
        device_ids: list[int] | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for name, value in (("clip_value", clip_value), ("clip_norm", clip_norm)):
            if value is not None and not value > 0:
                raise ValueError(f"{name}: expected None or a positive number, got {value!r}")
        for name, value, least in (
            ("batch_size", batch_size, 1),
            ("eval_every", eval_every, 0),
            ("log_every", log_every, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling: expected one of {SAMPLINGS}, got {sampling!r}")
        self.diffusion = diffusion
        self.loss = loss
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.clip_value, self.clip_norm = clip_value, clip_norm
        self.batch_size, self.sampling, self.seed = batch_size, sampling, seed
        self.eval_every, self.log_every = eval_every, log_every
        self.validate = validate or (lambda model, data: validation_bound(model, data))
        self.progress, self.desc = progress, desc
        self.rank, self.world_size = world()
        module = elbo_module(diffusion, loss)
        if torch_dist.is_available() and torch_dist.is_initialized():
            from .distributed import data_parallel_module

            device = next(diffusion.parameters()).device
            if device_ids is None and device.type == "cuda":
                device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
            module = data_parallel_module(diffusion, loss, device_ids=device_ids)
        self.module = module
        self.average = ema_model(diffusion, ema) if ema else None
        self.step_count = 0
        self.seconds = 0.0
        self.history: list[float] = []
        self.val_history: list[list[float]] = []
        self.best: dict | None = None
        self.order: BatchOrder | None = None
        self._order_state: dict | None = None
        self.val_data: torch.Tensor | None = None

    # ------------------------------------------------------------------ one step
    def step(self, batch: torch.Tensor) -> torch.Tensor:
        """One optimizer step on ``batch`` (then the learning-rate schedule's); returns the
        loss summed over the batch, detached (no read-back from the device)."""
        value = optimizer_step(
            self.module,
            self.optimizer,
            batch,
            scale=self.world_size,
            clip_value=self.clip_value,
            clip_norm=self.clip_norm,
        )
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return value

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        train: torch.Tensor,
        steps: int,
        *,
        val_data: torch.Tensor | None = None,
        hooks: Sequence[Callable[[Engine], None]] = (),
        stop_after: int | None = None,
        checkpoint_every: int | None = None,
        on_checkpoint: Callable[[Engine], None] | None = None,
    ) -> Engine:
        """Train until ``steps`` steps are done in total (or ``stop_after``, as if
        interrupted), on minibatches of ``train``.

        After each step: ``hook(engine)`` for each of ``hooks``; the moving average; with
        ``val_data``, the validation check when due; the checkpoint callback
        ``on_checkpoint(engine)`` every ``checkpoint_every`` steps and at the stop.  A
        non-finite loss raises ``FloatingPointError`` naming its step."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {steps!r}")
        if self.eval_every and val_data is None:
            raise ValueError("eval_every: checkpoint selection needs a validation split (val_size > 0)")
        if self.order is None:
            self.order = BatchOrder(
                train.shape[0],
                self.batch_size,
                self.seed,
                sampling=self.sampling,
                rank=self.rank,
                world_size=self.world_size,
            )
            if self._order_state is not None:
                self.order.load_state_dict(self._order_state)
        self.val_data = val_data
        target = steps if stop_after is None else min(steps, stop_after)
        bar = tqdm(
            total=steps,
            initial=self.step_count,
            desc=self.desc,
            disable=not (self.progress and self.rank == 0),
        )
        pending: list[torch.Tensor] = []
        started = time.perf_counter()
        self.diffusion.train()
        try:
            while self.step_count < target:
                batch = train[self.order.next().to(train.device)]
                pending.append(self.step(batch) / batch.shape[0])
                self.step_count += 1
                n = self.step_count
                for hook in hooks:
                    hook(self)
                if self.average is not None:
                    self.average.update_parameters(self.diffusion)
                validating = val_data is not None and (
                    n == steps or (self.eval_every and n % self.eval_every == 0)
                )
                saving = on_checkpoint is not None and (
                    n == target or (checkpoint_every and n % checkpoint_every == 0)
                )
                logging = bool(self.log_every) and (n - 1) % self.log_every == 0
                if n % 10 == 0 or n == target or validating or saving or logging:
                    self._read_back(pending)
                    pending = []
                    recent = self.history[-50:]
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.4g}")
                if logging:
                    self._log(
                        f"{self.desc} step {n}: loss {self.history[-1]:.4f} per datum "
                        f"({self.history[-1] / self._nats_per_bit():.4f} bits/dim), "
                        f"{self.seconds + time.perf_counter() - started:.0f} s"
                    )
                if validating:
                    self._check(val_data)
                bar.update(1)
                if saving:
                    self.seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    on_checkpoint(self)
        finally:
            bar.close()
        self.seconds += time.perf_counter() - started
        return self

    def _nats_per_bit(self) -> float:
        return math.prod(self.diffusion.event_shape) * math.log(2)

    def _log(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def _read_back(self, pending: list[torch.Tensor]) -> None:
        """Move the pending per-datum losses to the history (the mean over processes)."""
        if not pending:
            return
        values = torch.stack([v.to(torch.float64) for v in pending])
        if self.world_size > 1:
            torch_dist.all_reduce(values)
            values = values / self.world_size
        values = values.tolist()
        first = self.step_count - len(values)
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise FloatingPointError(f"training: loss became {value} at step {first + offset + 1}")
        self.history.extend(values)

    def validated_model(self) -> nn.Module:
        """The model that validation measures and selection keeps: the average, if any."""
        return self.average.module if self.average is not None else self.diffusion

    def _check(self, data: torch.Tensor) -> float:
        model = self.validated_model()
        was_training = model.training
        model.eval()
        try:
            value = float(self.validate(model, data))
        finally:
            model.train(was_training)
        low, high = (float(g.detach()) for g in model.schedule.endpoints())
        self.val_history.append([self.step_count, value, low, high])
        if self.best is None or value < self.best["value"]:
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.best = {"step": self.step_count, "value": value, "weights": weights}
        if self.log_every:
            self._log(
                f"{self.desc} step {self.step_count}: validation {value:.4f}, γ ∈ [{low:.2f}, {high:.2f}]"
            )
        return value

    # ------------------------------------------------------------------ selection
    @property
    def selection(self) -> str:
        """Which weights :meth:`selected_state_dict` gives: ``"best"``, ``"ema"`` or ``"last"``."""
        return "best" if self.best is not None else "ema" if self.average is not None else "last"

    def selected_state_dict(self) -> dict:
        """The weights the run stands for: the best validated ones, else the moving
        average, else the last (module docstring)."""
        if self.best is not None:
            return self.best["weights"]
        if self.average is not None:
            return self.average.module.state_dict()
        return self.diffusion.state_dict()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything a resumed run needs, as tensors and plain values.  Under
        ``torch.distributed`` a collective: every process must call it; the RNG states and
        the loss's state of all processes are gathered into ``ranks``."""
        local = {"rng": rng_state(next(self.diffusion.parameters()).device), "loss": _loss_state(self.loss)}
        if self.world_size > 1:
            ranks: list = [None] * self.world_size
            torch_dist.all_gather_object(ranks, local)
        else:
            ranks = [local]
        return {
            "model": self.diffusion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": None if self.lr_scheduler is None else self.lr_scheduler.state_dict(),
            "ema": None if self.average is None else self.average.state_dict(),
            "best": self.best,
            "val_history": self.val_history,
            "history": self.history,
            "step": self.step_count,
            "seconds": self.seconds,
            "order": None if self.order is None else self.order.state_dict(),
            "world_size": self.world_size,
            "ranks": ranks,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (with the same number of processes)."""
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"world_size: the checkpoint was written by {state['world_size']} processes; resume it "
                f"with {state['world_size']}, not {self.world_size}"
            )
        device = next(self.diffusion.parameters()).device
        self.diffusion.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.average is not None:
            self.average.load_state_dict(state["ema"])
        self.best = state["best"]
        if self.best is not None:
            self.best = {**self.best, "weights": {k: v.to(device) for k, v in self.best["weights"].items()}}
        self.val_history = [list(row) for row in state["val_history"]]
        self.history = list(state["history"])
        self.step_count = state["step"]
        self.seconds = state["seconds"]
        self._order_state = state["order"]
        if self.order is not None and state["order"] is not None:
            self.order.load_state_dict(state["order"])
        own = state["ranks"][self.rank]
        for key, value in own["loss"].items():
            setattr(self.loss, key, value.to(device))
        set_rng_state(own["rng"])
