r"""The schedule study on a K-level data set: fixed against learned γ, discrete against
continuous time, the same network and budget.

:func:`train_and_evaluate` trains one configuration and measures on the test split: the
continuous-time bound (bits/dim ± Monte Carlo standard error), the discrete-T bounds, the
estimator's variance, the decoder and prior terms, the per-step profile at T = 20 and the
schedule's γ(t).  :func:`results_table` and :func:`plot_results` summarize a set of result
dicts (over configurations and seeds).  ``examples/learned_schedule_digits.py`` and
``pyro-diffusion compare --vdm …`` drive it.

**The model** of every configuration is one :class:`~pyro_diffusion.diffusion.Diffusion`:
``Diffusion(MLPDenoiser(event_shape, hidden, depth), schedule, event_shape, num_levels=K,
decoder=decoder, anchor=...)`` (ε-prediction, the posterior variance; ``decoder`` ``"plain"``,
VDM's z/α, or ``"network"``, the network's x̂ with a learned scale).  **Training**: the
continuous-time bound ``DiffusionELBO(num_steps=0, times="low-discrepancy")`` (with VDM's
variance gradient for a learned shape), in the package's training engine
(:class:`~pyro_diffusion.engine.Engine`: Pyro's ``ELBOModule`` and ``torch.optim.Adam`` with
per-parameter learning rates and weight decay, :func:`optim_args`; gradients clipped per
element at 10; the moving average of the weights and the validation selection of the
checkpoint).  Every configuration but ``learned-heldout`` is a
:class:`~pyro_diffusion.training.TrainConfig` (:func:`study_config`), so ``pyro-diffusion
train`` with its flags trains exactly the model this module trains.

**Counting steps.**  The study counts a discrete bound as VDM does, by its T *intervals*
between T + 1 noise levels at times 0, 1/T, …, 1; the library counts noise levels.  So the
study's T (``train_num_steps``, ``eval_steps``, the ``test_bpd_T{T}`` keys, the example's
``--train-steps`` and ``--at``) is the library's ``num_steps = T + 1``
(:func:`library_num_steps`): the T-step training loss is ``DiffusionELBO(num_steps=T + 1,
times="low-discrepancy")`` and the T-step bound ``bound(diffusion, x, num_steps=T + 1)``.
For the tabulated schedules (``ddpm-linear``, ``cosine``, 1,000 native levels) a grid of at
most 1,000 levels is a respaced sub-grid of the native levels (each level rounded to the
nearest native step); a larger one is interpolated in time.

Configurations (:data:`CONFIGS`):

* ``learned``: :class:`~pyro_diffusion.schedules.LearnedGamma` with the continuous-time ELBO,
  low-discrepancy times and the variance gradient for the shape;
* ``learned-anchored``: ``learned`` with the network conditioned on γ − γ_min + (the initial
  γ_min) (``Diffusion(anchor=…)``), so that the network's input at the data end does not move
  with the learned γ_min (without it an EMA of the weights breaks once γ_min moves);
* ``learned-shape``: ``learned`` with the endpoints frozen at ``tuned`` (learning rate 0);
  only the shape is trained (variance gradient), so it differs from ``linear:GMIN:GMAX`` at
  the same endpoints only in the shape, i.e. in the estimator's variance during training;
* ``learned-heldout``: ``learned-anchored`` whose endpoints are trained on the bound of the
  *validation* images (one Adam step on a held-out batch after each training step; needs
  ``val_size``), the shape and the network on the training images: a fully learned schedule
  whose two endpoint numbers are fitted where the bound generalizes;
* ``learned-T16``: the same schedule trained on the T = 16 bound;
* ``ddpm-linear``, ``cosine``: the DDPM tables of 1,000 levels
  (:class:`~pyro_diffusion.schedules.NoiseSchedule`, a function of time, piecewise linear
  between its levels; the cosine one with Improved DDPM's clipping β ≤ 0.999),
  continuous-time ELBO;
* ``vdm-linear``: γ linear on [−13.3, 5] (VDM's fixed schedule);
* ``tuned``: γ linear on a hand-chosen range (``tuned``, default [−4, 2], the best of a small
  sweep on the digits at 2,500 steps; ``learned`` and ``learned-T16`` start from it too);
* ``simple``: L_simple (``SimplifiedLoss(num_steps=0, times="low-discrepancy")``) on the
  ``tuned`` schedule, the bound evaluated after;
* ``linear:GMIN:GMAX``: γ linear on [GMIN, GMAX] (for hand-tuning sweeps), continuous-time ELBO.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyro
import torch

from .. import engine as engine_module
from .. import runs as run_files
from ..bound import bound, continuous_terms, decoder_term, prior_term, vlb_terms
from ..data import load_dataset
from ..diffusion import Diffusion
from ..engine import Engine, elbo_module, ema_model, validation_bound
from ..training import (
    DataShape,
    TrainConfig,
    build_diffusion,
    build_engine,
    build_schedule,
    continuous_bound,
    load_run_data,
    param_groups,
    parameter_settings,
    split_validation,
)
from ..training import make_loss as training_loss

__all__ = [
    "CONFIGS",
    "QUICK",
    "RECIPES",
    "DECODERS",
    "BoundTerms",
    "study_config",
    "check_config",
    "library_num_steps",
    "make_schedule",
    "make_loss",
    "make_diffusion",
    "bound_terms",
    "build",
    "train_and_evaluate",
    "train_and_evaluate_model",
    "results_table",
    "plot_results",
    "summarize",
    "run_vdm_comparison",
    "split_validation",
    "paired_comparison",
    "optim_args",
    "param_groups",
    "paired_difference",
    "paired_over_seeds",
]

#: what ``quick`` changes (a smoke-sized run: seconds per configuration on a CPU)
QUICK = {"steps": 150, "eval_times": 8, "eval_steps": (16,)}

#: named settings of :func:`train_and_evaluate` for :func:`run_vdm_comparison`: ``short`` is
#: the function's defaults (2,500 steps, the plain decoder, no held-out images: the first
#: comparison of docs/learned_schedules.md §5); ``regularized`` is the recipe of that page's
#: best results (the network decoder, 200 images held out to select the checkpoint every 250
#: of at most 8,000 steps, EMA 0.999, weight decay 1, 1,000 test draws per image, and the
#: validation-chosen endpoints [−2, 4] for ``tuned``, ``simple`` and the ``learned*`` starts)
RECIPES = {
    "short": {},
    "regularized": {
        "decoder": "network",
        "steps": 8000,
        "val_size": 200,
        "eval_every": 250,
        "ema": 0.999,
        "weight_decay": 1.0,
        "eval_times": 1000,
        "tuned": (-2.0, 4.0),
    },
}

CONFIGS = (
    "learned",
    "learned-anchored",
    "learned-shape",
    "learned-heldout",
    "learned-T16",
    "ddpm-linear",
    "cosine",
    "vdm-linear",
    "tuned",
    "simple",
)

#: the decoders of the study: VDM's plain z/α, or the network's x̂ with a learned scale
DECODERS = ("plain", "network")


def _linear_endpoints(config: str) -> tuple[float, float]:
    _, low, high = config.split(":")
    return float(low), float(high)


def _is_linear(config: str) -> bool:
    if not config.startswith("linear:") or config.count(":") != 2:
        return False
    try:
        low, high = _linear_endpoints(config)
    except ValueError:
        return False
    return low < high


def check_config(config: str) -> None:
    """Raise a ValueError naming ``config`` unless it is one of :data:`CONFIGS` or
    ``linear:GMIN:GMAX`` with GMIN < GMAX."""
    if config not in CONFIGS and not _is_linear(config):
        raise ValueError(f"config: expected one of {CONFIGS} or 'linear:GMIN:GMAX', got {config!r}")


def _check_intervals(num_steps, argument: str) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"{argument}: expected a positive integer T or None, got {num_steps!r}")
    return num_steps


def library_num_steps(num_steps: int | None) -> int:
    """The library's ``num_steps`` (noise levels) for the study's T (VDM's intervals): T + 1,
    and 0 (continuous time) for None."""
    if num_steps is None:
        return 0
    return _check_intervals(num_steps, "num_steps") + 1


def _schedule_fields(config: str, tuned: tuple[float, float]) -> dict:
    """The :class:`~pyro_diffusion.training.TrainConfig` fields of configuration ``config``'s
    schedule."""
    check_config(config)
    low, high = (float(v) for v in tuned)
    if config.startswith("learned"):
        return {
            "schedule": "learned",
            "gamma_min": low,
            "gamma_max": high,
            "schedule_hidden": 256,
            "freeze_endpoints": config in _FROZEN_ENDPOINTS,
        }
    if config == "ddpm-linear":
        return {"schedule": "linear"}
    if config == "cosine":
        return {"schedule": "cosine", "max_beta": 0.999}  # Improved DDPM's clipping
    if config == "vdm-linear":
        return {"schedule": "gamma-linear", "gamma_min": -13.3, "gamma_max": 5.0}
    if config in ("tuned", "simple"):
        return {"schedule": "gamma-linear", "gamma_min": low, "gamma_max": high}
    low, high = _linear_endpoints(config)
    return {"schedule": "gamma-linear", "gamma_min": low, "gamma_max": high}


#: configurations whose network sees γ − γ_min + (the initial γ_min), and whose endpoints
#: the main optimizer leaves alone (``learned-heldout`` trains them separately)
_ANCHORED = ("learned-anchored", "learned-heldout")
_FROZEN_ENDPOINTS = ("learned-shape", "learned-heldout")


def _check_decoder(decoder: str) -> str:
    if decoder not in DECODERS:
        raise ValueError(f"decoder: expected one of {DECODERS}, got {decoder!r}")
    return decoder


def study_config(
    config: str,
    *,
    data: str = "digits",
    seed: int = 0,
    steps: int = 2500,
    batch: int = 128,
    hidden: int = 128,
    depth: int = 2,
    lr: float = 2e-3,
    schedule_lr: float | None = None,
    tuned: tuple[float, float] = (-4.0, 2.0),
    decoder: str = "plain",
    val_size: int = 0,
    eval_every: int = 0,
    val_times: int = 16,
    ema: float = 0.0,
    weight_decay: float = 0.0,
    train_num_steps: int | None = None,
    progress: bool = False,
    log_every: int = 0,
) -> TrainConfig:
    """Configuration ``config`` of the study as a :class:`~pyro_diffusion.training.TrainConfig`,
    so that ``pyro-diffusion train`` with its :meth:`~pyro_diffusion.training.TrainConfig.flags`
    trains exactly the model :func:`train_and_evaluate` trains (all but ``learned-heldout``,
    whose endpoint steps on the held-out images are a hook of the study).

    Every configuration: an MLP of ``hidden`` × ``depth`` on the flattened data whose level
    embedding spans γ ∈ [−15, 15] (wider than any of the study's schedules), ε-prediction,
    the posterior variance, ``decoder`` (``"plain"`` or ``"network"``), the schedule of
    :func:`make_schedule`; the loss of :func:`make_loss` (the continuous-time bound with
    low-discrepancy times unless ``train_num_steps``); Adam at ``lr`` (``schedule_lr`` for the
    schedule), gradients clipped per element at 10, ``weight_decay`` on the network, minibatch
    rows drawn with replacement."""
    check_config(config)
    _check_decoder(decoder)
    if train_num_steps is not None:
        _check_intervals(train_num_steps, "train_num_steps")
        if config in ("simple", "learned-T16"):
            raise ValueError(
                f"train_num_steps: {config!r} has its own training loss; give None, got {train_num_steps!r}"
            )
    intervals = 16 if config == "learned-T16" else train_num_steps
    return TrainConfig(
        data=data,
        objective="simple" if config == "simple" else "elbo",
        loss_steps=library_num_steps(intervals),
        times="low-discrepancy",
        num_steps=1000,
        **_schedule_fields(config, tuned),
        network="mlp",
        hidden=hidden,
        depth=depth,
        mean="eps",
        variance="small",
        decoder=decoder,
        anchor=float(tuned[0]) if config in _ANCHORED else None,
        embed_gamma_min=-15.0,
        embed_gamma_max=15.0,
        steps=steps,
        batch_size=batch,
        lr=lr,
        schedule_lr=schedule_lr,
        weight_decay=float(weight_decay),
        clip_value=10.0,
        ema=float(ema),
        sampling="replacement",
        seed=seed,
        val_size=val_size,
        eval_every=eval_every,
        val_times=val_times,
        progress=progress,
        log_every=log_every,
    )


def make_schedule(config: str, tuned: tuple[float, float] = (-4.0, 2.0)):
    """The γ-schedule of configuration ``config`` (a fresh module): ``learned*``
    :class:`~pyro_diffusion.schedules.LearnedGamma` on ``tuned`` (256 units), ``ddpm-linear``
    and ``cosine`` the DDPM tables of 1,000 levels (cosine clipped at β ≤ 0.999),
    ``vdm-linear`` γ linear on [−13.3, 5], ``tuned``/``simple`` linear on ``tuned``,
    ``linear:GMIN:GMAX`` linear on [GMIN, GMAX]."""
    return build_schedule(study_config(config, tuned=tuned))


def make_loss(config: str, train_num_steps: int | None = None):
    """The training loss of configuration ``config``: the continuous-time bound
    ``DiffusionELBO(num_steps=0, times="low-discrepancy")``, or with ``train_num_steps = T``
    the T-step bound ``DiffusionELBO(num_steps=T + 1, times="low-discrepancy")`` (whose
    gradient trains a learned shape on the bound itself, since for finite T the bound depends
    on it); ``simple``: ``SimplifiedLoss(num_steps=0, times="low-discrepancy")``;
    ``learned-T16``: the T = 16 bound."""
    return training_loss(study_config(config, train_num_steps=train_num_steps))


class _WeightAverage:
    """The engine's moving average of the weights (:func:`~pyro_diffusion.engine.ema_model`)
    outside the engine, for diagnostics that step a model themselves: the average starts at
    the module's weights, :meth:`update` takes one step, :meth:`copy_to` puts it in place,
    :attr:`shadow` maps names to the averaged parameters."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.module = module
        self.average = ema_model(module, decay)
        self.average.update_parameters(module)

    def update(self) -> None:
        self.average.update_parameters(self.module)

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.average.module.named_parameters()}

    def copy_to(self, module: torch.nn.Module) -> None:
        _restore(module, self.shadow)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@torch.no_grad()
def _restore(module: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    for name, param in module.named_parameters():
        param.copy_(values[name])


def _validation_bpd(
    diffusion: Diffusion, val: torch.Tensor, num_times: int, num_steps: int | None = None
) -> float:
    """The validation bound of the study: the continuous-time bound (or the
    ``num_steps``-interval one) on ``val`` with the same (t, ε) draws at every call
    (:func:`~pyro_diffusion.engine.validation_bound`)."""
    return validation_bound(diffusion, val, num_steps=library_num_steps(num_steps), num_times=num_times)


class BoundTerms(NamedTuple):
    """One draw of the terms of the continuous-time −ELBO per datum in nats, each ``(B,)``:
    the diffusion term ½ γ'(t) ‖ε − ε̂‖², the decoder term at γ(0) and the prior term at γ(1);
    ``shape_outputs``: a learned schedule's shape tensors the diffusion term went through."""

    diffusion: torch.Tensor
    decoder: torch.Tensor
    prior: torch.Tensor
    shape_outputs: tuple = ()

    @property
    def total(self) -> torch.Tensor:
        return self.diffusion + self.decoder + self.prior


def bound_terms(diffusion: Diffusion, x0: torch.Tensor, times: torch.Tensor) -> BoundTerms:
    """One draw of the continuous-time bound's terms per datum at ``times`` ``(B,)`` (float64
    in [0, 1]), from :func:`~pyro_diffusion.bound.continuous_terms`,
    :func:`~pyro_diffusion.bound.decoder_term` and :func:`~pyro_diffusion.bound.prior_term` at
    the schedule's endpoints."""
    diffusion.check_data(x0)
    if not isinstance(times, torch.Tensor) or times.shape != (x0.shape[0],):
        raise ValueError(f"times: expected a float tensor of shape ({x0.shape[0]},), got {times!r:.80}")
    gamma_0, gamma_1 = diffusion.schedule.endpoints()
    terms, shape_outputs = continuous_terms(diffusion, x0, times.to(torch.float64))
    return BoundTerms(
        terms, decoder_term(diffusion, x0, gamma_0), prior_term(diffusion, x0, gamma_1), shape_outputs
    )


optim_args = parameter_settings
param_groups = param_groups


def make_diffusion(
    config: str,
    event_shape: tuple[int, ...],
    num_levels: int,
    *,
    hidden: int = 128,
    depth: int = 2,
    decoder: str = "plain",
    tuned: tuple[float, float] = (-4.0, 2.0),
) -> Diffusion:
    """The untrained model of configuration ``config``: ``Diffusion(MLPDenoiser(event_shape,
    hidden, depth), make_schedule(config, tuned), event_shape, num_levels=num_levels,
    decoder=decoder, anchor=tuned[0] for the anchored configurations)``, built by
    :func:`~pyro_diffusion.training.build_diffusion` from :func:`study_config`."""
    settings = study_config(config, hidden=hidden, depth=depth, decoder=decoder, tuned=tuned)
    return build_diffusion(settings, DataShape(tuple(event_shape), num_levels))


def build(
    config: str,
    event_shape: tuple[int, ...],
    num_levels: int,
    **settings,
) -> tuple[Diffusion, object, Engine]:
    """The untrained model of configuration ``config`` and its training: ``(diffusion, loss,
    engine)``, as :func:`train_and_evaluate` uses them: :func:`~pyro_diffusion.training.build_diffusion`
    and :func:`~pyro_diffusion.training.build_engine` of ``study_config(config, **settings)``
    (``settings``: the keyword arguments of :func:`study_config`).  ``engine.step(x0)`` takes
    one optimizer step and returns the loss summed over the batch (a tensor)."""
    training_config = study_config(config, **settings)
    diffusion = build_diffusion(training_config, DataShape(tuple(event_shape), num_levels))
    engine = build_engine(training_config, diffusion, desc=config)
    return diffusion, engine.loss, engine


def _heldout_endpoint_step(
    diffusion: Diffusion, loss_fn, val: torch.Tensor, batch: int, lr: float, seed: int
):
    """For ``learned-heldout``: a function that takes one Adam step of the schedule's
    endpoints γ_min, γ_max on the bound of a batch of *held-out* images (``val``), touching no
    other parameter (the engine's :func:`~pyro_diffusion.engine.optimizer_step` with
    ``inputs`` the endpoints).  The endpoints are two numbers that the training bound pulls
    towards values that suit the training images; trained on held-out images they go where
    the bound generalizes, as a hyperparameter fitted by gradient would.  The shape and the
    network train on the training images as in ``learned-anchored``."""
    endpoints = [diffusion.schedule.gamma_min, diffusion.schedule.gamma_max]
    optimizer = torch.optim.Adam(endpoints, lr=lr)
    module = elbo_module(diffusion, loss_fn)
    rows_generator = torch.Generator().manual_seed(10_000 + seed)  # the training batches are unchanged

    def step() -> None:
        rows = torch.randint(0, val.shape[0], (batch,), generator=rows_generator)
        engine_module.optimizer_step(module, optimizer, val[rows], scale=1.0 / batch, inputs=endpoints)
        optimizer.zero_grad(set_to_none=True)  # left clean for the main optimizer's next step

    return step


def train_and_evaluate_model(
    config: str,
    *,
    data: str = "digits",
    seed: int = 0,
    steps: int = 2500,
    batch: int = 128,
    hidden: int = 128,
    depth: int = 2,
    lr: float = 2e-3,
    schedule_lr: float | None = None,
    tuned: tuple[float, float] = (-4.0, 2.0),
    decoder: str = "plain",
    eval_times: int = 100,
    eval_steps: Sequence[int] = (16, 64, 1000),
    log_every: int = 0,
    progress: bool = False,
    val_size: int = 0,
    eval_every: int = 0,
    val_times: int = 16,
    ema: float = 0.0,
    weight_decay: float = 0.0,
    train_num_steps: int | None = None,
) -> tuple[Diffusion, dict]:
    """Train configuration ``config`` on a K-level data set and evaluate it on the test split;
    returns ``(diffusion, results)``, the diffusion holding the selected weights (eval mode).

    The model and its training are :func:`study_config`'s (an
    :class:`~pyro_diffusion.nets.MLPDenoiser` over the flattened data, ``decoder``
    ``"plain"`` or ``"network"``; Adam with learning rate ``lr``, ``schedule_lr`` for the
    schedule's parameters, gradients clipped per element at 10), trained by the package's
    engine (:class:`~pyro_diffusion.engine.Engine`, through :func:`build`), exactly as
    ``pyro-diffusion train`` with ``study_config(...).flags()`` trains it.  Evaluation draws
    are seeded identically for every configuration.  Returns a JSON-able dict (bits/dim),
    with the per-image test bound (``test_per_image_bpd`` and its Monte Carlo ``…_se``).

    Regularization and checkpoint selection (all off by default):

    * ``val_size``: hold out that many training images
      (:func:`~pyro_diffusion.training.split_validation`, the same split for every
      configuration and seed); training uses the rest.
    * ``eval_every`` (with ``val_size``): every that many steps, and at the end, measure the
      continuous-time bound on the held-out images (``val_times`` draws per image, the same
      draws at every check; ``val_history`` rows are step, bound, γ_min, γ_max) and keep the
      best checkpoint; it is the one evaluated on test.  The test split is never used for
      selection.
    * ``ema``: keep an exponential moving average of the weights with this decay; the
      average is what is validated and evaluated.
    * ``weight_decay``: L2 penalty on the network's weights (Adam's ``weight_decay``).

    ``train_num_steps = T`` trains on the T-interval bound instead of the continuous-time one
    (:func:`make_loss`); the validation bound that selects checkpoints is then the T-interval
    bound too.  Per-image test bounds are kept for T = ∞ (``test_per_image_bpd``) and for each
    T of ``eval_steps`` (``test_per_image_bpd_T{T}``), for paired comparisons.  T counts VDM's
    intervals: the library's ``num_steps = T + 1`` (module docstring)."""
    settings = dict(
        data=data,
        seed=seed,
        steps=steps,
        batch=batch,
        hidden=hidden,
        depth=depth,
        lr=lr,
        schedule_lr=schedule_lr,
        tuned=tuned,
        decoder=decoder,
        val_size=val_size,
        eval_every=eval_every,
        val_times=val_times,
        ema=ema,
        weight_decay=weight_decay,
        train_num_steps=train_num_steps,
        progress=progress,
        log_every=log_every,
    )
    training_config = study_config(config, **settings)  # checks every setting
    for T in eval_steps:
        _check_intervals(T, "eval_steps")
    dataset = load_run_data(training_config)
    if dataset.num_levels is None:
        raise ValueError(f"data: expected a K-level data set (e.g. 'digits'), {data!r} has no num_levels")
    if config == "learned-heldout" and not val_size:
        raise ValueError("learned-heldout: trains the endpoints on the validation split; give val_size > 0")
    train, test = dataset.train, dataset.test
    val = None
    if val_size:
        train, val = split_validation(train, val_size)
    event_shape = tuple(train.shape[1:])
    dim = math.prod(event_shape)
    pyro.set_rng_seed(seed)  # as training.fit does: the weights, then the training draws
    diffusion, loss_fn, engine = build(config, event_shape, dataset.num_levels, **settings)
    hooks = []
    if config == "learned-heldout":
        endpoint_lr = lr if schedule_lr is None else schedule_lr
        heldout_step = _heldout_endpoint_step(diffusion, loss_fn, val, batch, endpoint_lr, seed)
        hooks.append(lambda engine: heldout_step())
    nats_to_bits = 1 / (dim * math.log(2))
    start = time.time()
    engine.run(train, steps, val_data=val, hooks=hooks)
    diffusion.load_state_dict(engine.selected_state_dict())
    history = [
        (i, value * nats_to_bits) for i, value in enumerate(engine.history) if i % 100 == 0 or i == steps - 1
    ]
    result = {
        "config": config,
        "data": data,
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "hidden": hidden,
        "depth": depth,
        "lr": lr,
        "decoder": decoder,
        "train_seconds": time.time() - start,
        "train_history": history,
    }
    if train_num_steps is not None:
        result["train_num_steps"] = train_num_steps
    if val_size or ema or weight_decay:
        result.update(val_size=val_size, eval_every=eval_every, ema=ema, weight_decay=weight_decay)
    if eval_every:
        result.update(
            val_history=engine.val_history, best_step=engine.best["step"], val_bpd=engine.best["value"]
        )
    elif val is not None:
        result["val_bpd"] = engine.val_history[-1][1]
    diffusion.eval()
    gamma0, gamma1 = diffusion.schedule.endpoints()
    result["gamma_min"], result["gamma_max"] = gamma0.item(), gamma1.item()
    with torch.no_grad():
        times = torch.linspace(0, 1, 101, dtype=torch.float64)
        result["gamma_curve"] = diffusion.schedule.gamma(times).tolist()
    # the same evaluation draws for every configuration, and the ones `pyro-diffusion evaluate` uses
    estimate = continuous_bound(diffusion, test, num_times=eval_times)
    result["test_bpd_continuous"], result["test_bpd_continuous_se"] = estimate.dataset_mean()
    result["estimator_variance_bpd2"] = estimate.variance.mean().item()
    result["eval_times"] = eval_times
    result["test_per_image_bpd"] = estimate.mean.tolist()
    result["test_per_image_se"] = estimate.standard_error.tolist()
    with torch.no_grad():
        terms = bound_terms(diffusion, test, torch.rand(test.shape[0], dtype=torch.float64))
    result["decoder_bpd"] = terms.decoder.mean().item() * nats_to_bits
    result["prior_bpd"] = terms.prior.mean().item() * nats_to_bits
    for T in eval_steps:
        estimate = bound(diffusion, test, num_steps=library_num_steps(T), num_times=eval_times)
        result[f"test_bpd_T{T}"], result[f"test_bpd_T{T}_se"] = estimate.dataset_mean()
        result[f"estimator_variance_T{T}_bpd2"] = estimate.variance.mean().item()
        result[f"test_per_image_bpd_T{T}"] = estimate.mean.tolist()
        result[f"test_per_image_se_T{T}"] = estimate.standard_error.tolist()
    # the 20 interval terms of the T = 20 bound (columns 1..20 of its 22 terms)
    profile = vlb_terms(diffusion, test, num_steps=library_num_steps(20))[:, 1:-1]
    result["profile_T20_bpd"] = (profile.mean(0) * nats_to_bits).tolist()
    return diffusion, result


def train_and_evaluate(config: str, **settings) -> dict:
    """The results of :func:`train_and_evaluate_model` (same arguments), without the model."""
    return train_and_evaluate_model(config, **settings)[1]


def _mean_sd(values):
    values = np.asarray(values, dtype=float)
    return values.mean(), (values.std(ddof=1) if len(values) > 1 else float("nan"))


def results_table(results: Sequence[dict], baselines: dict | None = None) -> str:
    """A markdown table: per configuration, mean ± sd over seeds of the test bits/dim (T = ∞
    and each discrete T), the estimator's variance and the learned/fixed endpoints."""
    by_config: dict[str, list[dict]] = {}
    for result in results:
        by_config.setdefault(result["config"], []).append(result)
    steps = sorted(
        {
            int(k[len("test_bpd_T") :])
            for r in results
            for k in r
            if k.startswith("test_bpd_T") and not k.endswith("_se")
        }
    )
    header = ["configuration", "seeds", "T = ∞ (bits/dim)"] + [f"T = {T}" for T in steps]
    header += ["estimator variance (T = ∞)", "decoder", "prior", "γ_min", "γ_max"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = sorted(by_config, key=lambda c: _mean_sd([r["test_bpd_continuous"] for r in by_config[c]])[0])
    for config in order:
        runs = by_config[config]

        def cell(key, digits=3, runs=runs):
            mean, sd = _mean_sd([r[key] for r in runs])
            return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")

        row = [config, str(len(runs)), cell("test_bpd_continuous")]
        row += [cell(f"test_bpd_T{T}") for T in steps]
        row += [cell("estimator_variance_bpd2", 2), cell("decoder_bpd"), cell("prior_bpd", 4)]
        row += [cell("gamma_min", 2), cell("gamma_max", 2)]
        lines.append("| " + " | ".join(row) + " |")
    if baselines:
        for name, value in baselines.items():
            cells = [name, "–", f"{value['bits_per_dim']:.3f} (exact)"] + ["–"] * (len(header) - 3)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(results: Sequence[dict], out: str | Path) -> list[Path]:
    """Figures in ``out``: γ(t) per configuration, the per-step profile at T = 20, and the
    test bits/dim per configuration (mean and seeds).  Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = {}
    for result in results:
        first.setdefault(result["config"], result)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    grid = np.linspace(0, 1, 101)
    for config, result in first.items():
        axes[0].plot(grid, result["gamma_curve"], label=config)
        profile = np.asarray(result["profile_T20_bpd"])
        axes[1].semilogy(np.arange(1, len(profile) + 1), np.maximum(profile, 1e-6), marker=".", label=config)
    axes[0].set(xlabel="t", ylabel="γ(t) = −log SNR(t)", title="schedules (seed of the first run)")
    axes[0].set_ylim(-16, 21)
    axes[1].set(xlabel="step i of T = 20", ylabel="KL term (bits/dim)", title="per-step profile, test set")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "learned_schedule_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    configs = sorted(first, key=lambda c: first[c]["test_bpd_continuous"])
    for i, config in enumerate(configs):
        values = [r["test_bpd_continuous"] for r in results if r["config"] == config]
        ax.scatter([i] * len(values), values, color="k", s=10)
        ax.bar(i, np.mean(values), alpha=0.5)
    ax.set_xticks(range(len(configs)), configs, rotation=20, fontsize=8)
    ax.set(ylabel="test bits/dim (T = ∞)", title="continuous-time bound on the test split")
    fig.tight_layout()
    paths.append(out / "learned_schedule_bpd.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def paired_difference(first: Sequence[float], second: Sequence[float]) -> tuple[float, float]:
    """Mean over images of ``first − second`` (per-image values on the same images) and its
    standard error over images."""
    difference = torch.as_tensor(first, dtype=torch.float64) - torch.as_tensor(second, dtype=torch.float64)
    if difference.dim() != 1 or difference.numel() < 2:
        raise ValueError("first, second: expected per-image values for the same >= 2 images")
    return difference.mean().item(), (difference.std() / math.sqrt(difference.numel())).item()


def paired_over_seeds(first: Sequence[dict], second: Sequence[dict], num_steps: int | None = None) -> dict:
    """Two configurations on the same test images and the same seeds, paired: ``first −
    second`` in bits/dim (negative: ``first`` is better).

    ``first``, ``second``: result dicts (one per seed) with per-image test bounds, at T = ∞
    (``num_steps=None``, ``test_per_image_bpd``) or at ``num_steps`` = T
    (``test_per_image_bpd_T{T}``); seeds found in both are used.  Returns ``difference`` (the
    mean over images of the per-image difference of the seed means, which is also the mean over
    seeds of the per-seed mean differences) with two standard errors:

    * ``se_images``: over test images of the per-image seed-mean differences (the run-to-run
      spread is averaged inside each image's value, not counted separately);
    * ``se_seeds``: over seeds of the per-seed mean differences (counts the run-to-run spread;
      needs two seeds or more, else NaN);

    their ``z_images``, ``z_seeds``; the ``per_seed`` and ``per_image`` (seed-mean)
    differences; ``images_better``, the number of images where ``first`` is lower."""
    key = "test_per_image_bpd" if num_steps is None else f"test_per_image_bpd_T{num_steps}"
    by_seed = []
    for role, results in (("first", first), ("second", second)):
        values = {}
        for result in results:
            if key not in result:
                raise ValueError(f"{role}: a result without {key!r} (seed {result.get('seed')})")
            values[result["seed"]] = torch.as_tensor(result[key], dtype=torch.float64)
        by_seed.append(values)
    seeds = sorted(set(by_seed[0]) & set(by_seed[1]))
    if not seeds:
        raise ValueError("first, second: no seed in common")
    first_means, second_means = (torch.stack([values[s] for s in seeds]).mean(0) for values in by_seed)
    mean, se_images = paired_difference(first_means, second_means)  # checks the per-image shapes
    per_image = first_means - second_means
    per_seed = torch.stack([by_seed[0][s] - by_seed[1][s] for s in seeds]).mean(1)
    se_seeds = (per_seed.std() / math.sqrt(len(seeds))).item() if len(seeds) > 1 else float("nan")
    return {
        "seeds": seeds,
        "num_steps": num_steps,
        "difference": mean,
        "se_images": se_images,
        "z_images": mean / se_images,
        "se_seeds": se_seeds,
        "z_seeds": mean / se_seeds if len(seeds) > 1 else float("nan"),
        "per_seed": per_seed.tolist(),
        "per_image": per_image.tolist(),
        "images_better": int((per_image < 0).sum()),
        "num_images": per_image.numel(),
    }


def paired_comparison(
    results: Sequence[dict],
    dataset=None,
    *,
    num_components: int = 50,
    seed: int = 0,
    mixture=None,
    num_steps: int | None = None,
) -> dict:
    """The diffusion's per-image test bound against the mixture of categoricals on the same
    test images, paired.

    ``results``: result dicts of one configuration (several seeds are averaged per image) with
    ``test_per_image_bpd`` (T = ∞), or with ``test_per_image_bpd_T{T}`` for ``num_steps`` = T
    (and the matching ``…_se``).  The mixture (:class:`~pyro_diffusion.baselines.CategoricalMixture`,
    fitted on the whole training split, or ``mixture`` when given, to fit it once for many
    calls) gives exact per-image code lengths.  Returns, in
    bits/dim: ``difference`` = mean over images of (mixture − diffusion) (positive: the
    diffusion is better), its standard error over images ``difference_se`` and ``z`` =
    difference / se; ``mc_se``, the Monte Carlo standard error of the diffusion's mean (part
    of ``difference_se``, since each image's estimate is noisy); and both means."""
    from ..baselines import CategoricalMixture

    suffix = "" if num_steps is None else f"_T{num_steps}"
    key, se_key = f"test_per_image_bpd{suffix}", f"test_per_image_se{suffix}"
    if not results or any(key not in r or se_key not in r for r in results):
        raise ValueError(f"results: expected result dicts with {key!r} and {se_key!r}")
    dataset = dataset if dataset is not None else load_dataset(results[0].get("data", "digits"))
    test = dataset.test
    if mixture is None:
        mixture = CategoricalMixture(dataset.num_levels, num_components, seed=seed).fit(dataset.train)
    mixture_bpd = (-mixture.log_prob(test) / (test[0].numel() * math.log(2))).to(torch.float64)
    per_seed = torch.tensor([r[key] for r in results], dtype=torch.float64)
    per_seed_se = torch.tensor([r[se_key] for r in results], dtype=torch.float64)
    if per_seed.shape[1] != mixture_bpd.shape[0]:
        raise ValueError(
            f"results: {per_seed.shape[1]} per-image values for {mixture_bpd.shape[0]} test images"
        )
    diffusion_bpd = per_seed.mean(0)
    n = diffusion_bpd.shape[0]
    difference = mixture_bpd - diffusion_bpd
    se = (difference.std() / math.sqrt(n)).item()
    mc_se = (per_seed_se.pow(2).sum(0).sqrt() / per_seed.shape[0]).pow(2).sum().sqrt().item() / n
    return {
        "config": results[0]["config"],
        "seeds": [r["seed"] for r in results],
        "num_images": n,
        "mixture_bpd": mixture_bpd.mean().item(),
        "diffusion_bpd": diffusion_bpd.mean().item(),
        "difference": difference.mean().item(),
        "difference_se": se,
        "z": difference.mean().item() / se,
        "mc_se": mc_se,
        "images_better": int((difference > 0).sum()),
    }


def summarize(folder: str | Path, baselines: bool = True) -> str:
    """Read every ``*_seed*.json`` result in ``folder``, write ``results.md`` (with the
    per-pixel categorical and mixture-of-categoricals baselines of
    :mod:`pyro_diffusion.baselines` when ``baselines``), ``baselines.json`` and the figures;
    returns the table."""

    folder = Path(folder)
    results = [run_files.read_json(p) for p in sorted(folder.glob("*_seed*.json"))]
    if not results:
        raise FileNotFoundError(f"folder: no *_seed*.json results in {folder}")
    named = None
    if baselines:
        from ..baselines import baseline_bits_per_dim

        values = baseline_bits_per_dim(load_dataset(results[0].get("data", "digits")))
        run_files.write_json(values, folder / "baselines.json")
        components = values["categorical_mixture"]["num_components"]
        named = {
            "per-pixel categorical": values["pixel_categorical"],
            f"mixture of {components} categoricals": values["categorical_mixture"],
        }
    table = results_table(results, named)
    run_files.write_bytes((table + "\n").encode(), folder / "results.md")
    plot_results(results, folder)
    return table


def run_vdm_comparison(
    configs: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    *,
    quick: bool = False,
    baselines: bool = True,
    recipe: str = "short",
    **kwargs,
) -> str:
    """Train and evaluate each configuration and seed into ``out/<config>_seed<s>.json``
    (finished ones are reused), then :func:`summarize`; returns the table.  ``kwargs`` go to
    :func:`train_and_evaluate`, over the settings of ``recipe`` (:data:`RECIPES`); ``quick``
    applies :data:`QUICK` between the two."""

    unknown = [c for c in configs if c not in CONFIGS and not _is_linear(c)]
    if unknown:
        raise ValueError(f"configs: unknown {unknown}; expected entries of {CONFIGS}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe: expected one of {tuple(RECIPES)}, got {recipe!r}")
    out = run_files.check_out(out, argument="--out")
    settings = {**RECIPES[recipe], **(QUICK if quick else {}), **kwargs}
    with run_files.RunLock(out, argument="--out"):  # one study writes ``out`` at a time
        for seed in seeds:
            for config in configs:
                path = out / f"{config}_seed{seed}.json"
                if path.exists():
                    continue
                result = train_and_evaluate(config, seed=seed, **settings)
                run_files.write_json(result, path)
        return summarize(out, baselines)
