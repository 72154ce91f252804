r"""Test likelihood on the digits, 17-level (``digits``) and 8-bit (``digits8``), against the
two baselines, over seeds, paired per image.

Every configuration is a :class:`~pyro_diffusion.training.TrainConfig` (so each run is one
``pyro-diffusion train`` command: :func:`config_for` and ``TrainConfig.flags()``), trained by
the package's engine through :func:`~pyro_diffusion.training.fit` into
``OUT/<data>/<name>/seed<S>`` (a run directory that ``load_model`` reloads), and measured on
the test split with the continuous-time bound (``eval_times`` draws per image, the same
draws for every configuration).  Where the bits go is measured too: the decoder term, the
prior term, and the diffusion integral over the first tenth of t (the noise levels nearest
the data) and over the rest.

The baselines (:mod:`pyro_diffusion.baselines`) have their pseudo-counts chosen on the same
200 held-out training images the diffusions select their checkpoints on
(:func:`~pyro_diffusion.baselines.tune_baselines`), then are refitted on the whole training
split.  The test split selects nothing.

Command line::

    python -m pyro_diffusion.experiments.likelihood --data digits8 --configs best --seeds 0 1 2 \
        --out runs/likelihood
    python -m pyro_diffusion.experiments.likelihood --data digits8 --summary --out runs/likelihood
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import runs as run_files
from ..bound import continuous_terms, decoder_term, prior_term
from ..data import load_dataset
from ..training import TrainConfig, continuous_bound, fit, split_validation
from .schedule_study import RECIPES, paired_over_seeds, study_config

__all__ = [
    "CONFIGS",
    "config_for",
    "run_one",
    "run",
    "importance_weighted",
    "importance_weighted_table",
    "baselines",
    "summarize",
    "main",
]

NATS_TO_BITS = 1 / math.log(2)

# The schedule study's best recipe (learned shape on the validation-chosen endpoints [−2, 4],
# network decoder, validation selection every 250 of 8,000 steps, EMA 0.999, weight decay 1)
# and the changes measured against it.  Every name maps to TrainConfig overrides.
_WIDE = {"hidden": 256, "depth": 3, "dropout": 0.1}
CONFIGS: dict[str, dict] = {
    "recipe": {},
    "wide": _WIDE,
    # the training tricks, one at a time off the wide configuration
    "wide-no-ema": {**_WIDE, "ema": 0.0},
    "wide-no-weight-decay": {**_WIDE, "weight_decay": 0.0},
    "wide-no-dropout": {**_WIDE, "dropout": 0.0},
    "wide-uniform-t": {**_WIDE, "times": "uniform"},
    "wide-no-validation": {**_WIDE, "val_size": 0, "eval_every": 0},
    # the frozen endpoints of the learned shape, re-chosen for the wide network (validation)
    "wide-gamma-min-3": {**_WIDE, "gamma_min": -3.0},
    "wide-gamma-min-4": {**_WIDE, "gamma_min": -4.0},
    "wider": {"hidden": 512, "depth": 3, "dropout": 0.2},
    "wide-weight-decay-0.1": {**_WIDE, "weight_decay": 0.1},
    "wider-weight-decay-0.1": {"hidden": 512, "depth": 3, "dropout": 0.2, "weight_decay": 0.1},
    # the learning rate decayed geometrically to a tenth over the run
    "wider-lr-decay": {"hidden": 512, "depth": 3, "dropout": 0.2, "lr_final_fraction": 0.1},
    "wider-dropout-0.3-lr-decay": {
        "hidden": 512,
        "depth": 3,
        "dropout": 0.3,
        "lr_final_fraction": 0.1,
    },
    # the forward process learned per dimension (endpoints and shapes), against "wide"
    "multivariate-wide": {
        **_WIDE,
        "schedule": "learned-multivariate",
        "schedule_hidden": None,
        "freeze_endpoints": False,
    },
    # the level-weighted decoder (needed where the data use few of the K levels: 8-bit digits)
    "level-prior": {"level_prior": True},
    "level-prior-fourier": {"level_prior": True, "fourier_min": 2, "fourier_max": 5},
    "level-prior-wide": {**_WIDE, "level_prior": True},
    # the per-dimension schedule on 8-bit data, against "level-prior-wide"
    "level-prior-multivariate-wide": {
        **_WIDE,
        "level_prior": True,
        "schedule": "learned-multivariate",
        "schedule_hidden": None,
        "freeze_endpoints": False,
    },
}

# the configuration each data set's results use (chosen on the validation split)
BEST = {"digits": "wider", "digits8": "level-prior-wide"}

_RECIPE = {k: v for k, v in RECIPES["regularized"].items() if k not in ("eval_times", "tuned")}


def config_for(name: str, data: str = "digits", seed: int = 0, **overrides) -> TrainConfig:
    """The :class:`~pyro_diffusion.training.TrainConfig` of configuration ``name`` (a key of
    :data:`CONFIGS`) on ``data``, seed ``seed``; ``overrides`` change further fields."""
    if name not in CONFIGS:
        raise ValueError(f"name: expected one of {sorted(CONFIGS)}, got {name!r}")
    base = study_config(
        "learned-shape", data=data, seed=seed, tuned=RECIPES["regularized"]["tuned"], **_RECIPE
    )
    return dataclasses.replace(base, **{**CONFIGS[name], **overrides})


def _where_the_bits_go(diffusion, test: torch.Tensor, draws: int = 32, split: float = 0.1) -> dict:
    """Decoder, prior, and the diffusion integral over t ∈ [0, split] and [split, 1], in
    bits/dim (test means; the diffusion parts from ``draws`` uniform times per image in each
    range, seeded)."""
    D = test[0].numel()
    out = {}
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(2025)
        decoder = torch.stack([decoder_term(diffusion, test) for _ in range(draws)]).mean(0)
        out["decoder_bpd"] = decoder.mean().item() * NATS_TO_BITS / D
        out["prior_bpd"] = prior_term(diffusion, test).mean().item() * NATS_TO_BITS / D
        for key, low, high in (("first_bpd", 0.0, split), ("rest_bpd", split, 1.0)):
            values = []
            for _ in range(draws):
                t = low + (high - low) * torch.rand(test.shape[0], dtype=torch.float64)
                values.append(continuous_terms(diffusion, test, t)[0] * (high - low))
            out[key] = torch.stack(values).mean().item() * NATS_TO_BITS / D
    out["split_t"] = split
    return out


def run_one(config: TrainConfig, out: str | Path, *, eval_times: int = 1000, name: str = "") -> dict:
    """Train ``config`` into the run directory ``out`` and evaluate it on the test split;
    writes and returns ``out/result.json`` (per-image test bounds for paired comparisons)."""
    out = Path(out)
    start = time.time()
    fitted = fit(config, out=out)
    seconds = time.time() - start
    diffusion, dataset = fitted.diffusion, fitted.dataset
    diffusion.eval()
    test = dataset.test.to(diffusion.device)
    estimate = continuous_bound(diffusion, test, num_times=eval_times)
    value, se = estimate.dataset_mean()
    result = {
        "config": name,
        "data": config.data,
        "seed": config.seed,
        "flags": config.flags(),
        "steps": config.steps,
        "train_seconds": seconds,
        "test_bpd_continuous": value,
        "test_bpd_continuous_se": se,
        "estimator_variance_bpd2": estimate.variance.mean().item(),
        "eval_times": eval_times,
        "test_per_image_bpd": estimate.mean.tolist(),
        "test_per_image_se": estimate.standard_error.tolist(),
        "best_step": fitted.engine.best["step"] if fitted.engine.best else None,
        "val_bpd": fitted.engine.best["value"] if fitted.engine.best else None,
        "gamma_endpoints": [g.item() for g in diffusion.schedule.endpoints()],
    }
    result.update(_where_the_bits_go(diffusion, test))
    run_files.write_json(result, out / "result.json")
    return result


def run(
    data: str,
    names: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    *,
    eval_times: int = 1000,
    overrides: dict | None = None,
) -> list[dict]:
    """:func:`run_one` for every configuration and seed, into ``out/<data>/<name>/seed<S>``;
    runs whose ``result.json`` exists are read, not retrained."""
    results = []
    for name in names:
        for seed in seeds:
            folder = Path(out) / data / name / f"seed{seed}"
            if (folder / "result.json").exists():
                results.append(run_files.read_json(folder / "result.json"))
                continue
            config = config_for(name, data=data, seed=seed, **(overrides or {}))
            result = run_one(config, folder, eval_times=eval_times, name=name)
            print(
                f"{data} {name} seed {seed}: {result['test_bpd_continuous']:.4f} ± "
                f"{result['test_bpd_continuous_se']:.4f} bits/dim ({result['train_seconds']:.0f} s)",
                flush=True,
            )
            results.append(result)
    return results


#: the importance-weighted bound's settings: whole trajectories of the chain on a grid of
#: ``num_steps`` levels, ``num_particles`` per estimate, ``num_repeats`` estimates per image
IW_SETTINGS = {"num_steps": 250, "num_particles": 16, "num_repeats": 2}

IW_FILE = "importance_weighted.json"


def importance_weighted(
    folder: str | Path,
    *,
    num_steps: int = IW_SETTINGS["num_steps"],
    num_particles: int = IW_SETTINGS["num_particles"],
    num_repeats: int = IW_SETTINGS["num_repeats"],
    seed: int = 2026,
    progress: bool = False,
) -> dict:
    """The importance-weighted test bound (:func:`~pyro_diffusion.bound.importance_weighted_bound`)
    of the trained run in ``folder`` on the ``num_steps``-level chain, with the ELBO of that
    same chain from the same trajectories (the mean log weight) beside it; per image, in
    bits/dim.  Cached in ``folder/importance_weighted.json`` (recomputed when the settings
    differ)."""
    from ..bound import log_importance_weights
    from ..training import load_model

    folder = Path(folder)
    path = folder / IW_FILE
    settings = {
        "num_steps": num_steps,
        "num_particles": num_particles,
        "num_repeats": num_repeats,
        "seed": seed,
    }
    if path.exists():
        cached = run_files.read_json(path)
        if cached.get("settings") == settings:
            return cached
    diffusion = load_model(folder)
    config = run_files.read_json(folder / "config.json")
    test = load_dataset(config["data"]).test.to(diffusion.device)
    D = test[0].numel()
    start = time.time()
    torch.manual_seed(seed)
    iw, elbo = [], []
    for _ in tqdm(range(num_repeats), desc="importance-weighted bound", disable=not progress, leave=False):
        log_w = log_importance_weights(
            diffusion, test, num_steps=num_steps, num_particles=num_particles, progress=progress
        )
        iw.append(-(torch.logsumexp(log_w, 0) - math.log(num_particles)))
        elbo.append(-log_w.mean(0))
    to_bits = NATS_TO_BITS / D
    iw = torch.stack(iw, 1) * to_bits
    elbo = torch.stack(elbo, 1) * to_bits
    result = {
        "settings": settings,
        "seed_of_run": config["seed"],
        "seconds": time.time() - start,
        "iw_bpd": iw.mean().item(),
        "iw_bpd_se": (iw.var(1).sum().sqrt() / (num_repeats**0.5 * iw.shape[0])).item(),
        "elbo_bpd": elbo.mean().item(),
        "per_image_iw_bpd": iw.mean(1).tolist(),
        "per_image_elbo_bpd": elbo.mean(1).tolist(),
    }
    run_files.write_json(result, path)
    return result


def importance_weighted_curve(
    folder: str | Path,
    out: str | Path,
    *,
    particles: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    num_steps: int = IW_SETTINGS["num_steps"],
    num_images: int = 64,
    seed: int = 2026,
    progress: bool = False,
) -> dict:
    """The importance-weighted bound of the run in ``folder`` against the number of particles
    M, on the first ``num_images`` test images: from one set of max(particles) trajectories
    per image, L_M is the mean over the disjoint groups of M of each group's bound (so every
    point uses every trajectory); writes ``out/importance_weighted_curve.json`` and ``.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..bound import log_importance_weights
    from ..training import load_model

    diffusion = load_model(folder)
    config = run_files.read_json(Path(folder) / "config.json")
    test = load_dataset(config["data"]).test[:num_images].to(diffusion.device)
    torch.manual_seed(seed)
    total = max(particles)
    log_w = log_importance_weights(
        diffusion, test, num_steps=num_steps, num_particles=total, progress=progress
    )
    to_bits = NATS_TO_BITS / test[0].numel()
    rows = []
    single = None
    for m in sorted(particles):
        groups = log_w[: (total // m) * m].reshape(total // m, m, -1)
        per_image = -(torch.logsumexp(groups, 1) - math.log(m)).mean(0) * to_bits
        single = per_image if single is None else single
        rows.append(
            {
                "particles": m,
                "bpd": per_image.mean().item(),
                "se_images": (per_image.std() / per_image.numel() ** 0.5).item(),
                # paired against the fewest particles, image by image (the spread between images cancels)
                "paired_se": ((per_image - single).std() / per_image.numel() ** 0.5).item(),
                "per_image_bpd": per_image.tolist(),
            }
        )
    result = {"run": str(folder), "num_steps": num_steps, "num_images": num_images, "rows": rows}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_files.write_json(result, out / "importance_weighted_curve.json")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.errorbar(
        [r["particles"] for r in rows],
        [r["bpd"] for r in rows],
        yerr=[r["paired_se"] for r in rows],
        marker="o",
        capsize=3,
        label="bars: se of the per-image difference from the first point",
    )
    ax.legend(fontsize=7, frameon=False)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("trajectories per estimate, M")
    ax.set_ylabel("test bits/dim (bound)")
    ax.set_title(f"importance-weighted bound, {num_steps}-level chain, {num_images} test images", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "importance_weighted_curve.png", dpi=120)
    plt.close(fig)
    return result


def importance_weighted_table(data: str, out: str | Path, names: Sequence[str] | None = None) -> str:
    """A Markdown table of the importance-weighted bounds found under ``out/<data>``: per
    configuration, over seeds, the continuous-time ELBO, the ELBO and the importance-weighted
    bound of the grid's chain, and the importance-weighted bound paired against the ELBO and
    against the mixture of categoricals (standard errors over images / over seeds)."""
    root = Path(out) / data
    names = names or sorted(p.name for p in root.iterdir() if p.is_dir())
    mixture = baselines(data, out)["categorical_mixture"]
    lines = [
        f"| {data} configuration | seeds | levels × particles × repeats | ELBO, continuous | ELBO, the grid's chain | "
        "importance-weighted | − continuous ELBO (se images / se seeds) | − mixture (se images / se seeds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        pairs = []
        for folder in sorted((root / name).glob("seed*")):
            if (folder / IW_FILE).exists() and (folder / "result.json").exists():
                pairs.append(
                    (run_files.read_json(folder / "result.json"), run_files.read_json(folder / IW_FILE))
                )
        if not pairs:
            continue
        settings = pairs[0][1]["settings"]
        iw_results = [{"seed": r["seed"], "test_per_image_bpd": w["per_image_iw_bpd"]} for r, w in pairs]
        elbo_results = [r for r, _ in pairs]
        mix = [{"seed": r["seed"], "test_per_image_bpd": mixture["per_image_bpd"]} for r, _ in pairs]
        versus_elbo = paired_over_seeds(iw_results, elbo_results)
        versus_mixture = paired_over_seeds(iw_results, mix)
        cells = [
            _mean_sd(r["test_bpd_continuous"] for r, _ in pairs),
            _mean_sd(w["elbo_bpd"] for _, w in pairs),
            _mean_sd(w["iw_bpd"] for _, w in pairs),
        ]
        lines.append(
            f"| {name} | {len(pairs)} | {settings['num_steps']} × {settings['num_particles']} × "
            f"{settings['num_repeats']} | "
            + " | ".join(f"{m:.4f} ± {sd:.4f}" for m, sd in cells)
            + " | "
            + " | ".join(
                f"{v['difference']:+.4f} ({v['se_images']:.4f} / {v['se_seeds']:.4f})"
                for v in (versus_elbo, versus_mixture)
            )
            + " |"
        )
    return "\n".join(lines)


def baselines(data: str, out: str | Path | None = None, iterations: int = 100) -> dict:
    """Both baselines on ``data`` with validation-chosen pseudo-counts: their settings,
    test bits/dim and per-image bits/dim (``per_image_bpd``); cached in
    ``out/<data>/baselines.json``."""
    from ..baselines import CategoricalMixture, PixelCategorical, tune_baselines

    path = None if out is None else Path(out) / data / "baselines.json"
    if path is not None and path.exists():
        return run_files.read_json(path)
    dataset = load_dataset(data)
    # the diffusions' validation split (the same 200 images), so the test split selects nothing
    fit_x, val_x = split_validation(dataset.train, 200, seed=0)
    tuning = dataclasses.replace(dataset, train=torch.cat([fit_x, val_x]))
    settings = tune_baselines(tuning, val_size=200, iterations=min(iterations, 50))
    D = dataset.test[0].numel()
    values = {}
    for name, model in (
        (
            "pixel_categorical",
            PixelCategorical(dataset.num_levels, **_options(settings, "pixel_categorical")),
        ),
        (
            "categorical_mixture",
            CategoricalMixture(
                dataset.num_levels, 50, iterations=iterations, **_options(settings, "categorical_mixture")
            ),
        ),
    ):
        model.fit(dataset.train)
        per_image = (-model.log_prob(dataset.test) / (D * math.log(2))).to(torch.float64)
        values[name] = {
            **settings[name],
            "bits_per_dim": per_image.mean().item(),
            "bits_per_dim_se": (per_image.std() / math.sqrt(per_image.numel())).item(),
            "per_image_bpd": per_image.tolist(),
        }
    if path is not None:
        run_files.write_json(values, path)
    return values


def _options(settings: dict, name: str) -> dict:
    return {k: settings[name][k] for k in ("alpha", "prior")}


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    return t.mean().item(), (t.std().item() if t.numel() > 1 else float("nan"))


def summarize(data: str, out: str | Path, names: Sequence[str] | None = None, iterations: int = 100) -> str:
    """A Markdown table of every configuration found under ``out/<data>``: test bits/dim over
    seeds, where the bits go, the estimator variance, and the paired difference against the
    mixture of categoricals (per image, seed means; standard errors over images and seeds)."""
    root = Path(out) / data
    names = names or sorted(p.name for p in root.iterdir() if p.is_dir())
    base = baselines(data, out, iterations=iterations)
    mixture = base["categorical_mixture"]
    mixture_as_result = [{"seed": 0, "test_per_image_bpd": mixture["per_image_bpd"]}]
    lines = [
        f"| {data} configuration | steps | seeds | test bits/dim, mean ± sd over seeds | decoder | prior | "
        "diffusion t < 0.1 | diffusion t ≥ 0.1 | estimator variance (bits/dim)² | − mixture (se images / se seeds) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        results = [run_files.read_json(p) for p in sorted((root / name).glob("seed*/result.json"))]
        if not results:
            continue
        seeds = [r["seed"] for r in results]
        mean, sd = _mean_sd(r["test_bpd_continuous"] for r in results)
        parts = [
            _mean_sd(r[k] for r in results)[0] for k in ("decoder_bpd", "prior_bpd", "first_bpd", "rest_bpd")
        ]
        variance = _mean_sd(r["estimator_variance_bpd2"] for r in results)[0]
        paired = paired_over_seeds(results, [dict(m, seed=s) for s in seeds for m in mixture_as_result])
        lines.append(
            f"| {name} | {'/'.join(sorted({str(r['steps']) for r in results}))} | {len(seeds)} | "
            f"{mean:.4f} ± {sd:.4f} | "
            + " | ".join(f"{p:.4f}" for p in parts)
            + f" | {variance:.3f} | {paired['difference']:+.4f} ({paired['se_images']:.4f} / {paired['se_seeds']:.4f}) |"
        )
    for key, label in (
        ("pixel_categorical", "per-pixel categorical"),
        ("categorical_mixture", "mixture of 50 categoricals"),
    ):
        b = base[key]
        lines.append(
            f"| {label} (α = {b['alpha']:g}, {b['prior']} prior) | – | – | {b['bits_per_dim']:.4f} ± "
            f"{b['bits_per_dim_se']:.4f} (se) | | | | | | | |"
        )
    return "\n".join(lines)


def versus(data: str, out: str | Path, first: str, second: str) -> dict:
    """Configuration ``first`` against ``second`` on the same test images and seeds, paired
    (:func:`~pyro_diffusion.experiments.schedule_study.paired_over_seeds`; negative: ``first``
    is better), with each one's mean bound and estimator variance (bits/dim)² over the seeds
    both have."""
    root = Path(out) / data
    results = []
    for name in (first, second):
        found = [run_files.read_json(p) for p in sorted((root / name).glob("seed*/result.json"))]
        if not found:
            raise FileNotFoundError(f"--versus: no results of {name!r} under {root}")
        results.append(found)
    paired = paired_over_seeds(*results)
    results = [[r for r in found if r["seed"] in paired["seeds"]] for found in results]
    for key, found in zip(("first", "second"), results):
        paired[f"{key}_estimator_variance_bpd2"] = _mean_sd(r["estimator_variance_bpd2"] for r in found)[0]
        paired[f"{key}_bpd"] = _mean_sd(r["test_bpd_continuous"] for r in found)
    return paired


# the baselines' pseudo-counts that tune_baselines chose on the validation split (rerun
# ``baselines(data)`` to see them chosen); the demo uses them to skip the tuning's dozen EM fits
DEMO_BASELINES = {
    "digits": {
        "pixel_categorical": {"alpha": 0.1, "prior": "uniform"},
        "categorical_mixture": {"alpha": 0.5, "prior": "uniform"},
    },
    "digits8": {
        "pixel_categorical": {"alpha": 0.01, "prior": "pooled"},
        "categorical_mixture": {"alpha": 0.1, "prior": "pooled"},
    },
}


def demo(out: str | Path, *, data: str = "digits", name: str = "recipe", steps: int = 3000) -> dict:
    """The library's best recipe, shortened to ``steps`` optimizer steps, against the two
    baselines on the test split: a minute or two on a CPU.  Prints and returns the numbers."""
    from ..baselines import baseline_bits_per_dim

    config = config_for(name, data=data, seed=0, steps=steps, eval_every=max(250, steps // 8), progress=True)
    folder = Path(out) / data / f"{name}-{steps}-steps"
    if (folder / "result.json").exists():
        print(f"(the run in {folder} is done: its numbers are read, not retrained; remove it to train again)")
        result = run_files.read_json(folder / "result.json")
    else:
        result = run_one(config, folder, eval_times=100, name=name)
    iw = importance_weighted(folder, progress=True)
    base = baseline_bits_per_dim(load_dataset(data), settings=DEMO_BASELINES[data])
    rows = [
        (
            f"diffusion ({name}, {steps} steps, seed 0): ELBO",
            result["test_bpd_continuous"],
            result["test_bpd_continuous_se"],
        ),
        (
            f"  the same model, importance-weighted ({iw['settings']['num_particles']} paths)",
            iw["iw_bpd"],
            iw["iw_bpd_se"],
        ),
        (
            "mixture of 50 categoricals",
            base["categorical_mixture"]["bits_per_dim"],
            base["categorical_mixture"]["bits_per_dim_se"],
        ),
        (
            "per-pixel categorical",
            base["pixel_categorical"]["bits_per_dim"],
            base["pixel_categorical"]["bits_per_dim_se"],
        ),
    ]
    print(f"\ntest bits/dim on {data} (lower is better; ± standard error):")
    for label, value, se in rows:
        print(f"  {label:<48} {value:.4f} ± {se:.4f}")
    print(
        f"where the diffusion's bits go: decoder {result['decoder_bpd']:.3f}, prior {result['prior_bpd']:.3f}, "
        f"diffusion t < 0.1 {result['first_bpd']:.3f}, t ≥ 0.1 {result['rest_bpd']:.3f}"
    )
    print(
        f"(the importance-weighted bound averages {iw['settings']['num_particles']} whole trajectories of the "
        f"model's {iw['settings']['num_steps']}-level chain per estimate: the same model, a tighter bound)"
    )
    print(f"run directory (reload with pyro_diffusion.training.load_model): {folder}")
    return {"diffusion": result, "importance_weighted": iw, "baselines": base}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_diffusion.experiments.likelihood", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data", choices=("digits", "digits8"), default="digits8")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help=f"of {sorted(CONFIGS)} (default: the best for --data, BEST)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default: the recipe's 8000)"
    )
    parser.add_argument("--eval-times", type=int, default=1000, help="draws per test image of the test bound")
    parser.add_argument("--out", default="runs/likelihood")
    parser.add_argument("--summary", action="store_true", help="only print the table of what is under --out")
    parser.add_argument(
        "--versus", nargs=2, metavar=("FIRST", "SECOND"), help="pair two configurations found under --out"
    )
    parser.add_argument(
        "--importance-weighted",
        action="store_true",
        help="also the importance-weighted test bound of every run (--iw-steps levels, --iw-particles "
        "trajectories per estimate, --iw-repeats estimates per image), and its table",
    )
    parser.add_argument(
        "--iw-curve",
        metavar="RUN",
        help="only the importance-weighted bound of the run directory RUN against the number of "
        "trajectories (1 … 64, 64 test images), into --out",
    )
    parser.add_argument("--iw-steps", type=int, default=IW_SETTINGS["num_steps"])
    parser.add_argument("--iw-particles", type=int, default=IW_SETTINGS["num_particles"])
    parser.add_argument("--iw-repeats", type=int, default=IW_SETTINGS["num_repeats"])
    parser.add_argument(
        "--demo",
        action="store_true",
        help="the best recipe shortened (--steps, default 3000) against the baselines",
    )
    args = parser.parse_args(argv)
    if args.configs is None:
        args.configs = ["recipe"] if args.demo else [BEST[args.data]]
    if args.demo:
        for name in args.configs:
            if name not in CONFIGS:
                parser.error(f"--configs: expected names of {sorted(CONFIGS)}, got {name!r}")
        demo(args.out, data=args.data, name=args.configs[0], steps=args.steps or 3000)
        return 0
    for name in args.configs:
        if name not in CONFIGS:
            parser.error(f"--configs: expected names of {sorted(CONFIGS)}, got {name!r}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps: expected a positive integer, got {args.steps}")
    if args.eval_times < 2:
        parser.error(f"--eval-times: expected an integer >= 2, got {args.eval_times}")
    if args.versus:
        v = versus(args.data, args.out, *args.versus)
        print(
            f"{args.versus[0]} − {args.versus[1]} on {args.data}, seeds {v['seeds']}: {v['difference']:+.4f} bits/dim "
            f"(se over images {v['se_images']:.4f}, z = {v['z_images']:.1f}; over seeds {v['se_seeds']:.4f}, "
            f"z = {v['z_seeds']:.1f}); lower on {v['images_better']} of {v['num_images']} images; "
            f"means {v['first_bpd'][0]:.4f} and {v['second_bpd'][0]:.4f}; estimator variance "
            f"{v['first_estimator_variance_bpd2']:.3f} and {v['second_estimator_variance_bpd2']:.3f} (bits/dim)²"
        )
        return 0
    for flag, value, low in (
        ("--iw-steps", args.iw_steps, 2),
        ("--iw-particles", args.iw_particles, 1),
        ("--iw-repeats", args.iw_repeats, 2),
    ):
        if value < low:
            parser.error(f"{flag}: expected an integer >= {low}, got {value}")
    if args.iw_curve:
        try:
            run_files.check_run_dir(
                args.iw_curve, argument="--iw-curve", needs=("config.json", "checkpoint.pt")
            )
        except run_files.RunError as error:
            parser.error(str(error))
        curve = importance_weighted_curve(args.iw_curve, args.out, num_steps=args.iw_steps, progress=True)
        for row in curve["rows"]:
            print(f"M = {row['particles']:>3}: {row['bpd']:.4f} ± {row['se_images']:.4f} bits/dim")
        print(f"written: {Path(args.out) / 'importance_weighted_curve.png'}")
        return 0
    if not args.summary:
        overrides = {} if args.steps is None else {"steps": args.steps}
        run(args.data, args.configs, args.seeds, args.out, eval_times=args.eval_times, overrides=overrides)
        if args.importance_weighted:
            for name in args.configs:
                for seed in args.seeds:
                    folder = Path(args.out) / args.data / name / f"seed{seed}"
                    w = importance_weighted(
                        folder,
                        num_steps=args.iw_steps,
                        num_particles=args.iw_particles,
                        num_repeats=args.iw_repeats,
                        progress=True,
                    )
                    print(
                        f"{args.data} {name} seed {seed}: importance-weighted {w['iw_bpd']:.4f} ± "
                        f"{w['iw_bpd_se']:.4f} bits/dim (ELBO of the same chain {w['elbo_bpd']:.4f}; "
                        f"{w['seconds']:.0f} s)",
                        flush=True,
                    )
    print(summarize(args.data, args.out))
    if args.importance_weighted:
        print()
        print(importance_weighted_table(args.data, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
