"""Conditioning the 2-D mixture model on a linear observation, validated against the truth.

For each scenario (inpainting: observe the first coordinate; denoising: observe both with
noise) this draws from the exact data conditional p(x_0 | y) (closed form, a Gaussian
mixture), and from every method of ``pyro_diffusion.inference`` run on the trained model:
twisted SMC, NUTS over the whole chain, SVI with the forward chain as guide, replacement and
DPS.  It reports the energy distance of each method's samples to the exact conditional (with
a standard error), its cost, NUTS's R-hat, and the model's own unconditional error, and
writes the table to ``docs/prior_validation.md`` and figures to ``docs/figures/``.

    python examples/inpainting_2d.py            # the docs' table (about 30 min on a busy 2-core CPU)
    python examples/inpainting_2d.py --quick    # a smoke run with tiny sizes (no docs written)
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

SCENARIOS = {
    "inpainting": (LinearObservation.mask(torch.tensor([True, False]), noise_scale=0.2), torch.tensor([1.0])),
    "denoising": (LinearObservation.denoising((2,), noise_scale=0.5), torch.tensor([0.9, 0.4])),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, nothing written to docs/")
    parser.add_argument("--num-steps", type=int, default=20, help="T of the trained model")
    parser.add_argument("--samples", type=int, default=2000, help="draws per method")
    parser.add_argument("--particles", type=int, default=2000, help="SMC particles")
    parser.add_argument("--nuts-draws", type=int, default=150, help="NUTS warm-up and draws per chain")
    parser.add_argument("--nuts-chains", type=int, default=4)
    parser.add_argument("--dps-steps", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--svi-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.particles, args.nuts_draws, args.svi_steps = 200, 200, 10, 20
        args.dps_steps = [0.03]
    out_dir = Path("runs/inpainting_2d") if args.quick else Path("docs")
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    diffusion = load_or_train("gmm", "elbo", num_steps=args.num_steps, progress=args.progress)
    mixture = GaussianMixture2D()
    data = load_dataset("gmm")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    # the model's own error: its unconditional samples against the data
    model_samples = diffusion.sample(args.samples)
    reference = data.test[: 2 * args.samples]
    model_error = (energy_distance(model_samples, reference), energy_distance_se(model_samples, reference))
    floor = data.train[: args.samples]
    floor_error = (energy_distance(floor, reference), energy_distance_se(floor, reference))

    results = {"model_unconditional": model_error, "data_vs_data": floor_error, "scenarios": {}}
    for name, (observation, y) in SCENARIOS.items():
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
        torch.manual_seed(args.seed)
        result = twisted_smc(diffusion, observation, y, num_particles=args.particles, seed=args.seed)
        drawn["twisted SMC"] = record(
            "twisted SMC",
            result.sample(args.samples, generator=generator),
            result.seconds,
            result.network_calls,
            min_ess=float(result.ess.min()),
            log_evidence=result.log_evidence,
            exact_data_log_evidence=mixture_evidence(mixture, observation, y),
        )
        smc_result = result

        nuts = nuts_conditional(
            diffusion,
            observation,
            y,
            num_samples=args.nuts_draws,
            warmup_steps=args.nuts_draws,
            num_chains=args.nuts_chains,
            max_tree_depth=6,
            vectorize_chains=True,
            seed=args.seed,
            progress=args.progress,
        )
        idata = pd_arviz.from_nuts(nuts, include_noise=True)
        summary = az.summary(idata, var_names=["x0"])
        all_rhat = az.rhat(idata)
        max_rhat_all = max(float(all_rhat[v].max()) for v in all_rhat.data_vars)
        print(summary, flush=True)
        drawn["NUTS"] = record(
            "NUTS",
            nuts.x0.reshape(-1, 2),
            nuts.seconds,
            nuts.network_calls,
            max_rhat_x0=float(summary["r_hat"].max()),
            min_ess_bulk_x0=float(summary["ess_bulk"].min()),
            max_rhat_all_sites=max_rhat_all,
            divergences=int(nuts.sample_stats["diverging"][0].sum()),
        )
        if not args.quick:
            az.plot_trace(idata, var_names=["x0"])
            plt.savefig(fig_dir / f"prior_nuts_trace_{name}.png", dpi=80)
            plt.close("all")

        svi = svi_conditional(diffusion, observation, y, num_steps=args.svi_steps, seed=args.seed)
        drawn["SVI (mean-field x_0)"] = record(
            "SVI (mean-field x_0)",
            svi.sample(args.samples, generator=generator),
            svi.seconds,
            svi.network_calls,
        )
        if observation.observed_index is not None:
            torch.manual_seed(args.seed)
            samples, stats = replacement_sample(diffusion, observation, y, args.samples)
            drawn["replacement"] = record("replacement", samples, stats["seconds"], stats["network_calls"])
        for step in args.dps_steps:
            torch.manual_seed(args.seed)
            samples, stats = dps_sample(diffusion, observation, y, args.samples, step_size=step)
            drawn[f"DPS ζ={step:g}"] = record(
                f"DPS ζ={step:g}", samples, stats["seconds"], stats["network_calls"]
            )
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
        ax.plot(range(len(smc_result.ess)), smc_result.ess)
        ax.set_xlabel("reweighting (0 = x_T, T = x_0)")
        ax.set_ylabel("ESS")
        ax.set_title(f"twisted SMC, K = {args.particles}: {name}", fontsize=8)
        fig.tight_layout()
        fig.savefig(fig_dir / f"prior_smc_ess_{name}.png", dpi=80)
        plt.close(fig)

    finished = datetime.datetime.now(datetime.timezone.utc)
    results["meta"] = {
        "command": " ".join(["python examples/inpainting_2d.py", *sys.argv[1:]]),
        "args": vars(args),
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, CPU only ({platform.platform()})",
    }
    (out_dir / "prior_validation.json").write_text(json.dumps(results, indent=1))
    write_table(results, out_dir / "prior_validation.md")
    print(f"wrote {out_dir / 'prior_validation.md'}")


def write_table(results, path):
    meta = results["meta"]
    a = meta["args"]
    lines = [
        "# Conditioning the 2-D mixture model: validation table",
        "",
        f"Generated by `{meta['command']}` ({meta['started']} to {meta['finished']}, {meta['machine']}).",
        f"Model: the 2-D mixture model trained with the step-subsampled ELBO, T = {a['num_steps']}.",
        "Energy distance (squared, U-statistic) of each method's samples to draws of the exact data",
        "conditional p(x_0 | y); ± a standard error from 10 disjoint splits.  Lower is better.",
        "",
        f"The model's own error, its unconditional samples against data: "
        f"{results['model_unconditional'][0]:.4f} ± {results['model_unconditional'][1]:.4f} "
        f"(data against data: {results['data_vs_data'][0]:.4f} ± {results['data_vs_data'][1]:.4f}).",
        "",
    ]
    for name, scenario in results["scenarios"].items():
        lines += [
            f"## {name}: {scenario['observation']}, y = {scenario['y']}",
            "",
            "| method | energy distance | seconds | network calls | notes |",
            "|---|---|---|---|---|",
        ]
        for method, row in scenario["methods"].items():
            notes = []
            if "max_rhat_x0" in row:
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
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
