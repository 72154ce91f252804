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

Methods: twisted SMC (``tds``, ``num_particles``), MCGdiff (``mcgdiff``, in ``num_runs``
batched independent runs of ``mcgdiff_particles`` in all), the same samplers with the per-level
reverse variances of :func:`~pyro_diffusion.inference.variances.analytic_variances` (rows
``-av``, estimated from ``variance_samples`` prior draws standing in for training data; only the
denoiser is called) and with ``small_particles`` particles (rows ``@N``), DDRM, replacement in
the SVD basis, and DPS with a step per unit of noise level at each λ of ``dps_grid`` (the table
shows the λ with the lowest median per cell, which favours DPS).  ``methods`` selects rows by name
(:func:`parse_method`): ``tds``, ``mcgdiff``, either with ``-av`` and ``@N`` (N particles) or
``@NxK`` (N particles on a K-level grid instead of ``num_steps``; ``-av`` rows then estimate their
variances on that grid), twisted SMC also with tempered twists (``-tlinear``, ``-tP`` for the
exponent P, ``-tadaptive`` or ``-tadaptiveF`` for a conditional-ESS fraction F, before ``@``)
or with ``-an`` (after ``-av``: the analytic twist variance, per coordinate; ``-avL``: the
variances estimated at L levels and interpolated, ``analytic_variances(num_levels=L)``), ``-proj`` (the
projected twist covariance σ_y² I + A diag(r_k) Aᵀ) and ``-gauss`` (the Gaussian proposal), in
that order, ``ddrm``, ``replacement`` and ``dps@λ``; ``cells`` selects (d, d_y) cells.  Weighted particles are turned
into draws by ``draw_scheme`` resampling.  The budget is read three ways: network calls per
problem (one batched call counts once), per-datum evaluations (a call on N particles counts
N; the variance estimate is per model and counted apart, ``setup_evaluations``), and
per-datum evaluations with the variance estimate counted on every problem; under each the
best sampler within ``evaluation_budget`` is compared with the best DPS by a Wilcoxon
signed-rank test over the problems of a cell on the difference of SW.

Run ``python -m pyro_diffusion.experiments.posterior_study --out runs/posterior`` (``--quick``
for a run of under a minute; ``--docs`` also writes the table as section 8 of
``docs/prior.md``, replacing only that section up to its hand-written notes; ``--docs-from-results``
writes it from ``OUT/results.json`` of an earlier run without running again; ``--merge`` adds the
rows of a run with ``--methods`` / ``--cells`` to the same problems of ``OUT/results.json``;
``--stream S`` draws the samplers' random numbers from another stream on the same problems,
reference and floor, for the run-to-run spread).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pyro
import torch
from tqdm.auto import tqdm

from ..inference.ddrm import ddrm_sample
from ..inference.heuristics import dps_sample, replacement_sample
from ..inference.mcgdiff import mcgdiff
from ..inference.mixture import mixture_diffusion, mode_weight_error, random_problem, sliced_wasserstein
from ..inference.smc import twisted_smc
from ..inference.variances import analytic_variances

__all__ = [
    "StudyConfig",
    "default_methods",
    "parse_method",
    "parse_cell",
    "run_problem",
    "merge_results",
    "run_study",
    "samplers",
    "summarize",
    "markdown_table",
    "goal_lines",
    "spread_diagnostic",
    "main",
]

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
        small_particles: int = 1000,
        variance_samples: int = 1000,
        variance_diagonal: bool = True,
        analytic_twist: bool = False,
        draw_scheme: str = "systematic",
        evaluation_budget: int = 100000,
        seed: int = 0,
        methods=None,
        cells=None,
        stream: int = 0,
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
        self.small_particles = small_particles
        self.variance_samples = variance_samples
        self.variance_diagonal = variance_diagonal
        self.analytic_twist = analytic_twist
        self.draw_scheme = draw_scheme
        self.evaluation_budget = evaluation_budget
        self.seed = seed
        self.methods = None if methods is None else list(methods)
        self.cells = None if cells is None else [tuple(c) for c in cells]
        if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
            raise ValueError(f"stream: expected an int >= 0, got {stream!r}")
        self.stream = stream
        for name in self.methods or ():
            parse_method(name, self)
        for cell in self.cells or ():
            parse_cell(cell)

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

    def cell_list(self) -> list[tuple[int, int]]:
        """The (d, d_y) cells run: ``cells``, or every d of ``dims`` with its observation counts."""
        if self.cells is not None:
            return list(self.cells)
        return [(d, m) for d in self.dims for m in self.observation_counts(d)]


