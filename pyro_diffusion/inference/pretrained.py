"""Small trained models for the inference examples, docs and slow tests, cached under ``runs/``.

The 2-D mixture model and the digits model used by ``examples/inpainting_*.py``,
``examples/hierarchical_denoising.py`` and ``docs/prior.md`` are trained here with the core
losses (:class:`~pyro_diffusion.losses.DiffusionELBO` or
:class:`~pyro_diffusion.losses.SimplifiedLoss`) in the package's training engine
(:class:`~pyro_diffusion.engine.Engine`), briefly, on CPU;
the weights are cached in a gitignored ``runs/`` directory (never committed) and retrained
when missing.  This module only makes the inference workflows reproducible from a clean
checkout; real training runs belong to :mod:`pyro_diffusion.training`.

Two kinds of model (``schedule=``):

* ``"linear"`` (default): the DDPM that produced the numbers in ``docs/prior.md`` — the
  linear β-schedule scaled to T with β_T capped at 0.5 (explicit βs, see :func:`ddpm_schedule`),
  the "small" variances β̃_t, DDPM's Gaussian decoder, and an MLP that sees the 1-based step t
  as its level (the architecture of those runs), trained on its own T-step grid.
* ``"learned"``: a continuous-time model (VDM) with a learned schedule γ(t)
  (:class:`~pyro_diffusion.schedules.LearnedGamma`), an MLP conditioned on γ and the "plain"
  decoder, trained on the continuous-time bound (``DiffusionELBO(num_steps=0)``); its weights
  do not depend on T, which only sets its default grid (``Diffusion(num_steps=T)``).

And the best learned-schedule digits model of ``docs/learned_schedules.md``
(:func:`load_learned_digits`): the schedule study's ``learned-shape`` configuration (γ on the
validation-chosen endpoints [−2, 4] with a learned shape, the ``"network"`` decoder,
discretized to the 17 levels) trained by
:func:`~pyro_diffusion.experiments.schedule_study.train_and_evaluate_model` with the study's
``regularized`` recipe; the selected EMA weights are saved with ``torch.save`` of the
``state_dict`` beside a JSON of the configuration and the study's test results, and loaded
with ``weights_only=True``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyro
import torch

from ..data import load_dataset
from ..diffusion import Diffusion, GaussianDiffusion
from ..engine import Engine
from ..losses import DiffusionELBO, SimplifiedLoss
from ..nets import MLPDenoiser, StepIndexed
from ..schedules import LearnedGamma, NoiseSchedule

__all__ = [
    "ddpm_schedule",
    "make_diffusion",
    "train",
    "load_or_train",
    "learned_digits_paths",
    "train_learned_digits",
    "load_learned_digits",
    "LOSSES",
    "SCHEDULES",
    "DATASETS",
    "LEARNED_DIGITS",
]

LOSSES = ("elbo", "simple")
SCHEDULES = ("linear", "learned")
DATASETS = {"gmm": ((2,), 128), "digits": ((1, 8, 8), 256)}  # event shape, hidden width
#: the learned schedule's initial endpoints γ(0), γ(1)
LEARNED_ENDPOINTS = (-10.0, 8.0)
#: the best learned-schedule digits model of docs/learned_schedules.md: the schedule study's
#: configuration, recipe (:data:`~pyro_diffusion.experiments.schedule_study.RECIPES`) and the
#: network of every configuration there
LEARNED_DIGITS = {"config": "learned-shape", "recipe": "regularized", "hidden": 128, "depth": 2}


def ddpm_schedule(num_steps: int) -> NoiseSchedule:
    """DDPM's linear schedule scaled to T with β_T capped at 0.5 (the scaling reaches 0.999
    for T < 50): β linear from 1e-4·1000/T to min(0.02·1000/T, 0.5), e.g. 0.002 to 0.4 at
    T = 50 and 0.005 to 0.5 at T = 20.  Not the cosine schedule: at small T its last
    β_T = 0.999 makes the ε-parameterized mean divide by √α_T ≈ 0.03, which amplifies the
    denoiser's error at t = T thirty-fold and throws a few samples far out (the uncapped
    linear schedule does the same for T < 50)."""
    scale = 1000.0 / num_steps
    betas = torch.linspace(min(1e-4 * scale, 0.999), min(0.02 * scale, 0.5), num_steps, dtype=torch.float64)
    return NoiseSchedule(betas)


def make_diffusion(
    dataset: str, num_steps: int = 50, name: str = "diffusion", schedule: str = "linear"
) -> Diffusion:
    """The untrained configuration used for ``dataset`` ("gmm" or "digits") and ``schedule``
    ("linear": the DDPM; "learned": the continuous-time model; see the module docstring).

    Both use a continuous x_0 (a Gaussian decoder), so that gradient-based samplers apply to
    the whole chain, and the "small" reverse variances."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {sorted(DATASETS)}, got {dataset!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    event_shape, hidden = DATASETS[dataset]
    if schedule == "linear":
        noise_schedule = ddpm_schedule(num_steps)
        # the network sees the 1-based step t as its level: with gamma_range (0, 1000) the
        # embedding's position is t itself, the step embedding of the runs in docs/prior.md
        network = MLPDenoiser(event_shape, hidden=hidden, depth=3, gamma_range=(0.0, 1000.0))
        denoiser = StepIndexed(network, noise_schedule)
        return GaussianDiffusion(denoiser, noise_schedule, event_shape, variance="small", name=name)
    denoiser = MLPDenoiser(event_shape, hidden=hidden, depth=3)
    gamma_schedule = LearnedGamma(*LEARNED_ENDPOINTS, hidden=64)
    return Diffusion(
        denoiser,
        gamma_schedule,
        event_shape,
        variance="small",
        decoder="plain",
        num_steps=num_steps,
        name=name,
    )


