"""Conditioning the 2-D mixture model on a linear observation, validated against the truth.

For each scenario (inpainting: observe the first coordinate, at x_1 = 1 and in the tail at
x_1 = 2; denoising: observe both with noise) this draws from the exact data conditional
p(x_0 | y) (closed form, a Gaussian mixture), and from every method of
``pyro_diffusion.inference`` run on the trained model: twisted SMC, NUTS over the whole
chain, SVI with the forward chain as guide, replacement and DPS.  It reports the energy
distance of each method's samples to the exact conditional (with a standard error), its
cost, NUTS's R-hat, and the model's own unconditional error, and writes the table
(``prior_validation.md`` and ``.json``) and figures (``figures/``) under ``--out`` (default
``runs/inpainting_2d``); only ``--docs`` writes them to ``docs/`` instead (how
``docs/prior_validation.md`` was made).  The trained model is cached under ``--cache``
(default ``runs/inference``; ``--quick``: a 300-step model under ``--out``/models).

    python examples/inpainting_2d.py --nuts-draws 40 --nuts-warmup 40   # every row (NUTS short)
    python examples/inpainting_2d.py --scan     # the scan of inpainting observations (cheap methods)
    python examples/inpainting_2d.py --nuts-only --scenarios denoising --nuts-draws 1000 --nuts-warmup 300
        # rerun only NUTS (independent chains) and update its row in the table
    python examples/inpainting_2d.py --quick    # a smoke run with tiny sizes (about 20 s)
    python examples/inpainting_2d.py --prior learned --quick
        # the same with a continuous-time model with a learned schedule as the prior

``--prior ddpm`` (default) is the T-step DDPM of ``docs/prior.md``; ``--prior learned`` a
continuous-time model whose noise schedule γ(t) is learned (VDM), trained on the
continuous-time bound and run by every method on a grid of ``--num-steps`` levels of its
schedule (both trained once and cached under ``runs/inference``).  ``--grid K`` runs every
method on a K-level grid instead of the model's own (for the DDPM a respaced sub-grid).

NUTS runs ``--nuts-chains`` independent chains one after another (chain c seeded with
seed + c), so that R-hat compares independent Markov chains; ``--nuts-vectorize`` runs them
as copies in one plate instead (cheaper, but the copies share step size and mass matrix).
Its potential is JIT-compiled unless ``--no-nuts-jit`` (same draws, about half the time).
"""

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import arviz as az
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pyro_diffusion.data import GaussianMixture2D, load_dataset
from pyro_diffusion.inference import arviz as pd_arviz
from pyro_diffusion.inference.exact import (
    energy_distance,
    energy_distance_se,
    mixture_conditional,
    mixture_evidence,
)
from pyro_diffusion.inference.heuristics import dps_sample, replacement_sample
from pyro_diffusion.inference.nuts import nuts_conditional
from pyro_diffusion.inference.observations import LinearObservation
from pyro_diffusion.inference.pretrained import load_or_train
from pyro_diffusion.inference.smc import twisted_smc
from pyro_diffusion.inference.svi import svi_conditional

