"""Small trained models for the inference examples, docs and slow tests, cached under ``runs/``.

The 2-D mixture model and the digits model used by ``examples/inpainting_*.py``,
``examples/hierarchical_denoising.py`` and ``docs/prior.md`` are trained here with the core
losses and :class:`pyro.infer.SVI`, briefly, on CPU; the weights are cached in a gitignored
``runs/`` directory (never committed) and retrained when missing.  The experiments module
(``pyro_diffusion/training.py``, issue 4) is the place for real training runs; this module
only makes the inference workflows reproducible from a clean checkout.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import ClippedAdam
from torch import nn
from tqdm.auto import tqdm

from ..data import load_dataset
from ..diffusion import GaussianDiffusion
from ..losses import SimplifiedLoss, StepSubsampledELBO
from ..nets import MLPDenoiser
from ..schedule import NoiseSchedule

__all__ = ["FlatMLPDenoiser", "make_diffusion", "train", "load_or_train", "LOSSES"]

LOSSES = ("elbo", "simple")


class FlatMLPDenoiser(nn.Module):
    """An :class:`~pyro_diffusion.nets.MLPDenoiser` on flattened images: ``(B, *shape)`` in and out."""

    def __init__(self, event_shape: tuple[int, ...], hidden: int = 256, depth: int = 3) -> None:
        super().__init__()
        self.event_shape = tuple(event_shape)
        size = 1
        for d in self.event_shape:
            size *= d
        self.mlp = MLPDenoiser(size, hidden=hidden, depth=depth)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.reshape(x.shape[0], -1), t).reshape(x.shape)


def _linear(num_steps: int) -> NoiseSchedule:
    # DDPM's linear schedule scaled to T, with β_T capped at 0.5 (the scaling reaches 0.999 for T < 50)
    return NoiseSchedule.linear(num_steps, beta_end=min(0.02 * 1000 / num_steps, 0.5))


def make_diffusion(dataset: str, num_steps: int = 50, name: str = "diffusion") -> GaussianDiffusion:
    """The untrained configuration used for ``dataset`` ("gmm" or "digits").

    Both use a Gaussian decoder (continuous x_0, so that gradient-based samplers apply to the
    whole chain), the "small" variances σ_t² = β̃_t, and the linear schedule scaled to T (at
    T = 50: β from 0.002 to 0.4) with β_T capped at 0.5.  Not the cosine schedule: at small T its last β_T = 0.999
    makes the ε-parameterized mean divide by √α_T ≈ 0.03, which amplifies the denoiser's error
    at t = T thirty-fold and throws a few samples far out (the uncapped linear schedule does the
    same for T < 50)."""
    if dataset == "gmm":
        denoiser: nn.Module = MLPDenoiser(2, hidden=128, depth=3)
        event_shape: tuple[int, ...] = (2,)
        schedule = _linear(num_steps)
    elif dataset == "digits":
        denoiser = FlatMLPDenoiser((1, 8, 8), hidden=256, depth=3)
        event_shape = (1, 8, 8)
        schedule = _linear(num_steps)
    else:
        raise ValueError(f"dataset: expected 'gmm' or 'digits', got {dataset!r}")
    return GaussianDiffusion(denoiser, schedule, event_shape, variance="small", name=name)


def train(
    diffusion: GaussianDiffusion,
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
    step-subsampled full ELBO; "simple": L_simple).  Returns the loss trace (per datum)."""
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    objective = StepSubsampledELBO() if loss == "elbo" else SimplifiedLoss()
    gamma = 0.05 ** (1.0 / num_steps)  # learning rate decays 20× over the run
    svi = SVI(
        diffusion.model, diffusion.guide, ClippedAdam({"lr": lr, "lrd": gamma, "clip_norm": 10.0}), objective
    )
    generator = torch.Generator().manual_seed(seed)
    trace = []
    for _ in tqdm(range(num_steps), desc=f"train {loss}", disable=not progress):
        index = torch.randint(data.shape[0], (batch_size,), generator=generator)
        trace.append(svi.step(data[index]) / batch_size)
    pyro.clear_param_store()
    return trace


def load_or_train(
    dataset: str = "gmm",
    loss: str = "simple",
    *,
    num_steps: int = 50,
    train_steps: int | None = None,
    root: str | Path = "runs/inference",
    progress: bool = False,
) -> GaussianDiffusion:
    """The cached trained model for ``(dataset, loss, T)``, training it first when missing.

    Weights live in ``{root}/{dataset}_{loss}_T{num_steps}.pt`` (a gitignored directory)."""
    train_steps = train_steps or (4000 if dataset == "gmm" else 6000)
    path = Path(root) / f"{dataset}_{loss}_linear_T{num_steps}_{train_steps}.pt"
    diffusion = make_diffusion(dataset, num_steps, name=f"{dataset}_{loss}")
    if path.exists():
        diffusion.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return diffusion.eval()
    data = load_dataset(dataset).train
    start = time.perf_counter()
    trace = train(diffusion, data, loss=loss, num_steps=train_steps, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(diffusion.state_dict(), path)
    seconds = time.perf_counter() - start
    (path.with_suffix(".log")).write_text(
        f"trained {train_steps} steps in {seconds:.1f} s; final loss (mean of last 200) "
        f"{sum(trace[-200:]) / 200:.4f}\n"
    )
    return diffusion.eval()