def default_methods(config: StudyConfig) -> list[str]:
    """The rows of a full run, in table order."""
    small = config.small_particles
    return [
        "tds",
        "tds-av",
        f"tds@{small}",
        f"tds-av@{small}",
        "tds-av-an-proj-gauss",
        f"tds-av-an-proj-gauss@{small}",
        f"tds-av-an-proj-gauss@{2 * small}x{max(2, config.num_steps // 2)}",
        f"tds-av10-an-proj-gauss@{9 * small // 5}x{max(2, config.num_steps // 2)}",
        "mcgdiff",
        f"mcgdiff-av@{small}",
        "ddrm",
        "replacement",
        *(f"dps@{lam:g}" for lam in config.dps_grid),
    ]


_SMC_NAME = re.compile(
    r"(tds|mcgdiff)(-av([1-9][0-9]*)?)?(-an)?(-proj)?(-gauss)?(?:-t(linear|adaptive(?:0?\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?))?(?:@([1-9][0-9]*)(?:x([1-9][0-9]*))?)?"
)


def parse_method(name: str, config: StudyConfig) -> dict:
    """What a row name asks for: ``{"kind", "variances", "tempering", "particles", "num_steps",
    "step_per_level"}``.

    ``tds`` / ``mcgdiff`` (``num_particles`` / ``mcgdiff_particles`` on ``num_steps`` levels),
    with ``-av`` for the analytic reverse variances, for ``tds`` then ``-tlinear``,
    ``-tadaptive`` or ``-tP`` (P a number) for tempered twists (``twisted_smc``'s
    ``tempering``: ``"linear"``, ``"adaptive"`` with ``tempering_ess`` F from ``-tadaptiveF``
    or 0.5, exponent P), ``@N`` for N particles (MCGdiff's
    N split over ``num_runs`` runs) and ``@NxK`` for N particles on K levels; ``ddrm``,
    ``replacement`` (``num_draws`` draws) and ``dps@λ`` (step per unit of γ)."""
    if not isinstance(name, str):
        raise ValueError(f"methods: expected method names, got {name!r}")
    spec = {
        "kind": name,
        "variances": False,
        "variance_levels": None,
        "tempering": None,
        "proposal": "gradient",
        "twist_covariance": "isotropic",
        "analytic_twist": None,
        "particles": None,
        "num_steps": config.num_steps,
    }
    match = _SMC_NAME.fullmatch(name)
    if match:
        kind, av, av_levels, an, proj, gauss, tempering, particles, levels = match.groups()
        if av_levels is not None and kind != "tds":
            raise ValueError(f"methods: {name!r}: only tds rows take -avL (variances at L levels)")
        if an is not None and (kind != "tds" or av is None):
            raise ValueError(f"methods: {name!r}: -an (the analytic twist variance) needs a tds-av row")
        if proj is not None and kind != "tds":
            raise ValueError(f"methods: {name!r}: only tds rows take -proj (the projected twist covariance)")
        if tempering is not None and kind != "tds":
            raise ValueError(f"methods: {name!r}: only tds rows take -t (tempering)")
        if gauss is not None and kind != "tds":
            raise ValueError(f"methods: {name!r}: only tds rows take -gauss (the Gaussian proposal)")
        if gauss is not None and tempering is not None:
            raise ValueError(f"methods: {name!r}: -gauss and -t do not combine")
        default = config.num_particles if kind == "tds" else config.mcgdiff_particles
        spec.update(
            kind=kind,
            variances=av is not None,
            variance_levels=None if av_levels is None else int(av_levels),
            tempering=_tempering(tempering),
            proposal="gradient" if gauss is None else "gaussian",
            twist_covariance="isotropic" if proj is None else "projected",
            analytic_twist=None if an is None else True,
            particles=default if particles is None else int(particles),
            num_steps=config.num_steps if levels is None else int(levels),
        )
        if spec["num_steps"] < 2:
            raise ValueError(f"methods: {name!r} needs at least 2 levels")
        return spec
    if name in ("ddrm", "replacement"):
        return spec
    if name.startswith("dps@"):
        try:
            lam = float(name[4:])
        except ValueError:
            lam = float("nan")
        if math.isfinite(lam) and lam > 0:
            return {**spec, "kind": "dps", "step_per_level": lam}
    raise ValueError(
        f"methods: unknown method {name!r} (expected tds[-av[L]][-an][-proj][-gauss][-tT][@N[xK]], mcgdiff[-av][@N[xK]], ddrm, "
        "replacement or dps@λ)"
    )


def _tempering(text):
    """``-t`` of a row name as ``twisted_smc`` arguments: None, ``{"tempering": "linear"}``,
    ``{"tempering": p}`` or ``{"tempering": "adaptive", "tempering_ess": F}`` (F: 0.5 unless given)."""
    if text is None:
        return None
    if text == "linear":
        return {"tempering": "linear"}
    if text.startswith("adaptive"):
        fraction = float(text[len("adaptive") :] or 0.5)
        if not 0 < fraction <= 1:
            raise ValueError(f"methods: the adaptive tempering fraction must be in (0, 1], got {text!r}")
        return {"tempering": "adaptive", "tempering_ess": fraction}
    return {"tempering": float(text)}