def _objective(diffusion: Diffusion, loss: str):
    continuous = diffusion.schedule.num_steps is None  # a function of time: train in continuous time
    if loss == "elbo":
        return DiffusionELBO(num_steps=0, times="low-discrepancy") if continuous else DiffusionELBO()
    return SimplifiedLoss(num_steps=0) if continuous else SimplifiedLoss()


def train(
    diffusion: Diffusion,
    data: torch.Tensor,
    *,
    loss: str = "simple",
    num_steps: int = 4000,
    batch_size: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train ``diffusion`` on ``data`` with the package's training engine
    (:class:`~pyro_diffusion.engine.Engine`: Pyro's ``ELBOModule`` of the core loss ``loss``,
    ``torch.optim.Adam`` at ``lr`` decaying 20× over the run, gradients clipped per element
    at 10, minibatch rows drawn with replacement): "elbo" the one-step unbiased estimate of
    the full ELBO (:class:`~pyro_diffusion.losses.DiffusionELBO`), "simple" L_simple; on the
    model's own grid for a tabulated schedule and in continuous time for a schedule that is a
    function of time.  ``num_steps`` counts optimizer steps.  Returns the loss trace (per
    datum)."""
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    pyro.set_rng_seed(seed)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.05 ** (1.0 / num_steps))
    engine = Engine(
        diffusion,
        _objective(diffusion, loss),
        optimizer,
        lr_scheduler=decay,
        clip_value=10.0,
        batch_size=batch_size,
        sampling="replacement",
        seed=seed,
        progress=progress,
        desc=f"train {loss}",
    )
    engine.run(data, num_steps)
    return engine.history


def cache_path(
    dataset: str, loss: str, num_steps: int, train_steps: int, schedule: str, root: str | Path
) -> Path:
    """Where the weights of ``(dataset, loss, schedule, T, train_steps)`` are cached (the
    learned model's weights do not depend on T)."""
    if schedule == "learned":
        return Path(root) / f"{dataset}_{loss}_learned_{train_steps}.pt"
    return Path(root) / f"{dataset}_{loss}_ddpm-linear_T{num_steps}_{train_steps}.pt"


def load_or_train(
    dataset: str = "gmm",
    loss: str = "simple",
    *,
    num_steps: int = 50,
    train_steps: int | None = None,
    schedule: str = "linear",
    root: str | Path = "runs/inference",
    progress: bool = False,
) -> Diffusion:
    """The cached trained model for ``(dataset, loss, schedule, T)``, training it first when
    missing (``train_steps`` optimizer steps, default 4000 for "gmm" and 6000 for "digits").

    Weights live under ``root`` (a gitignored directory), with a ``.log`` beside them."""
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    train_steps = train_steps or (4000 if dataset == "gmm" else 6000)
    diffusion = make_diffusion(dataset, num_steps, name=f"{dataset}_{loss}_{schedule}", schedule=schedule)
    path = cache_path(dataset, loss, num_steps, train_steps, schedule, root)
    if path.exists():
        diffusion.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return diffusion.eval()
    data = load_dataset(dataset).train
    if progress:  # the first call trains (minutes for the default budgets on a CPU); later ones load
        print(
            f"training the {dataset} model ({loss}, {schedule}, {train_steps} steps); cached at {path}",
            flush=True,
        )
    start = time.perf_counter()
    trace = train(diffusion, data, loss=loss, num_steps=train_steps, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(diffusion.state_dict(), path)
    seconds = time.perf_counter() - start
    last = trace[-200:]
    text = f"trained {train_steps} steps in {seconds:.1f} s; final loss (mean of last {len(last)}) {sum(last) / len(last):.4f}"
    if schedule == "learned":
        low, high = diffusion.schedule.endpoints()
        text += f"; learned endpoints gamma(0) = {low.item():.3f}, gamma(1) = {high.item():.3f}"
    path.with_suffix(".log").write_text(text + "\n")
    return diffusion.eval()


# ---------------------------------------------------------------------- the study's digits model
def _check_positive_int(value, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument}: expected a positive integer, got {value!r}")
    return value


def learned_digits_paths(
    seed: int = 0, steps: int = 8000, root: str | Path = "runs/inference"
) -> tuple[Path, Path]:
    """``(weights, config)``: where the learned-schedule digits model of seed ``seed`` trained
    for at most ``steps`` optimizer steps is cached (a ``.pt`` state dict and a ``.json``)."""
    stem = f"digits_{LEARNED_DIGITS['config']}_{LEARNED_DIGITS['recipe']}_seed{seed}_{steps}"
    return Path(root) / f"{stem}.pt", Path(root) / f"{stem}.json"


def _json_able(value):
    if isinstance(value, tuple):
        return [_json_able(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_able(v) for k, v in value.items()}
    return value


def train_learned_digits(
    *,
    seed: int = 0,
    steps: int = 8000,
    root: str | Path = "runs/inference",
    progress: bool = False,
    log_every: int = 0,
    **overrides,
) -> tuple[Diffusion, dict]:
    """Train the learned-schedule digits model (:data:`LEARNED_DIGITS`) with
    :func:`~pyro_diffusion.experiments.schedule_study.train_and_evaluate_model` and cache it.

    The settings are the study's recipe (``regularized``: the ``"network"`` decoder, 200
    training images held out to select the checkpoint every 250 steps, EMA 0.999, weight decay
    1, 1,000 test draws per image, endpoints [−2, 4]) with at most ``steps`` optimizer steps;
    ``overrides`` replace any other of its settings (e.g. ``eval_times``, ``hidden`` for a
    small test model).  Writes the selected EMA weights (``torch.save`` of the ``state_dict``)
    and a JSON with the configuration, the settings and the study's results (test bits/dim
    ``test_bpd_continuous`` ± ``test_bpd_continuous_se`` and the rest, without the per-image
    lists) to :func:`learned_digits_paths` (whose names depend on ``seed`` and ``steps`` only;
    the overrides are in the JSON).  Returns ``(diffusion, results)``."""
    from ..experiments.schedule_study import RECIPES, train_and_evaluate_model

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    steps = _check_positive_int(steps, "steps")
    settings = {
        **RECIPES[LEARNED_DIGITS["recipe"]],
        "hidden": LEARNED_DIGITS["hidden"],
        "depth": LEARNED_DIGITS["depth"],
        **overrides,
        "steps": steps,
    }
    diffusion, results = train_and_evaluate_model(
        LEARNED_DIGITS["config"], seed=seed, progress=progress, log_every=log_every, **settings
    )
    diffusion.eval()
    for param in diffusion.parameters():  # the last training step's gradients
        param.grad = None
    weights, config_path = learned_digits_paths(seed, steps, root)
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(diffusion.state_dict(), weights)
    summary = {k: v for k, v in results.items() if not k.startswith("test_per_image")}
    config = {
        "config": LEARNED_DIGITS["config"],
        "recipe": LEARNED_DIGITS["recipe"],
        "seed": seed,
        "settings": _json_able(settings),
        "model": {
            "event_shape": list(diffusion.event_shape),
            "num_levels": diffusion.num_levels,
            "hidden": settings["hidden"],
            "depth": settings["depth"],
            "decoder": settings.get("decoder", "plain"),
            "tuned": list(settings.get("tuned", (-4.0, 2.0))),
            "diffusion": diffusion.config(),
        },
        "results": summary,
    }
    config_path.write_text(json.dumps(config, indent=1))
    return diffusion, summary


def load_learned_digits(
    *,
    seed: int = 0,
    steps: int = 8000,
    root: str | Path = "runs/inference",
    train_if_missing: bool = True,
    progress: bool = False,
    log_every: int = 0,
) -> tuple[Diffusion, dict]:
    """The cached learned-schedule digits model (see :func:`train_learned_digits`), trained
    first when missing (``train_if_missing``; else a FileNotFoundError naming the path).
    Rebuilt from its JSON with the study's
    :func:`~pyro_diffusion.experiments.schedule_study.make_diffusion` and loaded with
    ``torch.load(..., weights_only=True)``.  Returns ``(diffusion, config)``, the diffusion in
    eval mode and the JSON as a dict (``config["results"]``: the study's test results).

    The model is a continuous-time one: give the inference methods a grid (``num_steps=K``);
    its own grid (``num_steps=None``) has the library's default 1,000 levels."""
    from ..experiments.schedule_study import make_diffusion as study_diffusion

    weights, config_path = learned_digits_paths(seed, steps, root)
    if not (weights.exists() and config_path.exists()):
        if not train_if_missing:
            raise FileNotFoundError(
                f"root: no cached learned digits model at {weights} (and {config_path.name})"
            )
        train_learned_digits(seed=seed, steps=steps, root=root, progress=progress, log_every=log_every)
    config = json.loads(config_path.read_text())
    model = config["model"]
    diffusion = study_diffusion(
        config["config"],
        tuple(model["event_shape"]),
        model["num_levels"],
        hidden=model["hidden"],
        depth=model["depth"],
        decoder=model["decoder"],
        tuned=tuple(model["tuned"]),
    )
    diffusion.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return diffusion.eval(), config
