r"""The comparison experiment: one network, schedule and budget, several objectives and seeds.

For each objective in ``objectives`` (entries of :data:`~pyro_diffusion.training.OBJECTIVES`:
the full ELBO with uniform or importance-sampled t, L_simple, the hybrid with learned
variances) and each seed, :func:`run_comparison` trains a run (``out/<objective>/seed<s>``,
a normal run directory of :func:`~pyro_diffusion.training.fit`, the package's training engine,
resumable), then measures

* the test NLL bound in bits/dim from all T + 1 terms
  (:func:`~pyro_diffusion.training.bound_bits_per_dim`);
* sample quality: for 2-D data the energy distance and MMD to held-out data; for digits the
  Fréchet distance in the feature space of a small classifier trained on the training split,
  the classifier's confidence on samples and a nearest-neighbour copy check;
* training seconds and steps;

Each run directory gets the figures of ``train`` and ``evaluate`` (``loss.png``,
``samples.png``, ``schedule.png``, ``profile.png``).  The comparison directory gets
``results.json``, ``results.md`` (the table, mean ± sd over seeds) and figures:
``loss_curves.png``, ``profile.png`` (L_t against t per objective), ``samples_<objective>.png``
and ``forward_chain.png``.  On K-level data the table also holds the baselines of
:mod:`~pyro_diffusion.baselines`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .. import plots
from .. import runs as run_files
from ..training import (
    CHECKPOINT,
    CONFIG,
    OBJECTIVES,
    TrainConfig,
    bound_bits_per_dim,
    build_diffusion,
    fit,
    load_run_data,
    read_json,
    read_metrics,
    write_json,
    write_metrics,
)

__all__ = ["QUICK", "run_comparison", "format_table", "parse_table"]

DEFAULT_OBJECTIVES = ("elbo", "elbo-is", "simple", "hybrid")

#: what ``--quick`` changes in the base configuration: a few seconds per run on a CPU (the
#: whole digits comparison, 4 objectives × 2 seeds, in about a minute on an idle 2-core box)
QUICK = {
    "steps": 1000,
    "num_steps": 100,
    "hidden": 128,
    "depth": 2,
    "checkpoint_every": 1000,
    "num_train": 5000,
    "num_test": 1000,
}


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(np.mean(values)), sd


def _sample_quality(
    diffusion, dataset, num_samples: int, seed: int, classifier, progress: bool = False
) -> tuple[dict, torch.Tensor]:
    from .. import metrics

    torch.manual_seed(10_000 + seed)
    samples = diffusion.sample(num_samples, progress=progress).cpu()
    if dataset.is_image and classifier is not None:
        report = metrics.classifier_report(classifier, samples, dataset.test)
        report.update(metrics.nearest_neighbour_check(samples, dataset.train, dataset.test))
    else:
        report = metrics.two_sample_report(samples, dataset.test)
    report["finite_samples"] = bool(torch.isfinite(samples).all())
    return report, samples


def _run_figures(config, diffusion, dataset, metrics: dict, samples: torch.Tensor, run_dir: Path) -> None:
    """The figures of an ordinary run directory (``train``'s ``loss.png``, ``samples.png``,
    ``schedule.png`` and ``evaluate``'s ``profile.png``), from what the comparison measured."""
    from ..training import schedule_figure

    plots.loss_curves({config.objective: metrics["loss_history"]}, run_dir / "loss.png")
    if dataset.is_image:
        plots.sample_grid(
            samples[:64], run_dir / "samples.png", title=f"{config.objective}, seed {config.seed}"
        )
    else:
        plots.scatter({"held-out data": dataset.test[:1000], "samples": samples}, run_dir / "samples.png")
    schedule_figure(diffusion, run_dir / "schedule.png", label=config.resolved(dataset).schedule)
    plots.term_profile({config.objective: metrics["test_profile_bits"]}, run_dir / "profile.png")


def run_comparison(
    base: TrainConfig,
    out: str | Path,
    *,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    seeds: Sequence[int] = (0, 1, 2),
    num_samples: int | None = None,
    baselines: bool = True,
    mixture_components: int = 50,
    log=print,
) -> dict:
    """Train every (objective, seed) pair on ``base`` and write the comparison to ``out``.

    Args:
        base: the shared configuration (data, network, schedule, steps, batch size, …); its
            ``objective`` and ``seed`` are replaced per run.
        out: the comparison directory.
        objectives: names in :data:`~pyro_diffusion.training.OBJECTIVES`.
        seeds: one run per seed and objective.
        num_samples: samples per run for the quality metrics (default: as many as test data,
            at most 1000).
        baselines: on K-level data, fit and score the two categorical baselines.
        mixture_components: M for the mixture baseline.
        log: where progress lines go (``print`` by default).

    Returns:
        the results dict (also in ``out/results.json``).  Runs already finished in ``out``
        under the same configuration are reused; unfinished ones are resumed.
    """
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives:
        raise ValueError(
            f"objectives: expected a non-empty list from {sorted(OBJECTIVES)}, got {list(objectives)}"
        )
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    out = run_files.check_out(out, argument="--out")
    base.validate()
    with run_files.RunLock(out, argument="--out"):  # one comparison writes ``out`` at a time
        return _run_comparison(base, out, objectives, seeds, num_samples, baselines, mixture_components, log)


def _run_comparison(base, out, objectives, seeds, num_samples, baselines, mixture_components, log) -> dict:
    dataset = load_run_data(base)
    num_samples = num_samples or min(len(dataset.test), 1000)
    classifier = None
    results: dict = {"config": base.resolved(dataset).to_dict(), "seeds": list(seeds), "runs": {}}
    if dataset.is_image and dataset.labels_train is not None:
        from ..metrics import DigitsClassifier

        cached = out / "classifier.pt"
        if cached.exists():  # the same deterministic fit; saves its training time on re-runs
            classifier = DigitsClassifier()
            state = run_files.torch_load(cached, argument="--out", what="classifier cache")
            run_files.load_module_state(classifier, state, path=cached, argument="--out")
            classifier.eval()
        else:
            classifier = DigitsClassifier.fit(dataset.train, dataset.labels_train, seed=0)
            run_files.atomic_save(classifier.state_dict(), cached)
        results["classifier_test_accuracy"] = classifier.accuracy(dataset.test, dataset.labels_test)
    if baselines and dataset.num_levels is not None:
        from ..baselines import baseline_bits_per_dim

        results["baselines"] = baseline_bits_per_dim(dataset, mixture_components)

    histories, profiles, first_samples = {}, {}, {}
    for objective in objectives:
        runs = []
        for seed in seeds:
            config = dataclasses.replace(base, objective=objective, seed=seed)
            run_dir = out / objective / f"seed{seed}"
            metrics = read_metrics(run_dir)
            done = metrics.get("finished") and "test_bits_per_dim" in metrics
            if done:
                saved = read_json(run_dir / CONFIG)
                done = saved.get("steps") == config.steps
            if not done:
                log(f"[compare] training {objective} seed {seed} for {config.steps} steps → {run_dir}")
                with run_files.RunLock(run_dir, argument="--out"):  # training and its test metrics
                    fitted = fit(config, dataset=dataset, out=run_dir, resume=(run_dir / CHECKPOINT).exists())
                    diffusion = fitted.diffusion  # the run's selected weights, in eval mode
                    started = time.perf_counter()
                    bound = bound_bits_per_dim(
                        diffusion, dataset.test.to(config.device), seed=seed, progress=config.progress
                    )
                    quality, samples = _sample_quality(
                        diffusion, dataset, num_samples, seed, classifier, progress=config.progress
                    )
                    metrics = read_metrics(run_dir)
                    metrics.update(
                        {
                            "test_bits_per_dim": bound["bits_per_dim"],
                            "test_bits_per_dim_se": bound["bits_per_dim_se"],
                            "test_profile_bits": bound["profile_bits"],
                            "quality": quality,
                            "eval_seconds": time.perf_counter() - started,
                            "checkpoint_step": fitted.engine.step_count,
                        }
                    )
                    write_metrics(metrics, run_dir)
                    run_files.atomic_save(samples[:64], run_dir / "samples.pt")
                    _run_figures(config, diffusion, dataset, metrics, samples, run_dir)
            log(
                f"[compare] {objective} seed {seed}: test {metrics['test_bits_per_dim']:.4f} bits/dim, "
                f"{metrics['train_seconds']:.0f} s"
            )
            runs.append(metrics)
        histories[objective] = runs[0]["loss_history"]
        profiles[objective] = np.mean([r["test_profile_bits"] for r in runs], 0).tolist()
        first_samples[objective] = run_files.torch_load(
            out / objective / f"seed{seeds[0]}" / "samples.pt", argument="--out", what="samples file"
        )
        summary = {
            "test_bits_per_dim": _mean_sd([r["test_bits_per_dim"] for r in runs]),
            "train_seconds": _mean_sd([r["train_seconds"] for r in runs]),
            "steps": runs[0]["steps"],
            "per_seed_bits_per_dim": [r["test_bits_per_dim"] for r in runs],
            "profile_bits": profiles[objective],
        }
        for key in runs[0]["quality"]:
            if isinstance(runs[0]["quality"][key], (int, float)) and not isinstance(
                runs[0]["quality"][key], bool
            ):
                summary[key] = _mean_sd([r["quality"][key] for r in runs])
        results["runs"][objective] = summary

    plots.loss_curves(histories, out / "loss_curves.png")
    plots.term_profile(profiles, out / "profile.png")
    for objective, samples in first_samples.items():
        if dataset.is_image:
            plots.sample_grid(samples, out / f"samples_{objective}.png", title=objective)
        else:
            plots.scatter(
                {"held-out data": dataset.test[:1000], objective: samples}, out / f"samples_{objective}.png"
            )
    plots.forward_chain(
        build_diffusion(dataclasses.replace(base, seed=0), dataset),
        dataset.test[0],
        out / "forward_chain.png",
    )

    table = format_table(results, image=dataset.is_image)
    results["table"] = table
    write_json(results, out / "results.json")
    run_files.write_bytes(_markdown(results, table).encode(), out / "results.md")
    log(table)
    return results


def _fmt(pair, digits: int = 3) -> str:
    mean, sd = pair
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if sd is None or math.isnan(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def format_table(results: dict, image: bool) -> str:
    """The comparison as a Markdown table (one row per objective, then the baselines)."""
    if image:
        header = [
            "objective",
            "test bits/dim",
            "Fréchet (clf)",
            "confidence",
            "NN copies",
            "train s",
            "steps",
        ]
    else:
        header = ["objective", "test bits/dim", "energy dist.", "MMD²", "train s", "steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for objective, row in results["runs"].items():
        cells = [objective, _fmt(row["test_bits_per_dim"], 4)]
        if image:
            cells += [
                _fmt(row["frechet_distance"], 2),
                _fmt(row["confidence"], 3),
                _fmt(row["copy_fraction"], 3),
            ]
        else:
            cells += [_fmt(row["energy_distance"], 4), _fmt(row["mmd"], 4)]
        cells += [_fmt(row["train_seconds"], 0), str(row["steps"])]
        lines.append("| " + " | ".join(cells) + " |")
    for name, row in results.get("baselines", {}).items():
        cells = [f"baseline: {name}", f"{row['bits_per_dim']:.4f} ± {row['bits_per_dim_se']:.4f} (se)"]
        cells += ["–"] * (len(header) - 2)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_table(text: str) -> dict[str, list[str]]:
    """Rows of a table written by :func:`format_table`, ``{first cell: other cells}``."""
    rows = {}
    for line in text.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _markdown(results: dict, table: str) -> str:
    config = results["config"]
    lines = [
        f"# Comparison on {config['data']}",
        "",
        f"Seeds {results['seeds']}; mean ± sd over seeds (baselines: ± standard error over test data).",
        f"Network {config['network']} (hidden {config['hidden']}, depth {config['depth']}), "
        f"schedule {config['schedule']}, T = {config['num_steps']}, {config['steps']} SVI steps of "
        f"batch {config['batch_size']}, Adam lr {config['lr']}.",
        "",
        table,
        "",
        "Test bits/dim: −ELBO over all T + 1 terms / (D ln 2), one draw of each x_t per test datum.",
    ]
    if "classifier_test_accuracy" in results:
        lines.append(
            f"Classifier for the Fréchet distance and confidence: test accuracy "
            f"{results['classifier_test_accuracy']:.3f}. 'NN copies': share of samples closer to a "
            "training image than the 1st percentile of test-to-train distances."
        )
    lines += ["", "Configuration:", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)