def parse_cell(cell) -> tuple[int, int]:
    """A (d, d_y) cell from ``"d:d_y"`` or a pair, with 1 ≤ d_y ≤ d."""
    text = cell
    if isinstance(cell, str):
        parts = cell.split(":")
        try:
            cell = tuple(int(p) for p in parts)
        except ValueError:
            cell = ()
    try:
        d, m = (int(v) for v in cell)
    except (TypeError, ValueError):
        raise ValueError(f"cells: expected d:d_y, got {text!r}") from None
    if not 1 <= m <= d:
        raise ValueError(f"cells: expected 1 <= d_y <= d, got {text!r}")
    return d, m


class ProblemSetup(NamedTuple):
    """One study problem and what every method is scored against: its ``seed``, the
    ``problem`` (:func:`~pyro_diffusion.inference.mixture.random_problem`), the exact
    ``posterior``, the exact-denoiser ``diffusion``, the ``reference`` draws, ``score(draws,
    seconds, calls, evaluations, extra)`` (sliced W, max-sliced W and mode-weight error against
    the reference), the ``floor`` and ``ceiling`` rows (exact and prior draws, scored), the
    problem's ``noise_scale`` and the seeded ``generator`` the ceiling's draws came from (the
    methods' resampling continues its stream)."""

    seed: int
    problem: object
    posterior: object
    diffusion: object
    reference: torch.Tensor
    score: Callable[..., dict]
    floor: dict
    ceiling: dict
    noise_scale: float
    generator: torch.Generator


def setup_problem(config, dim: int, num_observations: int, index: int) -> ProblemSetup:
    """The problem ``index`` of cell (``dim``, ``num_observations``) for a study ``config``
    (anything with ``seed``, ``noise_scale(index)``, ``num_components``, ``num_draws``,
    ``num_reference`` and ``num_projections``); seeds Pyro's generator with the problem's seed."""
    seed = config.seed + 1000 * dim + 100 * num_observations + index
    sigma = config.noise_scale(index)
    problem = random_problem(dim, num_observations, sigma, num_components=config.num_components, seed=seed)
    posterior = problem.posterior()
    diffusion = mixture_diffusion(problem.mixture)
    n = config.num_draws
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

    floor = score(posterior.sample((n,)))
    ceiling = score(problem.mixture.sample(n, generator))
    return ProblemSetup(
        seed, problem, posterior, diffusion, reference, score, floor, ceiling, sigma, generator
    )


