"""Small trained models for the inference examples, docs and slow tests, cached under ``runs/``.

The 2-D mixture model and the digits model used by ``examples/inpainting_*.py``,
``examples/hierarchical_denoising.py`` and ``docs/prior.md`` are trained here with the core
losses (:class:`~pyro_diffusion.losses.DiffusionELBO` or
:class:`~pyro_diffusion.losses.SimplifiedLoss`) and :class:`pyro.infer.SVI`, briefly, on CPU;
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
"""

from __future__ import annotations

import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import ClippedAdam
from tqdm.auto import tqdm

from ..data import load_dataset
from ..diffusion import Diffusion, GaussianDiffusion
from ..losses import DiffusionELBO, SimplifiedLoss
from ..nets import MLPDenoiser, StepIndexed
from ..schedules import LearnedGamma, NoiseSchedule

__all__ = ["ddpm_schedule", "make_diffusion", "train", "load_or_train", "LOSSES", "SCHEDULES", "DATASETS"]

LOSSES = ("elbo", "simple")
SCHEDULES = ("linear", "learned")
DATASETS = {"gmm": ((2,), 128), "digits": ((1, 8, 8), 256)}  # event shape, hidden width
#: the learned schedule's initial endpoints γ(0), γ(1)
LEARNED_ENDPOINTS = (-10.0, 8.0)


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
    """Train ``diffusion`` on ``data`` with SVI and the core loss ``loss`` ("elbo": the
    one-step unbiased estimate of the full ELBO, :class:`~pyro_diffusion.losses.DiffusionELBO`;
    "simple": L_simple), on the model's own grid for a tabulated schedule and in continuous
    time for a schedule that is a function of time.  ``num_steps`` counts optimizer steps.
    Returns the loss trace (per datum)."""
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    gamma = 0.05 ** (1.0 / num_steps)  # learning rate decays 20× over the run
    svi = SVI(
        diffusion.model,
        diffusion.guide,
        ClippedAdam({"lr": lr, "lrd": gamma, "clip_norm": 10.0}),
        _objective(diffusion, loss),
    )
    generator = torch.Generator().manual_seed(seed)
    trace = []
    diffusion.train()
    for _ in tqdm(range(num_steps), desc=f"train {loss}", disable=not progress):
        index = torch.randint(data.shape[0], (batch_size,), generator=generator)
        trace.append(svi.step(data[index]) / batch_size)
    pyro.clear_param_store()
    return trace


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