FIRST = torch.tensor([True, False])
SCENARIOS = {
    "inpainting": (LinearObservation.mask(FIRST, noise_scale=0.2), torch.tensor([1.0])),
    "denoising": (LinearObservation.denoising((2,), noise_scale=0.5), torch.tensor([0.9, 0.4])),
    # the slice x_1 = 2 lies beyond the component at (1.5, 0): its weight against the
    # components at (1.06, ±1.06) depends sharply on y, which the heuristics get wrong
    "inpainting_tail": (LinearObservation.mask(FIRST, noise_scale=0.1), torch.tensor([2.0])),
}
# --scan: the inpainting observations tried with the cheap methods (SMC, replacement, DPS)
SCAN_VALUES = (0.0, 0.5, 1.0, 1.3, 2.0)
SCAN_NOISES = (0.05, 0.1, 0.2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and a 300-step model cached under --out/models: about 20 s on an idle 2-core "
        "machine (never writes to docs/)",
    )
    parser.add_argument(
        "--prior",
        choices=("ddpm", "learned"),
        default="ddpm",
        help="ddpm: the T-step DDPM (default); learned: a continuous-time model with a learned schedule",
    )
    parser.add_argument(
        "--num-steps", type=int, default=20, help="T of the DDPM; the learned model's default grid size"
    )
    parser.add_argument(
        "--grid", type=int, default=None, help="run every method on a K-level grid (default: the model's own)"
    )
    parser.add_argument("--out", default="runs/inpainting_2d", help="where the table and figures go")
    parser.add_argument(
        "--docs",
        "--write-docs",
        dest="write_docs",
        action="store_true",
        help="write the table and figures to docs/ (docs/prior_validation.md, docs/figures/) instead of --out",
    )
    parser.add_argument(
        "--cache", default="runs/inference", help="where the trained model is cached (default runs/inference)"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="optimizer steps of the model (default 4000; --quick 300)",
    )
    parser.add_argument("--samples", type=int, default=2000, help="draws per method")
    parser.add_argument("--particles", type=int, default=20000, help="SMC particles")
    parser.add_argument("--nuts-draws", type=int, default=150, help="NUTS draws per chain")
    parser.add_argument(
        "--nuts-warmup", type=int, default=None, help="NUTS warm-up per chain (default: draws)"
    )
    parser.add_argument("--nuts-chains", type=int, default=4)
    parser.add_argument("--nuts-tree-depth", type=int, default=6)
    parser.add_argument("--nuts-full-mass", action="store_true", help="adapt a dense mass matrix")
    parser.add_argument("--nuts-target-accept", type=float, default=0.8)
    parser.add_argument(
        "--no-nuts-jit", dest="nuts_jit", action="store_false", help="do not JIT-compile NUTS's potential"
    )
    parser.add_argument(
        "--nuts-vectorize", action="store_true", help="chains as copies in one NUTS run (not independent)"
    )
    parser.add_argument(
        "--nuts-only",
        action="store_true",
        help="run only NUTS and replace its rows (and figures) in an existing prior_validation.json "
        "(under --out, or docs/ with --write-docs)",
    )
    parser.add_argument(
        "--scan",
        action="store_true",
        help="only the scan of inpainting observations with the cheap methods (its section of the docs)",
    )
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--dps-steps", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--svi-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (default: on)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.particles, args.nuts_draws, args.svi_steps = 200, 200, 10, 20
        args.nuts_warmup = 10
        args.dps_steps = [0.03]
        args.nuts_chains, args.nuts_tree_depth = 2, 4
        if args.scenarios == list(SCENARIOS):  # one scenario unless asked for more
            args.scenarios = ["inpainting"]
        args.train_steps = args.train_steps or 300
        args.cache = str(Path(args.out) / "models")
    if args.nuts_warmup is None:
        args.nuts_warmup = args.nuts_draws
    if args.write_docs and args.quick:
        parser.error("--docs: a --quick run is a smoke test; its numbers do not belong in docs/")
    out_dir = Path("docs") if args.write_docs else Path(args.out)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    schedule = "learned" if args.prior == "learned" else "linear"
    diffusion = load_or_train(
        "gmm",
        "elbo",
        num_steps=args.num_steps,
        schedule=schedule,
        train_steps=args.train_steps,
        root=args.cache,
        progress=args.progress,
    )
    mixture = GaussianMixture2D()
    data = load_dataset("gmm")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    # the model's own error: its unconditional samples against the data
    model_samples = diffusion.sample(args.samples, num_steps=args.grid)
    reference = data.test[: 2 * args.samples]
    model_error = (energy_distance(model_samples, reference), energy_distance_se(model_samples, reference))
    floor = data.train[: args.samples]
    floor_error = (energy_distance(floor, reference), energy_distance_se(floor, reference))

    results = {"model_unconditional": model_error, "data_vs_data": floor_error, "scenarios": {}}
    if args.scan:
        scan = run_scan(args, diffusion, mixture, generator)
        table = out_dir / "prior_validation.json"
        results = json.loads(table.read_text()) if table.exists() else results  # re-read: others may write
        results["scan"] = scan
        (out_dir / "prior_validation.json").write_text(json.dumps(results, indent=1))
        write_table(results, out_dir / "prior_validation.md")
        print(f"wrote {out_dir / 'prior_validation.md'}")
        return
    if args.nuts_only:  # keep every other number of the last full run
        if not (out_dir / "prior_validation.json").exists():
            parser.error(
                f"--nuts-only: no {out_dir / 'prior_validation.json'} to patch; run the full table first"
            )
        results = json.loads((out_dir / "prior_validation.json").read_text())
    elif (out_dir / "prior_validation.json").exists():  # keep the last scan
        scan = json.loads((out_dir / "prior_validation.json").read_text()).get("scan")
        if scan is not None:
            results["scan"] = scan
    nuts_rows = {}
    for name in args.scenarios:
        observation, y = SCENARIOS[name]
        print(f"== {name}: {observation}, y = {y.tolist()}", flush=True)
        exact = mixture_conditional(mixture, observation, y).sample((2 * args.samples,)).float()
        rows = {}

        def record(method, samples, seconds, calls, exact=exact, rows=rows, **extra):
            distance = energy_distance(samples, exact)
            se = energy_distance_se(samples, exact)
            rows[method] = {"energy": distance, "se": se, "seconds": seconds, "network_calls": calls, **extra}
            print(
                f"{method:>16}: ED {distance:.4f} ± {se:.4f}  {seconds:7.1f} s  {calls} calls {extra}",
                flush=True,
            )
            return samples

        drawn = {}
        if args.nuts_only:
            nuts_row = run_nuts(args, diffusion, observation, y, fig_dir, name)
            samples = nuts_row.pop("samples")
            nuts_row = {
                "energy": energy_distance(samples, exact),
                "se": energy_distance_se(samples, exact),
                **nuts_row,
            }
            nuts_rows[name] = nuts_row
            print(f"NUTS: {nuts_row}", flush=True)
            continue
        torch.manual_seed(args.seed)
        result = twisted_smc(
            diffusion,
            observation,
            y,
            num_particles=args.particles,
            num_steps=args.grid,
            seed=args.seed,
            progress=args.progress,
        )
        drawn["twisted SMC"] = record(
            "twisted SMC",
            result.sample(args.samples, generator=generator),
            result.seconds,
            result.network_calls,
            min_ess=float(result.diagnostics["ess"].min()),
            log_evidence=result.diagnostics["log_evidence"],
            exact_data_log_evidence=mixture_evidence(mixture, observation, y),
        )
        smc_ess = result.diagnostics["ess"]

        nuts_row = run_nuts(args, diffusion, observation, y, fig_dir, name)
        samples = nuts_row.pop("samples")
        drawn["NUTS"] = record(
            "NUTS", samples, nuts_row.pop("seconds"), nuts_row.pop("network_calls"), **nuts_row
        )

        svi = svi_conditional(
            diffusion,
            observation,
            y,
            num_iterations=args.svi_steps,
            num_steps=args.grid,
            seed=args.seed,
            progress=args.progress,
        )
        drawn["SVI (mean-field x_0)"] = record(
            "SVI (mean-field x_0)",
            svi.sample(args.samples, generator=generator),
            svi.seconds,
            svi.network_calls,
        )
        if observation.observed_index is not None:
            torch.manual_seed(args.seed)
            out = replacement_sample(diffusion, observation, y, args.samples, num_steps=args.grid)
            drawn["replacement"] = record("replacement", out.draws, out.seconds, out.network_calls)
        for step in args.dps_steps:
            torch.manual_seed(args.seed)
            out = dps_sample(diffusion, observation, y, args.samples, step_size=step, num_steps=args.grid)
            drawn[f"DPS ζ={step:g}"] = record(f"DPS ζ={step:g}", out.draws, out.seconds, out.network_calls)
        results["scenarios"][name] = {"observation": repr(observation), "y": y.tolist(), "methods": rows}

        # figure: samples of every method over the exact conditional
        fig, axes = plt.subplots(
            1, len(drawn) + 1, figsize=(2.6 * (len(drawn) + 1), 2.8), sharex=True, sharey=True
        )
        panels = [("exact p(x_0 | y)", exact[: args.samples])] + list(drawn.items())
        for ax, (title, samples) in zip(axes, panels):
            ax.scatter(*samples[: args.samples].T, s=2, alpha=0.3)
            ax.set_title(title, fontsize=8)
            ax.set_xlim(-2.5, 2.5)
            ax.set_ylim(-2.5, 2.5)
        fig.tight_layout()
        fig.savefig(fig_dir / f"prior_samples_{name}.png", dpi=80)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(4, 2.5))
        ax.plot(range(len(smc_ess)), smc_ess)
        ax.set_xlabel("reweighting (0 = x_K, K = x_0)")
        ax.set_ylabel("ESS")
        ax.set_title(f"twisted SMC, K = {args.particles}: {name}", fontsize=8)
        fig.tight_layout()
        fig.savefig(fig_dir / f"prior_smc_ess_{name}.png", dpi=80)
        plt.close(fig)

    finished = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "command": " ".join(["python examples/inpainting_2d.py", *sys.argv[1:]]),
        "args": vars(args),
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, CPU only ({platform.platform()})",
    }
    if args.nuts_only:  # re-read the table (another run may have written it meanwhile) and patch it
        results = json.loads((out_dir / "prior_validation.json").read_text())
        for name, nuts_row in nuts_rows.items():
            results["scenarios"][name]["methods"]["NUTS"] = nuts_row
        results.setdefault("nuts_meta", {}).update({name: meta for name in args.scenarios})
    else:
        results["meta"] = meta
        results.pop("nuts_meta", None)
    (out_dir / "prior_validation.json").write_text(json.dumps(results, indent=1))
    write_table(results, out_dir / "prior_validation.md")
    print(f"wrote {out_dir / 'prior_validation.md'}")


