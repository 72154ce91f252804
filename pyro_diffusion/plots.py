"""Figures for runs and comparisons, written as PNG files (matplotlib, Agg backend).

* :func:`loss_curves` — training loss against optimizer step, one panel per run (smoothed).
* :func:`term_profile` — the per-step terms L_t against t in bits/dim: where the bound spends
  its bits (a signed axis when a term is negative).
* :func:`sample_grid` / :func:`scatter` — samples of images or of vectors (the first two
  coordinates, on axes set by quantiles; a histogram for 1-D data).
* :func:`forward_chain` — one datum noised by q(x_t | x_0) at a few levels of a grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["loss_curves", "term_profile", "sample_grid", "scatter", "forward_chain"]


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(
    histories: Mapping[str, Sequence[float]],
    path: str | Path,
    window: int = 50,
    units: Mapping[str, str] | None = None,
) -> Path:
    """Training loss per datum against step, one line per entry (moving average over
    ``window`` steps).  Losses of different objectives are in different units, so each gets
    its own panel; ``units[name]`` labels its axis (default: ``"nats"`` for the ELBO
    objectives, ``"objective's units"`` otherwise).  A log axis when every value is positive,
    else a linear one."""
    if not histories:
        raise ValueError("histories: expected at least one loss history")
    units = dict(units or {})
    fig, axes = plt.subplots(1, len(histories), figsize=(4 * len(histories), 3), squeeze=False)
    for ax, (name, history) in zip(axes[0], histories.items()):
        smooth = _smooth(history, window)
        ax.plot(np.arange(len(smooth)) + min(window, len(history)), smooth)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        unit = units.get(name, "nats" if name.startswith("elbo") else "objective's units")
        ax.set_ylabel(f"loss per datum [{unit}]" + (f" ({window}-step mean)" if window > 1 else ""))
        if len(smooth) and np.all(smooth > 0):
            ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    return _save(fig, path)


def term_profile(profiles: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """L_t against t in bits/dim for each entry; ``profile[i]`` is L_i with i = 0 the decoder
    term and i = T the prior term (the layout of ``vlb_terms``).  The per-step axis is
    logarithmic when every term is positive; when one is not (the decoder term −log p(x₀|x₁)
    of continuous data is a negative log density when the decoder is sharp) it is a signed
    symmetric-log axis, so a negative term is drawn below zero, not clipped."""
    if not profiles:
        raise ValueError("profiles: expected at least one profile")
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    values = [np.asarray(profile, dtype=float) for profile in profiles.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    for name, profile in zip(profiles, values):
        steps = np.arange(len(profile))
        left.plot(steps, profile, label=name)
        right.plot(steps, np.cumsum(profile), label=name)
    if finite.size and np.all(finite > 0):
        left.set_yscale("log")
    elif finite.size and np.any(finite != 0):
        nonzero = np.abs(finite[finite != 0])
        linthresh = max(nonzero.min(), 1e-4 * nonzero.max())  # log-like down to the smallest term
        left.set_yscale("symlog", linthresh=float(linthresh))
        left.axhline(0.0, color="0.6", lw=0.6)
    left.set_xlabel("t (0 = decoder −log p(x₀|x₁), T = prior KL)")
    left.set_ylabel("L_t  [bits/dim]")
    left.set_title("per-step terms")
    right.set_xlabel("t")
    right.set_ylabel("Σ_{s≤t} L_s  [bits/dim]")
    right.set_title("cumulative")
    right.legend(fontsize=7)
    return _save(fig, path)


def sample_grid(images: torch.Tensor, path: str | Path, ncols: int = 8, title: str | None = None) -> Path:
    """A grid of images ``(N, C, H, W)`` in [−1, 1] (C = 3 in colour; otherwise the first
    channel, in grey)."""
    images = torch.as_tensor(images).detach().cpu().float().clamp(-1, 1)
    if images.dim() != 4:
        raise ValueError(f"images: expected shape (N, C, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    if n < 1:
        raise ValueError("images: expected at least one image")
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 0.8, nrows * 0.8 + (0.3 if title else 0)))
    for i, ax in enumerate(np.asarray(axes).reshape(-1)):
        ax.axis("off")
        if i < n:
            image = (images[i] + 1) / 2
            if image.shape[0] == 3:
                ax.imshow(image.permute(1, 2, 0).numpy())
            else:  # grey, or the first channel of any other number of channels
                ax.imshow(image[0].numpy(), cmap="gray_r", vmin=0, vmax=1)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _points(points, name: str) -> torch.Tensor:
    """``(N, D)`` points (any event shape is flattened to D values)."""
    points = torch.as_tensor(points).detach().cpu().float()
    if points.dim() == 1:
        points = points[:, None]
    if points.dim() < 2 or points.shape[0] < 1 or points[0].numel() < 1:
        raise ValueError(f"sets[{name!r}]: expected points of shape (N, D), got {tuple(points.shape)}")
    return points.reshape(points.shape[0], -1)


def _robust_limits(values: np.ndarray, coverage: float = 0.99) -> tuple[float, float]:
    """Axis limits holding the central ``coverage`` of ``values`` (quantiles), with a margin:
    a few far-out samples do not squash the rest into a corner."""
    values = values[np.isfinite(values)]
    if not values.size:
        return -1.0, 1.0
    tail = (1 - coverage) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    if high <= low:
        low, high = low - 1.0, high + 1.0
    margin = 0.08 * (high - low)
    return float(low - margin), float(high + margin)


def scatter(sets: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Side-by-side plots of point sets ``(N, D)`` on shared axes: a scatter of the first two
    coordinates (D ≥ 2; titled with the dimensions shown when D > 2), a histogram for D = 1.
    Any other event shape is flattened to D values first.  The axes span the central 99 % of
    all the sets' points (quantiles, so that a few outlying samples do not squash the rest);
    a panel says how many of its points lie outside."""
    if not sets:
        raise ValueError("sets: expected at least one point set")
    flat = {name: _points(points, name) for name, points in sets.items()}
    dims = {points.shape[1] for points in flat.values()}
    if len(dims) != 1:
        raise ValueError(f"sets: expected point sets of one dimension, got {sorted(dims)}")
    (dim,) = dims
    everything = torch.cat(list(flat.values())).numpy()
    xlim = _robust_limits(everything[:, 0])
    ylim = _robust_limits(everything[:, 1]) if dim > 1 else None
    fig, axes = plt.subplots(
        1, len(flat), figsize=(3.4 * len(flat), 3.4), squeeze=False, sharex=True, sharey=dim > 1
    )
    for ax, (name, points) in zip(axes[0], flat.items()):
        finite = points[torch.isfinite(points).all(1)].numpy()
        inside = (finite[:, 0] >= xlim[0]) & (finite[:, 0] <= xlim[1])
        if dim > 1:
            inside &= (finite[:, 1] >= ylim[0]) & (finite[:, 1] <= ylim[1])
        outside = len(points) - int(inside.sum())
        note = f"\n{outside} of {len(points)} outside the axes" if outside else ""
        if dim == 1:
            ax.hist(finite[inside, 0], bins=50, range=xlim, density=True, alpha=0.7)
            ax.set_xlabel("x  [data units]")
            ax.set_ylabel("density  [1 / data unit]")
            ax.set_title(name + note, fontsize=9)
        else:
            ax.scatter(finite[inside, 0], finite[inside, 1], s=2, alpha=0.5)
            ax.set_title((name if dim == 2 else f"{name} (dims 1, 2 of {dim})") + note, fontsize=9)
            ax.set_xlabel("x₁  [data units]")
            ax.set_ylabel("x₂  [data units]")
            ax.set_ylim(*ylim)
        ax.set_xlim(*xlim)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    return _save(fig, path)


