r"""NUTS and SVI at dimension 8–64 against exact posteriors, beside the floor and twisted SMC.

The problems are those of the posterior study (``docs/prior.md`` §8,
:mod:`pyro_diffusion.experiments.posterior_study`): for each d and d_y,
:func:`~pyro_diffusion.inference.mixture.random_problem` with seed ``1000 d + 100 d_y + i``
and σ_y the i-th of 10 log-even values from 0.03 to 1 (``--problems`` picks the i), the exact
mixture denoiser inside :func:`~pyro_diffusion.inference.mixture.mixture_diffusion`, and the
closed-form posterior.  Every method gives ``num_draws`` equally weighted draws, compared with
``num_reference`` exact draws by the sliced Wasserstein distance (POT, 200 projections, the
same projections for every method of a problem); the **floor** is ``num_draws`` fresh exact
draws against the same reference, the **ceiling** ``num_draws`` prior draws.

Methods (``--methods``):

* ``tds`` — twisted SMC on the study's grid (K = 100, 16384 particles), the study's best sampler;
* ``tds@K`` — twisted SMC on the MCMC grid (``--num-steps`` K, 4096 particles): NUTS's start;
* ``nuts`` — :func:`~pyro_diffusion.inference.nuts.nuts_conditional` on the K-level grid,
  ``num_chains`` vectorized copies started from ``tds@K``'s draws, with the low-rank
  preconditioner, JIT-compiled potential; ``nuts-plain`` the same without preconditioner;
* ``svi`` — :func:`~pyro_diffusion.inference.svi.svi_conditional` with the diagonal Normal
  guide over the chain's noises (``guide="noise-normal"``); ``svi-lowrank`` the low-rank
  guide; ``svi-x0`` the mean-field Normal over x_0 with the forward chain as guide;
* ``tds@K-av``, ``nuts-av``, ``nuts-plain-av``, ``svi-av`` — the same on the chain with the
  per-level reverse variances of :func:`~pyro_diffusion.inference.variances.analytic_variances`
  (diagonal, from ``variance_samples`` prior draws standing in for training data, once per
  model), the start ``tds@K-av`` with the Gaussian proposal, the analytic twist variance and the
  projected twist covariance.

Run ``python -m pyro_diffusion.experiments.posterior_mcmc --out runs/posterior_mcmc``
(``--quick``: one small problem, well under a minute; ``--docs`` also writes the table as
section 9 of ``docs/prior.md``, replacing only that section; ``--docs-from-results`` writes it
from ``OUT/results.json`` of an earlier run without running again; ``--notes FILE`` appends a
Markdown file to the section).  Nothing else is written
outside ``--out``.
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

from ..inference.nuts import nuts_conditional
from ..inference.smc import twisted_smc
from ..inference.svi import svi_conditional
from ..inference.variances import analytic_variances
from .posterior_study import replace_section, setup_problem

__all__ = ["MCMCConfig", "METHODS", "run_problem", "summarize", "markdown_table", "write_docs", "main"]

SECTION_TITLE = "## 9. NUTS and SVI at dimension 8–64 (2026-12-01)"
METHODS = (
    "tds",
    "tds@K",
    "nuts",
    "nuts-plain",
    "svi",
    "svi-lowrank",
    "svi-x0",
    "tds@K-av",
    "nuts-av",
    "nuts-plain-av",
    "svi-av",
)
DEFAULT_METHODS = ("tds", "tds@K", "nuts", "nuts-plain", "svi", "svi-x0")


class MCMCConfig:
    """The run's settings (see the module docstring)."""

    def __init__(
        self,
        dims=(8, 16, 64),
        problems=(3,),
        num_steps: int = 20,
        study_steps: int = 100,
        tds_particles: int = 16384,
        init_particles: int = 4096,
        num_chains: int = 16,
        warmup_steps: int = 40,
        num_samples: int = 40,
        max_tree_depth: int = 6,
        svi_steps: int = 300,
        svi_particles: int = 16,
        svi_lr: float = 0.05,
        num_reference: int = 2000,
        num_components: int = 20,
        noise_range=(0.03, 1.0),
        noise_levels: int = 10,
        num_projections: int = 200,
        variance_samples: int = 1000,
        methods=DEFAULT_METHODS,
        seed: int = 0,
    ) -> None:
        self.variance_samples = variance_samples
        self.dims = tuple(dims)
        self.problems = tuple(problems)
        self.num_steps = num_steps
        self.study_steps = study_steps
        self.tds_particles = tds_particles
        self.init_particles = init_particles
        self.num_chains = num_chains
        self.warmup_steps = warmup_steps
        self.num_samples = num_samples
        self.max_tree_depth = max_tree_depth
        self.svi_steps = svi_steps
        self.svi_particles = svi_particles
        self.svi_lr = svi_lr
        self.num_reference = num_reference
        self.num_components = num_components
        self.noise_range = tuple(noise_range)
        self.noise_levels = noise_levels
        self.num_projections = num_projections
        self.methods = tuple(methods)
        self.seed = seed
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; expected some of {METHODS}")

    @property
    def num_draws(self) -> int:
        """Draws per method: NUTS's chains × draws, and the same for every other method."""
        return self.num_chains * self.num_samples

    @staticmethod
    def observation_counts(dim: int) -> list[int]:
        return sorted({1, 4, dim // 2} - {0})

    def noise_scale(self, index: int) -> float:
        lo, hi = self.noise_range
        return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * index / (self.noise_levels - 1))

    def as_dict(self) -> dict:
        return dict(vars(self))


def run_problem(config: MCMCConfig, dim: int, num_observations: int, index: int) -> dict:
    """The methods on one problem: ``{method: {sw, max_sw, mode_error, seconds,
    network_calls, evaluations, ...}}`` plus the problem's ``noise_scale``."""
    setup = setup_problem(config, dim, num_observations, index)
    seed, problem, diffusion, score = setup.seed, setup.problem, setup.diffusion, setup.score
    sigma, generator = setup.noise_scale, setup.generator
    obs, y, K, n = problem.observation, problem.y, config.num_steps, config.num_draws
    rows = {"floor": setup.floor, "ceiling": setup.ceiling}
    methods = config.methods
    if "tds" in methods:
        N = config.tds_particles
        r = twisted_smc(diffusion, obs, y, num_particles=N, num_steps=config.study_steps, seed=seed)
        rows["tds"] = score(
            r.sample(n, generator), r.seconds, r.network_calls, r.network_calls * N, {"ess": r.ess}
        )
    variances = None
    if any(name.endswith("-av") for name in methods):
        # per-level reverse variances on the K-level grid from prior draws standing in for
        # training data (as in the posterior study's -av rows; once per model)
        data = problem.mixture.sample(config.variance_samples, torch.Generator().manual_seed(seed + 7))
        variances = analytic_variances(
            diffusion, data.to(torch.get_default_dtype()), num_steps=K, diagonal=True, seed=seed
        )
    for suffix in ("", "-av"):
        wanted = [f"{name}{suffix}" for name in ("tds@K", "nuts", "nuts-plain")]
        if not set(wanted) & set(methods):
            continue
        rv = variances if suffix else None
        # the start: twisted SMC on the K-level grid (with the variances: the Gaussian proposal,
        # the analytic twist variance and the projected twist covariance)
        extra = (
            dict(proposal="gaussian", twist_variance="analytic", twist_covariance="projected")
            if suffix
            else {}
        )
        N = config.init_particles
        init = twisted_smc(
            diffusion, obs, y, num_particles=N, num_steps=K, seed=seed, reverse_variance=rv, **extra
        )
        rows[f"tds@K{suffix}"] = score(
            init.sample(n, generator),
            init.seconds,
            init.network_calls,
            init.network_calls * N,
            {"ess": init.ess},
        )
        for name, precondition in (("nuts", True), ("nuts-plain", False)):
            if f"{name}{suffix}" not in methods:
                continue
            r = nuts_conditional(
                diffusion,
                obs,
                y,
                num_samples=config.num_samples,
                warmup_steps=config.warmup_steps,
                num_chains=config.num_chains,
                num_steps=K,
                max_tree_depth=config.max_tree_depth,
                vectorize_chains=True,
                jit_compile=True,
                init=init,
                precondition=precondition,
                reverse_variance=rv,
                seed=seed,
            )
            stats = r.diagnostics["sample_stats"]
            evaluations = r.diagnostics["potential_evaluations"]
            rows[f"{name}{suffix}"] = score(
                r.draws,
                r.seconds + init.seconds,  # the start is part of the method's cost
                r.network_calls + init.network_calls,
                r.network_calls * config.num_chains + init.network_calls * config.init_particles,
                {
                    "potential_evaluations": evaluations,
                    "tree_size": float(stats["tree_size"][0].float().mean()),
                    "step_size": float(stats["step_size"][0, -1]),
                    "divergent": float(stats["diverging"][0].float().mean()),
                    "nuts_seconds": r.seconds,
                    "seconds_per_evaluation": r.seconds / max(evaluations, 1),
                },
            )
    for name, guide in (
        ("svi", "noise-normal"),
        ("svi-lowrank", "noise-lowrank"),
        ("svi-x0", "mean-field"),
        ("svi-av", "noise-normal"),
    ):
        if name not in methods:
            continue
        r = svi_conditional(
            diffusion,
            obs,
            y,
            num_iterations=config.svi_steps,
            num_particles=config.svi_particles,
            num_steps=K,
            lr=config.svi_lr,
            init_scale=1.0 if guide != "mean-field" else 0.3,
            num_draws=n,
            guide=guide,
            reverse_variance=variances if name.endswith("-av") else None,
            seed=seed,
        )
        rows[name] = score(
            r.draws,
            r.seconds,
            r.network_calls,
            r.network_calls * config.svi_particles,
            {
                "seconds_per_step": r.diagnostics["seconds_per_step"],
                "final_loss": r.diagnostics["losses"][-1],
            },
        )
    return {
        "dim": dim,
        "num_observations": num_observations,
        "index": index,
        "noise_scale": sigma,
        "methods": rows,
    }


def run(config: MCMCConfig, progress: bool = True) -> list[dict]:
    jobs = [(d, m, i) for d in config.dims for m in config.observation_counts(d) for i in config.problems]
    results = []
    with pyro.validation_enabled(False):
        for d, m, i in tqdm(jobs, desc="posterior mcmc", disable=not progress):
            results.append(run_problem(config, d, m, i))
    return results


def summarize(results: list[dict]) -> list[dict]:
    """One summary per (d, d_y): per method the median and quartiles of SW over the problems,
    medians of max-SW, mode-weight error, seconds, calls, evaluations and SW / floor."""
    cells: dict[tuple[int, int], list[dict]] = {}
    for row in results:
        cells.setdefault((row["dim"], row["num_observations"]), []).append(row)
    summary = []
    for (d, m), rows in sorted(cells.items()):
        stats = {}
        for name in rows[0]["methods"]:
            vals = {key: [r["methods"][name][key] for r in rows] for key in rows[0]["methods"][name]}
            sw = sorted(vals["sw"])
            q = statistics.quantiles(sw, n=4, method="inclusive") if len(sw) > 1 else [sw[0]] * 3
            entry = {key: statistics.median(v) for key, v in vals.items() if isinstance(v[0], (int, float))}
            entry.update(
                sw_q1=q[0],
                sw_q3=q[2],
                over_floor=statistics.median(
                    r["methods"][name]["sw"] / r["methods"]["floor"]["sw"] for r in rows
                ),
            )
            stats[name] = entry
        summary.append({"dim": d, "num_observations": m, "num_problems": len(rows), "methods": stats})
    return summary


def _fmt(x: float) -> str:
    if x != x:
        return ""
    return f"{x:.3f}" if x < 10 else f"{x:.0f}"


def markdown_table(summary: list[dict]) -> str:
    """The results as Markdown, one table per d (rows: d_y × method)."""
    lines = []
    for d in sorted({s["dim"] for s in summary}):
        lines += [
            f"**d = {d}** (medians over the problems of a row; SW [quartiles]; SW / floor per problem; "
            "seconds, batched network calls and per-datum evaluations per problem, NUTS's including its "
            "`tds@K` start; NUTS tree size (leapfrog steps per draw) and divergent fraction; SVI seconds per step)",
            "",
            "| d_y | σ_y | method | SW | SW / floor | max-SW | mode TV | s | calls | evaluations | tree | div. | s/step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in (s for s in summary if s["dim"] == d):
            sigma = s["methods"]["floor"].get("noise_scale", float("nan"))
            for name, st in s["methods"].items():
                label = {"floor": "exact (floor)", "ceiling": "prior (ceiling)"}.get(name, name)
                cost = name not in ("floor", "ceiling")
                seconds = f"{st['seconds']:.1f}" if cost else ""
                calls = f"{st['network_calls']:.0f}" if cost else ""
                evals = f"{st['evaluations']:.3g}" if cost else ""
                nan = float("nan")
                lines.append(
                    f"| {s['num_observations']} | {_fmt(sigma)} | {label} | {_fmt(st['sw'])} "
                    f"[{_fmt(st['sw_q1'])}, {_fmt(st['sw_q3'])}] | {st['over_floor']:.2f} | {_fmt(st['max_sw'])} | "
                    f"{_fmt(st['mode_error'])} | {seconds} | {calls} | {evals} | "
                    f"{_fmt(st.get('tree_size', nan))} | {_fmt(st.get('divergent', nan))} | "
                    f"{_fmt(st.get('seconds_per_step', nan))} |"
                )
        lines.append("")
    return "\n".join(lines) + "\n"


def docs_section(config: MCMCConfig, summary: list[dict], seconds: float, argv, notes: str = "") -> str:
    command = "python -m pyro_diffusion.experiments.posterior_mcmc " + " ".join(argv or [])
    return "\n".join(
        [
            SECTION_TITLE,
            "",
            "Written by",
            "",
            f"    nice -n 10 {command.strip()}",
            "",
            f"({seconds / 60:.1f} min on one CPU thread).  Settings: the posterior study's problems "
            f"(§8: seed 1000 d + 100 d_y + i, σ_y the i-th of {config.noise_levels} log-even values from "
            f"{config.noise_range[0]} to {config.noise_range[1]}) with i ∈ {list(config.problems)}, "
            f"d_y ∈ {{1, 4, d/2}}; {config.num_draws} draws per method against {config.num_reference} exact "
            f"draws (the floor with as many exact draws); `tds` twisted SMC with {config.tds_particles} "
            f"particles on the study's K = {config.study_steps} levels; NUTS and SVI on a K = "
            f"{config.num_steps} sub-grid: NUTS {config.num_chains} vectorized copies × {config.num_samples} "
            f"draws after {config.warmup_steps} warm-up iterations, tree depth ≤ {config.max_tree_depth}, "
            f"JIT, started from `tds@K` (twisted SMC with {config.init_particles} particles on the same "
            f"K = {config.num_steps} levels); SVI {config.svi_steps} Adam steps (lr {config.svi_lr}) with "
            f"{config.svi_particles} vectorized particles.",
            "",
            markdown_table(summary),
            notes,
            "",
        ]
    )


def write_docs(path: Path, section: str) -> None:
    """Insert or replace section 9 of ``docs/prior.md``, leaving every other section as it is:
    the text from :data:`SECTION_TITLE` to the next ``## `` heading (or the end) is replaced;
    without it the section is appended at the end."""
    replace_section(path, SECTION_TITLE, section)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/posterior_mcmc", help="output folder (the only place written)")
    parser.add_argument("--quick", action="store_true", help="one d = 8 problem, K = 10, few draws")
    parser.add_argument("--docs", action="store_true", help="also write section 9 of docs/prior.md")
    parser.add_argument(
        "--docs-from-results",
        action="store_true",
        help="write the docs section from OUT/results.json of an earlier run, without running",
    )
    parser.add_argument("--notes", default=None, help="a Markdown file appended to the docs section")
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--problems", type=int, nargs="+", default=None, help="problem indices i (0-9)")
    parser.add_argument("--num-steps", type=int, default=None, help="K of NUTS and SVI")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--no-progress", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    docs = Path(__file__).resolve().parents[2] / "docs" / "prior.md"
    notes = Path(args.notes).read_text() if args.notes else ""
    if args.docs_from_results:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        config = MCMCConfig(**saved["config"])
        summary = summarize(saved["problems"])
        write_docs(docs, docs_section(config, summary, saved["seconds"], saved["argv"], notes))
        return {"summary": summary, "seconds": saved["seconds"]}
    torch.set_num_threads(1)
    config = MCMCConfig()
    if args.quick:
        config = MCMCConfig(
            dims=(8,),
            problems=(3,),
            num_steps=10,
            study_steps=20,
            tds_particles=512,
            init_particles=512,
            num_chains=4,
            warmup_steps=10,
            num_samples=10,
            max_tree_depth=4,
            svi_steps=30,
            num_reference=400,
            methods=("tds", "tds@K", "nuts", "svi"),
        )
    for key, value in (("num_steps", args.num_steps),):
        if value is not None:
            setattr(config, key, value)
    if args.dims:
        config.dims = tuple(args.dims)
    if args.problems:
        config.problems = tuple(args.problems)
    if args.methods:
        config.methods = tuple(args.methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.quick:
        results = [run_problem(config, 8, 4, 3)]
    else:
        results = run(config, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    for r in results:  # the table shows σ_y beside the floor
        r["methods"]["floor"]["noise_scale"] = r["noise_scale"]
    summary = summarize(results)
    table = markdown_table(summary)
    payload = {
        "config": config.as_dict(),
        "seconds": seconds,
        "argv": argv,
        "problems": results,
        "summary": summary,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "table.md").write_text(table)
    print(table)
    print(f"{len(results)} problems in {seconds:.0f} s; written to {out}/")
    if args.docs:
        write_docs(docs, docs_section(config, summary, seconds, argv, notes))
    return {"summary": summary, "seconds": seconds}


if __name__ == "__main__":
    main()