def run_problem(config: StudyConfig, dim: int, num_observations: int, index: int) -> dict:
    """All methods on one problem: ``{method: {sw, max_sw, mode_error, seconds, network_calls,
    evaluations}}`` plus the problem's ``noise_scale``."""
    setup = setup_problem(config, dim, num_observations, index)
    seed, problem, diffusion, score = setup.seed, setup.problem, setup.diffusion, setup.score
    sigma, generator = setup.noise_scale, setup.generator
    if config.stream:  # the samplers' own random numbers from another stream; the problem is the same
        pyro.set_rng_seed(seed + 100003 * config.stream)
        generator.manual_seed(seed + 100003 * config.stream)
    obs, y, K, n = problem.observation, problem.y, config.num_steps, config.num_draws
    rows = {"floor": setup.floor, "ceiling": setup.ceiling}
    # per-level reverse variances (Analytic-DPM) from M draws of the prior, standing in for the
    # training data: only the network is called; once per model and grid, shared by every
    # observation
    data = problem.mixture.sample(config.variance_samples, torch.Generator().manual_seed(seed + 7))
    estimated = {}

    def variances_on(levels, estimate_levels=None):
        key = (levels, estimate_levels)
        if key not in estimated:
            start = time.perf_counter()
            v = analytic_variances(
                diffusion,
                data.to(torch.get_default_dtype()),
                num_steps=levels,
                diagonal=config.variance_diagonal,
                num_levels=estimate_levels,
                seed=seed,
            )
            estimated[key] = (
                v,
                {"setup_seconds": time.perf_counter() - start, "setup_evaluations": v.evaluations},
            )
        return estimated[key]

    twist = "analytic" if config.analytic_twist else "pigdm"
    scheme = config.draw_scheme

    def smc_row(
        name,
        num_particles,
        levels,
        use_variances,
        tempering=None,
        proposal="gradient",
        covariance="isotropic",
        analytic_twist=None,
        variance_levels=None,
    ):
        reverse_variance, setup = variances_on(levels, variance_levels) if use_variances else (None, {})
        row_twist = "analytic" if analytic_twist else twist
        r = twisted_smc(
            diffusion,
            obs,
            y,
            num_particles=num_particles,
            num_steps=levels,
            reverse_variance=reverse_variance,
            twist_variance="pigdm" if reverse_variance is None else row_twist,
            proposal=proposal,
            twist_covariance=covariance,
            **(tempering or {}),
        )
        extra = {"ess": r.ess, "num_steps": levels, **setup}
        if tempering is not None:  # λ_K at the noise end; the levels run untempered (λ_k = 1)
            lambdas = r.diagnostics["temperatures"]
            extra.update(
                noise_end_temperature=float(lambdas[-1]), untempered_levels=int((lambdas == 1).sum())
            )
        rows[name] = score(
            r.sample(n, generator, scheme=scheme),
            r.seconds,
            r.network_calls,
            r.network_calls * num_particles,
            extra,
        )

    def mcgdiff_row(name, num_particles, levels, use_variances):
        reverse_variance, setup = variances_on(levels) if use_variances else (None, {})
        per_run = max(2, num_particles // config.num_runs)
        r = mcgdiff(
            diffusion,
            obs,
            y,
            num_particles=per_run,
            num_runs=config.num_runs,
            num_steps=levels,
            reverse_variance=reverse_variance,
        )
        # the runs' agreement: the spread of their evidence estimates (nats)
        spread = float(r.diagnostics["log_evidence_runs"].std()) if config.num_runs > 1 else float("nan")
        extra = {
            "ess": r.ess,
            "log_evidence_spread": spread,
            "num_steps": levels,
            **setup,
        }
        rows[name] = score(
            r.sample(n, generator, scheme=scheme),
            r.seconds,
            r.network_calls,
            r.network_calls * per_run * config.num_runs,
            extra,
        )

    for name in default_methods(config) if config.methods is None else config.methods:
        spec = parse_method(name, config)
        kind = spec["kind"]
        if kind == "tds":
            smc_row(
                name,
                spec["particles"],
                spec["num_steps"],
                spec["variances"],
                spec["tempering"],
                spec["proposal"],
                spec["twist_covariance"],
                spec["analytic_twist"],
                spec["variance_levels"],
            )
        elif kind == "mcgdiff":
            mcgdiff_row(name, spec["particles"], spec["num_steps"], spec["variances"])
        else:
            if kind == "ddrm":
                r = ddrm_sample(diffusion, obs, y, n, num_steps=K)
            elif kind == "replacement":
                r = replacement_sample(diffusion, obs, y, n, num_steps=K)
            else:
                r = dps_sample(diffusion, obs, y, n, step_per_level=spec["step_per_level"], num_steps=K)
            rows[name] = score(r.draws, r.seconds, r.network_calls, r.network_calls * n)
    return {
        "dim": dim,
        "num_observations": num_observations,
        "index": index,
        "noise_scale": sigma,
        "methods": rows,
    }


#: the settings that define the problems, the reference and the floor draws
_PROBLEM_KEYS = ("num_components", "noise_range", "num_reference", "num_draws", "num_projections", "seed")


def merge_results(saved: dict, config: StudyConfig, results: list[dict], record: dict) -> dict:
    """Add the method rows of ``results`` (a run of ``config``) to the same problems of a saved
    run (``OUT/results.json`` as a dict), replacing rows of the same name; refuse problems the
    saved run does not have or whose noise, floor or ceiling differ; append ``record`` to its
    ``additions`` and recompute its summary.  Returns ``saved``, changed in place."""
    base = saved["config"]
    for key in _PROBLEM_KEYS:
        mine = getattr(config, key)
        theirs = base[key]
        if (list(mine) if isinstance(mine, (list, tuple)) else mine) != theirs:
            raise ValueError(f"merge: {key} is {mine!r} here but {theirs!r} in the saved run")
    index = {(r["dim"], r["num_observations"], r["index"]): r for r in saved["problems"]}
    for row in results:
        key = (row["dim"], row["num_observations"], row["index"])
        if key not in index:
            raise ValueError(f"merge: problem (d, d_y, index) = {key} is not in the saved run")
        old = index[key]
        same = math.isclose(old["noise_scale"], row["noise_scale"], rel_tol=1e-12) and all(
            math.isclose(old["methods"][ref]["sw"], row["methods"][ref]["sw"], rel_tol=1e-9)
            for ref in _NOT_SAMPLERS
        )
        if not same:
            raise ValueError(f"merge: problem (d, d_y, index) = {key} differs from the saved one")
    for row in results:
        old = index[(row["dim"], row["num_observations"], row["index"])]
        for name, values in row["methods"].items():
            if name not in _NOT_SAMPLERS:
                old["methods"][name] = values
    saved.setdefault("additions", []).append(record)
    saved["summary"] = summarize(saved["problems"], base["evaluation_budget"])
    return saved


def run_study(config: StudyConfig, progress: bool = True) -> list[dict]:
    jobs = [(d, m, i) for d, m in config.cell_list() for i in range(config.num_problems)]
    results = []
    with pyro.validation_enabled(False):
        for d, m, i in tqdm(jobs, desc="posterior study", disable=not progress):
            results.append(run_problem(config, d, m, i))
    return results


#: the reference rows and the DPS rows (its λ grid) are not samplers in the comparison
_NOT_SAMPLERS = ("floor", "ceiling")

#: the two readings of the budget: network calls per problem (one batched call counts once),
#: and per-datum evaluations (a call on N particles counts N)
READINGS = ("calls", "evaluations", "evaluations with setup")


def _family(name: str) -> int:
    return 0 if name.startswith("tds") else 1 if name.startswith("mcgdiff") else 2


def samplers(names) -> list[str]:
    """The compared samplers among the method names of a problem (not the floor, the ceiling or
    DPS), twisted SMC's rows first, then MCGdiff's, each in the order run."""
    return sorted((n for n in names if n not in _NOT_SAMPLERS and not n.startswith("dps@")), key=_family)


def _wilcoxon(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of a − b (NaN if all equal)."""
    from scipy.stats import wilcoxon

    diffs = [x - z for x, z in zip(a, b)]
    if all(abs(v) == 0 for v in diffs) or len(diffs) < 2:
        return float("nan")
    return float(wilcoxon(a, b).pvalue)


def _best(stats: dict, rows: list[dict], candidates: list[str], best_dps: str) -> dict:
    """The candidate with the lowest median SW, its ratio to the floor and its paired test
    against the best DPS."""
    if not candidates:
        nan = float("nan")
        return {
            "best": None,
            "best_over_floor": nan,
            "best_over_floor_per_problem_median": nan,
            "wins_over_dps": 0,
            "p_value_vs_dps": nan,
        }
    best = min(candidates, key=lambda n: stats[n]["sw"])
    ratios = [r["methods"][best]["sw"] / r["methods"]["floor"]["sw"] for r in rows]
    if best_dps is None:
        wins, p_value = 0, float("nan")
    else:
        wins = sum(r["methods"][best]["sw"] < r["methods"][best_dps]["sw"] for r in rows)
        p_value = _wilcoxon(stats[best]["sw_values"], stats[best_dps]["sw_values"])
    return {
        "best": best,
        "best_over_floor": stats[best]["sw"] / stats["floor"]["sw"],
        "best_over_floor_per_problem_median": statistics.median(ratios),
        "wins_over_dps": wins,
        "p_value_vs_dps": p_value,
    }


def summarize(results: list[dict], budget: int = 100000) -> list[dict]:
    """One summary per (d, d_y): per method the median and quartiles of SW, the median max-SW,
    mode-weight error, seconds, calls and evaluations; the best DPS λ; under each reading of the
    budget (``readings``: ``"calls"``, every sampler with at most ``budget`` network calls per
    problem; ``"evaluations"``, those with at most ``budget`` per-datum evaluations on every
    problem; ``"evaluations with setup"``, the same counting the variance estimate of ``-av``
    rows on every problem too) the best sampler and its paired test against DPS.  The top-level ``best`` … keys
    are the ``"calls"`` reading's."""
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
                "max_calls": max(vals["network_calls"]),
                "max_evaluations": max(vals["evaluations"]),
                "setup_evaluations": statistics.median(vals.get("setup_evaluations", [0])),
                "sw_values": vals["sw"],
            }
        dps_names = [n for n in names if n.startswith("dps@")]
        best_dps = min(dps_names, key=lambda n: stats[n]["sw"]) if dps_names else None
        compared = samplers(names)
        readings = {
            "calls": _best(stats, rows, [n for n in compared if stats[n]["max_calls"] <= budget], best_dps),
            "evaluations": _best(
                stats, rows, [n for n in compared if stats[n]["max_evaluations"] <= budget], best_dps
            ),
            "evaluations with setup": _best(
                stats,
                rows,
                [
                    n
                    for n in compared
                    if stats[n]["max_evaluations"] + stats[n]["setup_evaluations"] <= budget
                ],
                best_dps,
            ),
        }
        summary.append(
            {
                "dim": d,
                "num_observations": m,
                "num_problems": len(rows),
                "methods": stats,
                "samplers": compared,
                "best_dps": best_dps,
                "budget": budget,
                "readings": readings,
                **readings["calls"],
            }
        )
    return summary


def _budget(x: float) -> str:
    """1e5 for 100000."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _fmt(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.0f}"


def markdown_table(summary: list[dict]) -> str:
    """The results as Markdown: one table per d (rows: d_y × method; the best under the calls
    reading in bold, under the evaluations reading marked †), then the best per cell under each
    reading."""
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
            for name in ("floor", "ceiling", *s["samplers"], *([s["best_dps"]] if s["best_dps"] else [])):
                st = s["methods"][name]
                label = {"floor": "exact (floor)", "ceiling": "prior (ceiling)"}.get(name, name)
                if name == s["readings"]["evaluations"]["best"]:
                    label = f"{label} †"
                if name == s["readings"]["calls"]["best"]:
                    label = f"**{label}**"
                timing = "" if name in _NOT_SAMPLERS else f"{st['seconds']:.2f}"
                calls = "" if name in _NOT_SAMPLERS else f"{st['network_calls']:.0f}"
                evals = "" if name in _NOT_SAMPLERS else f"{st['evaluations']:.0f}"
                lines.append(
                    f"| {s['num_observations']} | {label} | {_fmt(st['sw'])} [{_fmt(st['sw_q1'])}, "
                    f"{_fmt(st['sw_q3'])}] | {_fmt(st['max_sw'])} | {_fmt(st['mode_error'])} | {timing} | "
                    f"{calls} | {evals} |"
                )
        lines.append("")
    lines += [
        "| d | d_y | budget reading | best | best / floor (medians) | median of per-problem ratios | "
        "within 1.5× | beats best DPS on | Wilcoxon p vs DPS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        for reading in READINGS:
            b = s["readings"][reading]
            ok = "yes" if b["best_over_floor"] <= 1.5 else "no"
            lines.append(
                f"| {s['dim']} | {s['num_observations']} | {reading} ≤ {_budget(s['budget'])} | {b['best']} | "
                f"{b['best_over_floor']:.2f} | {b['best_over_floor_per_problem_median']:.2f} | {ok} | "
                f"{b['wins_over_dps']}/{s['num_problems']} ({s['best_dps']}) | {b['p_value_vs_dps']:.2g} |"
            )
    return "\n".join(lines) + "\n"


def goal_lines(summary: list[dict], reading: str = "calls") -> list[str]:
    """The goal, cell by cell, from the numbers, under one reading of the budget: the best
    sampler within 1.5× of the floor (ratio of medians) and better than the best DPS at the 1%
    level (paired Wilcoxon) on most problems; then the count of cells that meet it."""
    lines = []
    met = 0
    for s in summary:
        b = s["readings"][reading]
        near = b["best_over_floor"] <= 1.5
        better = b["p_value_vs_dps"] < 0.01 and b["wins_over_dps"] > s["num_problems"] / 2
        met += near and better
        lines.append(
            f"* d = {s['dim']}, d_y = {s['num_observations']}: {b['best']} at "
            f"{b['best_over_floor']:.2f}× the floor ({'within' if near else 'not within'} 1.5×); "
            f"{'significantly better' if better else 'not significantly better'} than the best DPS "
            f"({s['best_dps']}; better on {b['wins_over_dps']}/{s['num_problems']} problems, "
            f"Wilcoxon p = {b['p_value_vs_dps']:.2g})."
        )
    lines.append(f"* Met in {met} of {len(summary)} cells.")
    return lines


def spread_diagnostic(results: list[dict], method: str) -> dict:
    """Whether the spread of a multi-run method's evidence estimates (``log_evidence_spread``)
    tells its bad problems from its good ones *within* a cell (d and d_y fixed, so the spread is
    not confounded with them): per cell the Spearman rank correlation between the spread and
    SW / floor over the problems; returns the per-cell values, their median and the number of
    cells where it is positive."""
    from scipy.stats import spearmanr

    cells: dict[tuple[int, int], list[dict]] = {}
    for row in results:
        cells.setdefault((row["dim"], row["num_observations"]), []).append(row)
    per_cell = {}
    for key, rows in sorted(cells.items()):
        spread = [r["methods"][method]["log_evidence_spread"] for r in rows]
        ratio = [r["methods"][method]["sw"] / r["methods"]["floor"]["sw"] for r in rows]
        if len(rows) > 2 and len(set(spread)) > 1:
            per_cell[f"{key[0]}/{key[1]}"] = float(spearmanr(spread, ratio).statistic)
    values = [v for v in per_cell.values() if not math.isnan(v)]
    return {
        "per_cell": per_cell,
        "median": statistics.median(values) if values else float("nan"),
        "positive": sum(v > 0 for v in values),
        "cells": len(values),
    }


def _command(argv) -> str:
    return ("python -m pyro_diffusion.experiments.posterior_study " + " ".join(argv or [])).strip()


def _addition_lines(summary: list[dict], additions: list[dict]) -> list[str]:
    """Where rows were added to the saved problems by later runs (``--merge``): the rows, the
    cells, the command, the time and the variance estimate's cost of their ``-av`` rows."""
    lines = []
    for record in additions:
        names = record["methods"]
        cells = " and ".join(f"d = {d}, d_y = {m}" for d, m in record["cells"])
        every = {(s["dim"], s["num_observations"]) for s in summary}
        if len(record["cells"]) > 2 and {tuple(c) for c in record["cells"]} == every:
            cells = "every cell"
        costs = []
        for name in names:
            runs = [s["methods"][name] for s in summary if name in s["methods"]]
            if "-av" in name.split("@")[0] and runs:
                setup = max(r["setup_evaluations"] for r in runs)
                total = max(r["max_evaluations"] for r in runs) + setup
                costs.append(f"`{name}` {setup:.0f} ({total:.0f} per problem if counted)")
        cost = (
            "  Their `-av` rows estimate the variances on their own K-level grid from the same "
            f"{record.get('variance_samples', '')} prior draws (M·K per-datum evaluations once per model "
            "and grid, not counted per observation): " + "; ".join(costs) + "."
            if costs
            else ""
        )
        tempered = (
            "; `-tT`: `twisted_smc(tempering=T)`, the twist at level k to the power λ_k, with `-tP` the "
            "schedule λ_k = ((K − k + 1)/K)^P (`-t0`: no tempering, the untempered sampler in its own "
            "random stream), `-tlinear` P = 1, `-tadaptiveF` λ_k by bisection keeping the conditional "
            "ESS ≥ F·N"
            if any(re.search(r"-t[0-9la]", n) for n in names)
            else ""
        )
        if any(re.search(r"-an|-proj|-gauss", n) for n in names):
            tempered += (
                '; `-an`: `twist_variance="analytic"` (per coordinate), `-proj`: '
                '`twist_covariance="projected"`, `-gauss`: `proposal="gaussian"`'
            )
        lines += [
            f"Rows {', '.join(f'`{n}`' for n in names)} (`@NxK`: N particles on a K-level grid, N·K "
            f"per-datum evaluations per problem{tempered}) were added on {cells} by",
            "",
            f"    {_command(record['argv'])}",
            "",
            f"({record['seconds'] / 60:.1f} min), on the same problems, reference draws and floor as the "
            f"run above (checked when merging; the samplers' random streams are their own).{cost}",
            "",
        ]
    return lines


def docs_section(
    config: StudyConfig,
    summary: list[dict],
    seconds: float,
    argv,
    results: list[dict] | None = None,
    additions: list[dict] | None = None,
) -> str:
    """The docs section: the command, the settings, the tables and the goal per cell under
    both readings of the budget; ``additions``: the records of rows merged in later."""
    command = _command(argv)
    small = config.small_particles
    setups = [
        s["methods"][f"tds-av@{small}"]["setup_evaluations"]
        for s in summary
        if f"tds-av@{small}" in s["methods"]
    ]
    setup = statistics.median(setups) if setups else float("nan")
    budget = _budget(config.evaluation_budget)
    levels = f"K = {config.num_steps} levels for every method" + (" but the `@NxK` rows" if additions else "")
    return "\n".join(
        [
            SECTION_TITLE,
            "",
            "Written by",
            "",
            f"    {command}",
            "",
            f"({seconds / 60:.1f} min on one CPU thread).  Settings: {config.num_problems} problems per "
            f"(d, d_y), σ_y log-evenly from {config.noise_range[0]} to {config.noise_range[1]}, "
            f"{config.num_components} components, {levels}, "
            f"twisted SMC with {config.num_particles} and {small} particles, MCGdiff {config.num_runs} runs × "
            f"{config.mcgdiff_particles // config.num_runs} and {config.num_runs} × {small // config.num_runs}, "
            f"{config.num_draws} draws per method against {config.num_reference} exact draws "
            f"({config.draw_scheme} resampling of weighted particles), DPS λ ∈ {list(config.dps_grid)} "
            f"(step per unit of γ).  Rows `-av`: per-level reverse variances from `analytic_variances` "
            f"({'diagonal' if config.variance_diagonal else 'isotropic'}, {config.variance_samples} prior "
            f"draws standing in for training data, {setup:.0f} per-datum evaluations once per model, not "
            f"counted per observation), twist variance {'analytic' if config.analytic_twist else 'ΠGDM'}.  "
            f"Best under the calls reading (≤ {budget} network calls per problem) in bold, under the "
            f"evaluations reading (≤ {budget} per-datum evaluations on every problem) marked †.",
            "",
            *_addition_lines(summary, additions or []),
            markdown_table(summary),
            "Goal per cell, reading the budget as network calls (best sampler within 1.5× of the floor; "
            "better than the best DPS at p < 0.01, paired over problems):",
            "",
            *goal_lines(summary, "calls"),
            "",
            f"Goal per cell, reading the budget as per-datum evaluations (≤ {budget} on every problem):",
            "",
            *goal_lines(summary, "evaluations"),
            "",
            f"Goal per cell, counting the variance estimate of the `-av` rows on every problem too (≤ {budget} "
            "per-datum evaluations in all):",
            "",
            *goal_lines(summary, "evaluations with setup"),
            "",
            *_spread_lines(config, results),
        ]
    )


def _spread_lines(config: StudyConfig, results: list[dict] | None) -> list[str]:
    """The within-cell rank correlation of MCGdiff's evidence spread with its error."""
    if not results or config.num_runs < 2:
        return []
    lines = [
        f"Independent runs as a diagnostic: Spearman correlation, within each (d, d_y) cell, between "
        f"the spread (sd) of the {config.num_runs} runs' log-evidence estimates and SW / floor:",
        "",
    ]
    for method in ("mcgdiff", f"mcgdiff-av@{config.small_particles}"):
        if method not in results[0]["methods"]:
            continue
        diag = spread_diagnostic(results, method)
        cells = ", ".join(f"{k}: {v:.2f}" for k, v in diag["per_cell"].items())
        lines.append(
            f"* {method}: median {diag['median']:.2f}, positive in {diag['positive']} of {diag['cells']} "
            f"cells ({cells})."
        )
    return lines + [""]


#: the first line of the section's hand-written notes, which a rewrite keeps
NOTES_START = "What the run says"


def replace_section(path: Path, title: str, section: str, notes_start: str | None = None) -> None:
    """Replace the section of the Markdown file ``path`` that starts at the line ``title``
    (to the next ``## `` heading, or the end) by ``section``, or append it; the rest of the
    file is left as it is.  With ``notes_start``, the old section's hand-written notes (from a
    line starting with it to the section's end) are kept after the new text."""
    text = path.read_text()
    if title in text:
        start = text.index(title)
        following = text.find("\n## ", start + len(title))
        rest = "" if following < 0 else text[following + 1 :]
        old = text[start : len(text) if following < 0 else following + 1]
        notes = -1 if notes_start is None else old.find("\n" + notes_start)
        if notes >= 0 and notes_start not in section:
            section = section.rstrip("\n") + "\n\n" + old[notes + 1 :].strip("\n") + "\n"
        text = (
            text[:start].rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
        )
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def write_docs(path: Path, section: str) -> None:
    """Replace the study's section of ``docs/prior.md`` (:func:`replace_section`), keeping
    its hand-written notes (from a line starting with ``NOTES_START``), which follow the new
    text."""
    replace_section(path, SECTION_TITLE, section, NOTES_START)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/posterior", help="output folder (the only place written)")
    parser.add_argument("--quick", action="store_true", help="d = 8, two problems per cell, K = 20")
    parser.add_argument("--docs", action="store_true", help="also write section 8 of docs/prior.md")
    parser.add_argument(
        "--docs-from-results",
        action="store_true",
        help="write the docs section from OUT/results.json of an earlier run, without running",
    )
    parser.add_argument("--num-problems", type=int, default=None)
    parser.add_argument("--num-steps", type=int, default=None)
    parser.add_argument("--num-particles", type=int, default=None)
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument(
        "--cells", nargs="+", default=None, metavar="D:DY", help="only these (d, d_y) cells, e.g. 16:8 64:32"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="only these rows (tds[-av[L]][-an][-proj][-gauss][-tT][@N[xK]], T linear|adaptive|exponent; mcgdiff[-av][@N[xK]], "
        "ddrm, replacement, dps@λ)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add the rows run to the same problems of OUT/results.json instead of replacing it",
    )
    parser.add_argument(
        "--stream",
        type=int,
        default=0,
        help="the samplers' random stream (0: the documented run's); the problems, reference and floor stay",
    )
    parser.add_argument("--no-progress", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    docs = Path(__file__).resolve().parents[2] / "docs" / "prior.md"
    if args.docs_from_results:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        config = StudyConfig(**saved["config"])
        summary = summarize(saved["problems"], config.evaluation_budget)
        command = saved.get("argv", ["--out", args.out])
        section = docs_section(
            config, summary, saved["seconds"], command, saved["problems"], saved.get("additions")
        )
        write_docs(docs, section)
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
            small_particles=256,
            variance_samples=200,
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
    if args.stream < 0:
        parser.error(f"--stream: expected an int >= 0, got {args.stream}")
    config.stream = args.stream
    if args.cells:
        config.cells = [parse_cell(c) for c in args.cells]
    if args.methods:
        for name in args.methods:
            parse_method(name, config)
        config.methods = list(dict.fromkeys(args.methods))
    out = Path(args.out)
    saved_path = out / "results.json"
    if args.merge:
        if not saved_path.exists():
            raise ValueError(f"merge: no saved run at {saved_path}")
        if args.docs:
            raise ValueError("merge: write the docs afterwards with --docs-from-results")
        saved = json.loads(saved_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_study(config, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    if args.merge:
        record = {
            "argv": argv,
            "seconds": seconds,
            "methods": [n for n in results[0]["methods"] if n not in _NOT_SAMPLERS] if results else [],
            "cells": [list(c) for c in config.cell_list()],
            "variance_samples": config.variance_samples,
        }
        merge_results(saved, config, results, record)
        saved_path.write_text(json.dumps(saved, indent=1))
        table = markdown_table(saved["summary"])
        (out / "table.md").write_text(table)
        print(table)
        print(f"{len(results)} problems in {seconds:.0f} s; merged into {saved_path}")
        return {"summary": saved["summary"], "seconds": seconds}
    summary = summarize(results, config.evaluation_budget)
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
        write_docs(docs, docs_section(config, summary, seconds, argv, results))
    return {"summary": summary, "seconds": seconds}


if __name__ == "__main__":
    main()