def _levels(levels) -> torch.Tensor:
    """The noise levels γ_1 < … < γ_T of ``levels``: a tensor of them, a diffusion (its own
    grid) or a schedule with a native grid."""
    if isinstance(levels, torch.Tensor):
        gammas = levels
    elif callable(getattr(levels, "grid", None)):
        gammas = levels.grid()
    else:
        raise TypeError(
            "levels: expected a 1-D tensor of noise levels, a Diffusion or a Schedule with a native grid, "
            f"got {type(levels).__name__}"
        )
    gammas = gammas.detach().cpu().to(torch.float64)
    if gammas.dim() != 1 or gammas.numel() < 1:
        raise ValueError(
            f"levels: expected a non-empty 1-D grid of noise levels, got shape {tuple(gammas.shape)}"
        )
    return gammas


def forward_chain(
    levels, x0: torch.Tensor, path: str | Path, steps: Sequence[int] | None = None, seed: int = 0
) -> Path:
    """One datum ``x0`` (shape ``event_shape``) noised by q(x_t | x_0) = N(α_t x_0, σ_t² I),
    α_t² = ᾱ_t = sigmoid(−γ_t), at the given 1-based ``steps`` of the grid ``levels`` (a
    :class:`~pyro_diffusion.diffusion.Diffusion`, whose own grid is used, a schedule with a
    native grid, or a tensor of levels γ_1 < … < γ_T; default steps: 8 spread over 1..T);
    images are shown as pictures (their first channel), vectors as a cloud of 500 draws per step
    (the first two coordinates; a histogram for one)."""
    gammas = _levels(levels)
    T = gammas.shape[0]
    steps = (
        list(steps) if steps is not None else sorted({1, *np.linspace(1, T, 8).round().astype(int).tolist()})
    )
    if any(not 1 <= s <= T for s in steps):
        raise ValueError(f"steps: expected 1-based steps in 1..{T}, got {steps}")
    g = torch.Generator().manual_seed(seed)
    x0 = torch.as_tensor(x0).detach().cpu().double()
    abar = torch.sigmoid(-gammas)
    if x0.dim() < 1:
        x0 = x0.reshape(1)
    image = x0.dim() == 3
    flat = x0.reshape(1, -1)
    fig, axes = plt.subplots(1, len(steps) + 1, figsize=(1.4 * (len(steps) + 1), 1.8 if image else 1.6))
    draws = 1 if image else 500
    for ax, s in zip(axes, [0, *steps]):
        a = 1.0 if s == 0 else abar[s - 1].item()
        noise = torch.randn((draws, *x0.shape), generator=g, dtype=torch.float64)
        x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
        if image:
            ax.imshow(((x_t[0, 0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.axis("off")
        elif flat.shape[1] == 1:
            ax.hist(x_t.reshape(draws, -1)[:, 0].numpy(), bins=40, range=(-3, 3), density=True)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            points = x_t.reshape(draws, -1)
            ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(f"t={s}" + ("" if s == 0 else f"\nᾱ={a:.2g}"), fontsize=7)
    return _save(fig, path)