def run_nuts(args, diffusion, observation, y, fig_dir, name):
    """NUTS on one scenario; its table row with ``samples`` (flattened draws) and ``x0`` added."""
    nuts = nuts_conditional(
        diffusion,
        observation,
        y,
        num_samples=args.nuts_draws,
        warmup_steps=args.nuts_warmup,
        num_chains=args.nuts_chains,
        num_steps=args.grid,
        max_tree_depth=args.nuts_tree_depth,
        full_mass=args.nuts_full_mass,
        target_accept_prob=args.nuts_target_accept,
        jit_compile=args.nuts_jit,
        vectorize_chains=args.nuts_vectorize,
        seed=args.seed,
        progress=args.progress,
    )
    idata = pd_arviz.from_nuts(nuts, include_noise=True)
    summary = az.summary(idata, round_to="none")  # x_0 and all 2(K + 1) noise coordinates
    x0_rows = summary.index.str.startswith("x0")
    print(summary.sort_values("r_hat").tail(5), flush=True)
    if not args.quick:
        az.plot_trace(idata, var_names=["x0"])
        plt.savefig(fig_dir / f"prior_nuts_trace_{name}.png", dpi=80)
        plt.close("all")
    stats = nuts.diagnostics["sample_stats"]
    return {
        "samples": nuts.draws,
        "seconds": nuts.seconds,
        "network_calls": nuts.network_calls,
        "max_rhat_x0": float(summary["r_hat"][x0_rows].max()),
        "min_ess_bulk_x0": float(summary["ess_bulk"][x0_rows].min()),
        "max_rhat_all_sites": float(summary["r_hat"].max()),
        "min_ess_bulk_all_sites": float(summary["ess_bulk"].min()),
        "min_ess_tail_all_sites": float(summary["ess_tail"].min()),
        # vectorized copies share one trajectory, so their divergences are counted once
        "divergences": int(stats["diverging"][: 1 if args.nuts_vectorize else None].sum()),
        "chains": args.nuts_chains,
        "draws": args.nuts_draws,
        "warmup": args.nuts_warmup,
        "independent_chains": not args.nuts_vectorize,
        "max_tree_depth": args.nuts_tree_depth,
        "full_mass": args.nuts_full_mass,
        "target_accept_prob": args.nuts_target_accept,
        "jit_compile": args.nuts_jit,
        "mean_tree_size": float(stats["tree_size"].float().mean()),
    }


