r"""Posterior sampling at dimension 8–64 against exact posteriors.

Problems (:func:`~pyro_diffusion.inference.mixture.random_problem`): a random prior of 20
diagonal Gaussian components in d dimensions, its exact denoiser inside a diffusion with 1000
levels of its own (:func:`~pyro_diffusion.inference.mixture.mixture_diffusion`), a dense random A
with d_y unit-norm rows, a datum x from the prior and ``y = A x + σ_y η``; σ_y runs log-evenly
from ``noise_range[0]`` to ``noise_range[1]`` over the problems of a cell.  The exact posterior
is the closed-form mixture :func:`~pyro_diffusion.inference.mixture.mixture_posterior`.

Every method runs on a K-level sub-grid (``num_steps``) and gives ``num_draws`` equally
weighted draws (weighted particles are resampled: :meth:`PosteriorResult.sample`), compared
with ``num_reference`` exact draws by the sliced Wasserstein distance (POT, 200 projections,
the same for every method of a problem) and its max-sliced version; the mode-weight error is the
total variation between the posterior's component weights and their estimate from the draws
(:func:`~pyro_diffusion.inference.mixture.mode_weight_error`).  Beside each figure: the
**floor**, ``num_draws`` fresh exact draws against the same reference (what a perfect sampler
scores), and the **ceiling**, ``num_draws`` prior draws (what ignoring y scores).

Methods: twisted SMC (``tds``), MCGdiff (``mcgdiff``, in ``num_runs`` batched independent
runs), DDRM, replacement in the SVD basis, and DPS with a step per unit of noise level at
each λ of ``dps_grid`` (the table shows the λ with the lowest median per cell, which favours
DPS).  The paired test is a Wilcoxon signed-rank test over the problems of a cell on the
difference of SW between the best method and the best DPS.

Run ``python -m pyro_diffusion.experiments.posterior_study --out runs/posterior`` (``--quick``
for a run of under a minute; ``--docs`` also writes the table as the last section of
``docs/prior.md``, ``--docs-from-results`` writes it from ``OUT/results.json`` of an earlier run
without running again).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from ..inference.ddrm import ddrm_sample
from ..inference.heuristics import dps_sample, replacement_sample
from ..inference.mcgdiff import mcgdiff
from ..inference.mixture import mixture_diffusion, mode_weight_error, random_problem, sliced_wasserstein
from ..inference.smc import twisted_smc

__all__ = ["StudyConfig", "run_problem", "run_study", "summarize", "markdown_table", "main"]

SECTION_TITLE = "## 8. Posterior sampling at dimension 8–64 (2026-12-01)"


class StudyConfig:
    """The study's settings (see the module docstring)."""

    def __init__(
        self,
        dims=(8, 16, 64),
        num_problems: int = 10,
        num_steps: int = 100,
        num_particles: int = 16384,
        mcgdiff_particles: int = 8192,
        num_runs: int = 4,
        num_draws: int = 1000,
        num_reference: int = 2000,
        num_components: int = 20,
        noise_range=(0.03, 1.0),
        dps_grid=(1.0, 3.0, 10.0),
        num_projections: int = 200,
        seed: int = 0,
    ) -> None:
        self.dims = tuple(dims)
        self.num_problems = num_problems
        self.num_steps = num_steps
        self.num_particles = num_particles
        self.mcgdiff_particles = mcgdiff_particles
        self.num_runs = num_runs
        self.num_draws = num_draws
        self.num_reference = num_reference
        self.num_components = num_components
        self.noise_range = tuple(noise_range)
        self.dps_grid = tuple(dps_grid)
        self.num_projections = num_projections
        self.seed = seed

    @staticmethod
    def observation_counts(dim: int) -> list[int]:
        return sorted({1, 2, 4, dim // 2} - {0})

    def noise_scale(self, index: int) -> float:
        lo, hi = self.noise_range
        if self.num_problems == 1:
            return lo
        return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * index / (self.num_problems - 1))

    def as_dict(self) -> dict:
        return dict(vars(self))


def run_problem(config: StudyConfig, dim: int, num_observations: int, index: int) -> dict:
    """All methods on one problem: ``{method: {sw, max_sw, mode_error, seconds, network_calls,
    evaluations}}`` plus the problem's ``noise_scale``."""
    seed = config.seed + 1000 * dim + 100 * num_observations + index
    sigma = config.noise_scale(index)
    problem = random_problem(dim, num_observations, sigma, num_components=config.num_components, seed=seed)
    posterior = problem.posterior()
    diffusion = mixture_diffusion(problem.mixture)
    obs, y, K, n = problem.observation, problem.y, config.num_steps, config.num_draws
    generator = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    reference = posterior.sample((config.num_reference,))

    def score(draws, seconds=float("nan"), calls=0, evaluations=0, extra=None):
        sw_args = {"num_projections": config.num_projections, "seed": seed}
        row = {
            "sw": sliced_wasserstein(draws, reference, **sw_args),
            "max_sw": sliced_wasserstein(draws, reference, maximum=True, **sw_args),
            "mode_error": mode_weight_error(posterior, draws),
            "seconds": seconds,
            "network_calls": calls,
            "evaluations": evaluations,
        }
        row.update(extra or {})
        return row

    rows = {
        "floor": score(posterior.sample((n,))),
        "ceiling": score(problem.mixture.sample(n, generator)),
    }
    N = config.num_particles
    r = twisted_smc(diffusion, obs, y, num_particles=N, num_steps=K)
    rows["tds"] = score(
        r.sample(n, generator), r.seconds, r.network_calls, r.network_calls * N, {"ess": r.ess}
    )
    per_run = max(2, config.mcgdiff_particles // config.num_runs)
    r = mcgdiff(diffusion, obs, y, num_particles=per_run, num_runs=config.num_runs, num_steps=K)
    # the runs' agreement: the spread of their evidence estimates (nats)
    spread = float(r.diagnostics["log_evidence_runs"].std()) if config.num_runs > 1 else float("nan")
    rows["mcgdiff"] = score(
        r.sample(n, generator),
        r.seconds,
        r.network_calls,
        r.network_calls * per_run * config.num_runs,
        {"ess": r.ess, "log_evidence_spread": spread},
    )
    r = ddrm_sample(diffusion, obs, y, n, num_steps=K)
    rows["ddrm"] = score(r.draws, r.seconds, r.network_calls, r.network_calls * n)
    r = replacement_sample(diffusion, obs, y, n, num_steps=K)
    rows["replacement"] = score(r.draws, r.seconds, r.network_calls, r.network_calls * n)
    for lam in config.dps_grid:
        r = dps_sample(diffusion, obs, y, n, step_per_level=lam, num_steps=K)
        rows[f"dps@{lam:g}"] = score(r.draws, r.seconds, r.network_calls, r.network_calls * n)
    return {
        "dim": dim,
        "num_observations": num_observations,
        "index": index,
        "noise_scale": sigma,
        "methods": rows,
    }


def run_study(config: StudyConfig, progress: bool = True) -> list[dict]:
    cells = [(d, m) for d in config.dims for m in config.observation_counts(d)]
    jobs = [(d, m, i) for d, m in cells for i in range(config.num_problems)]
    results = []
    with pyro.validation_enabled(False):
        for d, m, i in tqdm(jobs, desc="posterior study", disable=not progress):
            results.append(run_problem(config, d, m, i))
    return results


SAMPLERS = ("tds", "mcgdiff", "ddrm", "replacement")


def _wilcoxon(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of a − b (NaN if all equal)."""
    from scipy.stats import wilcoxon

    diffs = [x - z for x, z in zip(a, b)]
    if all(abs(v) == 0 for v in diffs) or len(diffs) < 2:
        return float("nan")
    return float(wilcoxon(a, b).pvalue)


def summarize(results: list[dict]) -> list[dict]:
    """One summary per (d, d_y): per method the median and quartiles of SW, the median max-SW,
    mode-weight error, seconds, calls and evaluations; the best DPS λ; the best sampler and its
    paired test against DPS."""
    cells: dict[tuple[int, int], list[dict]] = {}
    for row in results:
        cells.setdefault((row["dim"], row["num_observations"]), []).append(row)
    summary = []
    for (d, m), rows in sorted(cells.items()):
        names = list(rows[0]["methods"])
        stats = {}
        for name in names:
            vals = {key: [r["methods"][name][key] for r in rows] for key in rows[0]["methods"][name]}
            sw = sorted(vals["sw"])
            q = statistics.quantiles(sw, n=4, method="inclusive") if len(sw) > 1 else [sw[0]] * 3
            stats[name] = {
                "sw": statistics.median(sw),
                "sw_q1": q[0],
                "sw_q3": q[2],
                "max_sw": statistics.median(vals["max_sw"]),
                "mode_error": statistics.median(vals["mode_error"]),
                "seconds": statistics.median(vals["seconds"]),
                "network_calls": statistics.median(vals["network_calls"]),
                "evaluations": statistics.median(vals["evaluations"]),
                "sw_values": vals["sw"],
            }
        dps_names = [n for n in names if n.startswith("dps@")]
        best_dps = min(dps_names, key=lambda n: stats[n]["sw"])
        best = min(SAMPLERS, key=lambda n: stats[n]["sw"])
        floor = stats["floor"]["sw"]
        ratios = [r["methods"][best]["sw"] / r["methods"]["floor"]["sw"] for r in rows]
        wins = sum(r["methods"][best]["sw"] < r["methods"][best_dps]["sw"] for r in rows)
        summary.append(
            {
                "dim": d,
                "num_observations": m,
                "num_problems": len(rows),
                "methods": stats,
                "best_dps": best_dps,
                "best": best,
                "best_over_floor": stats[best]["sw"] / floor,
                "best_over_floor_per_problem_median": statistics.median(ratios),
                "wins_over_dps": wins,
                "p_value_vs_dps": _wilcoxon(stats[best]["sw_values"], stats[best_dps]["sw_values"]),
            }
        )
    return summary


def _fmt(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.0f}"


def markdown_table(summary: list[dict]) -> str:
    """The results as Markdown: one table per d (rows: d_y × method)."""
    lines = []
    for d in sorted({s["dim"] for s in summary}):
        lines += [
            f"**d = {d}** (SW median [quartiles] over the problems; max-SW and mode-weight TV medians; "
            "seconds, network calls and per-datum evaluations per problem)",
            "",
            "| d_y | method | SW | max-SW | mode TV | s | calls | evaluations |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in (s for s in summary if s["dim"] == d):
            for name in ("floor", "ceiling", *SAMPLERS, s["best_dps"]):
                st = s["methods"][name]
                label = {"floor": "exact (floor)", "ceiling": "prior (ceiling)"}.get(name, name)
                if name == s["best"]:
                    label = f"**{label}**"
                timing = "" if name in ("floor", "ceiling") else f"{st['seconds']:.2f}"
                calls = "" if name in ("floor", "ceiling") else f"{st['network_calls']:.0f}"
                evals = "" if name in ("floor", "ceiling") else f"{st['evaluations']:.0f}"
                lines.append(
                    f"| {s['num_observations']} | {label} | {_fmt(st['sw'])} [{_fmt(st['sw_q1'])}, "
                    f"{_fmt(st['sw_q3'])}] | {_fmt(st['max_sw'])} | {_fmt(st['mode_error'])} | {timing} | "
                    f"{calls} | {evals} |"
                )
        lines.append("")
    lines += [
        "| d | d_y | best | best / floor (medians) | median of per-problem ratios | within 1.5× | "
        "beats best DPS on | Wilcoxon p vs DPS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        ok = "yes" if s["best_over_floor"] <= 1.5 else "no"
        lines.append(
            f"| {s['dim']} | {s['num_observations']} | {s['best']} | {s['best_over_floor']:.2f} | "
            f"{s['best_over_floor_per_problem_median']:.2f} | {ok} | {s['wins_over_dps']}/{s['num_problems']} "
            f"({s['best_dps']}) | {s['p_value_vs_dps']:.2g} |"
        )
    return "\n".join(lines) + "\n"


def goal_lines(summary: list[dict]) -> list[str]:
    """The goal, cell by cell, from the numbers: the best sampler within 1.5× of the floor
    (ratio of medians) and better than the best DPS at the 1% level (paired Wilcoxon)."""
    lines = []
    for s in summary:
        near = s["best_over_floor"] <= 1.5
        better = s["p_value_vs_dps"] < 0.01 and s["wins_over_dps"] > s["num_problems"] / 2
        lines.append(
            f"* d = {s['dim']}, d_y = {s['num_observations']}: {s['best']} at "
            f"{s['best_over_floor']:.2f}× the floor ({'within' if near else 'not within'} 1.5×); "
            f"{'significantly better' if better else 'not significantly better'} than the best DPS "
            f"({s['best_dps']}; better on {s['wins_over_dps']}/{s['num_problems']} problems, "
            f"Wilcoxon p = {s['p_value_vs_dps']:.2g})."
        )
    return lines


def docs_section(config: StudyConfig, summary: list[dict], seconds: float, argv) -> str:
    """The docs section: the command, the settings, the tables and the goal per cell."""
    command = "python -m pyro_diffusion.experiments.posterior_study " + " ".join(argv or [])
    return "\n".join(
        [
            SECTION_TITLE,
            "",
            "Written by",
            "",
            f"    {command.strip()}",
            "",
            f"({seconds / 60:.1f} min on one CPU thread).  Settings: {config.num_problems} problems per "
            f"(d, d_y), σ_y log-evenly from {config.noise_range[0]} to {config.noise_range[1]}, "
            f"{config.num_components} components, K = {config.num_steps} levels for every method, "
            f"twisted SMC with {config.num_particles} particles, MCGdiff {config.num_runs} runs × "
            f"{config.mcgdiff_particles // config.num_runs}, {config.num_draws} draws per method against "
            f"{config.num_reference} exact draws, DPS λ ∈ {list(config.dps_grid)} (step per unit of γ).",
            "",
            markdown_table(summary),
            "Goal per cell (best sampler within 1.5× of the floor; better than the best DPS at p < 0.01, "
            "paired over problems):",
            "",
            *goal_lines(summary),
            "",
        ]
    )


def write_docs(path: Path, section: str) -> None:
    """Replace (or append) the study's section, the last of ``docs/prior.md``."""
    text = path.read_text()
    if SECTION_TITLE in text:
        text = text[: text.index(SECTION_TITLE)]
    path.write_text(text.rstrip("\n") + "\n\n" + section)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/posterior", help="output folder (the only place written)")
    parser.add_argument("--quick", action="store_true", help="d = 8, two problems per cell, K = 20")
    parser.add_argument("--docs", action="store_true", help="also write the last section of docs/prior.md")
    parser.add_argument(
        "--docs-from-results",
        action="store_true",
        help="write the docs section from OUT/results.json of an earlier run, without running",
    )
    parser.add_argument("--num-problems", type=int, default=None)
    parser.add_argument("--num-steps", type=int, default=None)
    parser.add_argument("--num-particles", type=int, default=None)
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--no-progress", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    docs = Path(__file__).resolve().parents[2] / "docs" / "prior.md"
    if args.docs_from_results:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        config = StudyConfig(**saved["config"])
        summary = summarize(saved["problems"])
        command = saved.get("argv", ["--out", args.out])
        write_docs(docs, docs_section(config, summary, saved["seconds"], command))
        return {"summary": summary, "seconds": saved["seconds"]}
    torch.set_num_threads(1)
    config = StudyConfig()
    if args.quick:
        config = StudyConfig(
            dims=(8,),
            num_problems=2,
            num_steps=20,
            num_particles=512,
            mcgdiff_particles=512,
            num_draws=300,
            num_reference=600,
        )
    for key, value in (
        ("num_problems", args.num_problems),
        ("num_steps", args.num_steps),
        ("num_particles", args.num_particles),
    ):
        if value is not None:
            setattr(config, key, value)
    if args.dims:
        config.dims = tuple(args.dims)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_study(config, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    summary = summarize(results)
    table = markdown_table(summary)
    (out / "results.json").write_text(
        json.dumps(
            {
                "config": config.as_dict(),
                "seconds": seconds,
                "argv": argv,
                "problems": results,
                "summary": summary,
            },
            indent=1,
        )
    )
    (out / "table.md").write_text(table)
    print(table)
    print(f"{len(results)} problems in {seconds:.0f} s; written to {out}/")
    if args.docs:
        write_docs(docs, docs_section(config, summary, seconds, argv))
    return {"summary": summary, "seconds": seconds}


if __name__ == "__main__":
    main()