def run_scan(args, diffusion, mixture, generator):
    """Inpainting x_1 = y with noise σ_y over a grid: SMC (K = 2000 and --particles),
    replacement and DPS against the exact conditional; rows of the scan table."""
    rows = []
    for value in SCAN_VALUES:
        for noise in SCAN_NOISES:
            observation, y = LinearObservation.mask(FIRST, noise_scale=noise), torch.tensor([value])
            exact = mixture_conditional(mixture, observation, y).sample((2 * args.samples,)).float()
            row = {"y": value, "noise": noise, "methods": {}}

            def record(method, samples, exact=exact, row=row):
                row["methods"][method] = (energy_distance(samples, exact), energy_distance_se(samples, exact))

            for particles in sorted({2000, args.particles}):
                result = twisted_smc(
                    diffusion, observation, y, num_particles=particles, num_steps=args.grid, seed=args.seed
                )
                record(f"SMC K={particles}", result.sample(args.samples, generator=generator))
            torch.manual_seed(args.seed)
            record(
                "replacement",
                replacement_sample(diffusion, observation, y, args.samples, num_steps=args.grid).draws,
            )
            for step in args.dps_steps:
                torch.manual_seed(args.seed)
                draws = dps_sample(
                    diffusion, observation, y, args.samples, step_size=step, num_steps=args.grid
                ).draws
                record(f"DPS ζ={step:g}", draws)
            print(f"scan y = {value}, σ_y = {noise}: {row['methods']}", flush=True)
            rows.append(row)
    return {
        "command": " ".join(["python examples/inpainting_2d.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "particles": args.particles,
        "samples": args.samples,
        "rows": rows,
    }


def scan_table(scan):
    """The scan as markdown: each method's energy distance, and the z-score of the best
    heuristic's excess over SMC with --particles (difference / combined standard error)."""
    methods = list(scan["rows"][0]["methods"])
    smc = f"SMC K={scan['particles']}"
    lines = [
        "## Scan: inpainting x_1 = y with noise σ_y, cheap methods only",
        "",
        f"`{scan['command']}` ({scan['date']}): every inpainting observation tried while looking for "
        "one that separates the methods, all reported.  Energy distance to the exact conditional "
        f"({scan['samples']} draws per method, ± standard error); the last column is (best heuristic − "
        f"{smc}) / √(se² + se²), the heuristic being the best of replacement and the DPS grid.",
        "",
        "| y | σ_y | " + " | ".join(methods) + " | z (best heuristic vs SMC) |",
        "|---|---|" + "---|" * (len(methods) + 1),
    ]
    for row in scan["rows"]:
        values = row["methods"]
        heuristics = {k: v for k, v in values.items() if not k.startswith("SMC")}
        best = min(heuristics, key=lambda k: heuristics[k][0])
        z = (heuristics[best][0] - values[smc][0]) / (heuristics[best][1] ** 2 + values[smc][1] ** 2) ** 0.5
        cells = [f"{v[0]:.4f} ± {v[1]:.4f}" for v in values.values()]
        lines.append(f"| {row['y']:g} | {row['noise']:g} | " + " | ".join(cells) + f" | {z:.1f} ({best}) |")
    return lines


def model_line(a) -> str:
    """The table's description of the prior (runs from before ``--prior`` existed used the DDPM)."""
    grid = a.get("grid")
    if a.get("prior", "ddpm") == "learned":
        line = (
            "Model: the 2-D mixture model in continuous time with a learned noise schedule, trained with "
            f"the continuous-time ELBO, run on a grid of {grid or a['num_steps']} levels."
        )
    else:
        line = f"Model: the 2-D mixture model trained with the step-subsampled ELBO, T = {a['num_steps']}."
        if grid is not None:
            line += f" Every method ran on a respaced {grid}-level sub-grid."
    return line


def write_table(results, path):
    lines = ["# Conditioning the 2-D mixture model: validation table", ""]
    if "meta" in results:  # (a --scan into a fresh --out has no full run yet)
        meta = results["meta"]
        lines += [
            f"Generated by `{meta['command']}` ({meta['started']} to {meta['finished']}, {meta['machine']}).",
            model_line(meta["args"]),
        ]
    lines += [
        "Energy distance (squared, U-statistic) of each method's samples to draws of the exact data",
        "conditional p(x_0 | y); ± a standard error from 10 disjoint splits.  Lower is better.",
        "",
        f"The model's own error, its unconditional samples against data: "
        f"{results['model_unconditional'][0]:.4f} ± {results['model_unconditional'][1]:.4f} "
        f"(data against data: {results['data_vs_data'][0]:.4f} ± {results['data_vs_data'][1]:.4f}).",
        "",
    ]
    for name, nuts_meta in results.get("nuts_meta", {}).items():
        lines += [
            f"The NUTS row of {name} was rerun alone by `{nuts_meta['command']}` "
            f"({nuts_meta['started']} to {nuts_meta['finished']}, {nuts_meta['machine']}); its energy distance "
            "is against fresh draws of the exact conditional; the NUTS panel of its samples figure is "
            "from the full run.",
            "",
        ]
    for name, scenario in results.get("scenarios", {}).items():
        lines += [
            f"## {name}: {scenario['observation']}, y = {scenario['y']}",
            "",
            "| method | energy distance | seconds | network calls | notes |",
            "|---|---|---|---|---|",
        ]
        for method, row in scenario["methods"].items():
            notes = []
            if "min_ess_tail_all_sites" in row:
                kind = "independent" if row["independent_chains"] else "vectorized"
                notes.append(
                    f"{row['chains']} {kind} chains × {row['draws']} draws ({row['warmup']} warm-up); "
                    f"R-hat max {row['max_rhat_all_sites']:.4f} over all sites ({row['max_rhat_x0']:.4f} on x_0); "
                    f"ESS min bulk {row['min_ess_bulk_all_sites']:.0f}, tail {row['min_ess_tail_all_sites']:.0f}; "
                    f"{row['divergences']} divergence{'' if row['divergences'] == 1 else 's'}"
                )
                if "mean_tree_size" in row:
                    notes.append(
                        f"target accept {row['target_accept_prob']:g}, max tree depth {row['max_tree_depth']}, "
                        f"{row['mean_tree_size']:.1f} leapfrog steps per draw"
                        f"{', JIT' if row['jit_compile'] else ''}"
                    )
            elif "max_rhat_x0" in row:
                notes.append(
                    f"R-hat max {row['max_rhat_x0']:.3f} (x_0), {row['max_rhat_all_sites']:.3f} (all sites); "
                    f"ESS bulk min {row['min_ess_bulk_x0']:.0f}; {row['divergences']} divergences"
                )
            if "min_ess" in row:
                notes.append(
                    f"min ESS {row['min_ess']:.0f}; log p̂_θ(y) {row['log_evidence']:.3f} "
                    f"(data's exact log p(y) {row['exact_data_log_evidence']:.3f})"
                )
            lines.append(
                f"| {method} | {row['energy']:.4f} ± {row['se']:.4f} | {row['seconds']:.1f} | "
                f"{row['network_calls']} | {'; '.join(notes)} |"
            )
        lines += ["", f"![samples](figures/prior_samples_{name}.png)", ""]
    if "scan" in results:
        lines += scan_table(results["scan"]) + [""]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
