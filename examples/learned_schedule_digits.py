"""Learned noise schedule vs fixed schedules on the 17-level digits.

Trains configurations of :mod:`pyro_diffusion.experiments.schedule_study` (same network, an MLP over the
64 pixels, and the same budget for each) and writes one JSON of test-set results per
configuration and seed; ``--summarize`` turns a folder of them into a markdown table (with the
per-pixel categorical and mixture-of-categoricals baselines) and figures.

    python examples/learned_schedule_digits.py --config learned,tuned --seed 0 --out runs/vdm
    python examples/learned_schedule_digits.py --config all --steps 300 --out runs/vdm_quick
    python examples/learned_schedule_digits.py --quick   # one configuration, 200 steps (about 10 s)
    python examples/learned_schedule_digits.py --plot-diagnosis runs/vdm_fix/diagnose --docs  # docs' figure
    python examples/learned_schedule_digits.py --summarize runs/vdm
    python examples/learned_schedule_digits.py --paired runs/vdm    # per-image vs the mixture
    python examples/learned_schedule_digits.py --versus runs/vdm learned-shape runs/vdm tuned  # paired, over seeds

Regularized recipe (off by default): ``--val-size 200 --eval-every 250`` holds out 200
training images and keeps the checkpoint with the best validation bound; ``--ema 0.999``
evaluates an EMA of the weights; ``--weight-decay`` penalizes the denoiser's weights.

``--train-steps T`` trains (and selects checkpoints) on the T-step bound instead of the
continuous-time one; ``--versus … --at T`` and ``--paired DIR --at T`` compare T-step bounds.
T counts VDM's intervals between T + 1 noise levels (as do ``--eval-steps`` and the result
keys ``test_bpd_T{T}``): the library's ``num_steps = T + 1``.

``--decoder``: ``plain`` (VDM's z/α) or ``network`` (the network's x̂ with a learned scale;
``denoiser`` is accepted as its earlier name).

``--diagnose`` logs what the validation bound is made of for the raw and the EMA weights
(``docs/learned_schedules.md`` §5).

Configurations: learned, learned-anchored, learned-shape, learned-heldout, learned-T16,
ddpm-linear, cosine, vdm-linear, tuned, simple (see the module docstring of
pyro_diffusion.experiments.schedule_study).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pyro_diffusion.experiments.schedule_study import (
    CONFIGS,
    paired_comparison,
    paired_over_seeds,
    summarize,
    train_and_evaluate,
)


def print_paired(folder: Path, num_steps: int | None = None) -> None:
    """Per configuration (each seed, then all seeds averaged per image): the paired per-image
    difference mixture − diffusion in bits/dim with its standard error over test images, then
    the configurations against each other; at T = ∞, or at ``num_steps`` = T."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*_seed*.json"))]
    key = "test_per_image_bpd" if num_steps is None else f"test_per_image_bpd_T{num_steps}"
    by_config: dict[str, list[dict]] = {}
    for result in results:
        if key in result:
            by_config.setdefault(result["config"], []).append(result)
    if not by_config:
        raise SystemExit(f"--paired: no results with per-image values ({key}) in {folder}")
    from pyro_diffusion.baselines import CategoricalMixture
    from pyro_diffusion.data import load_dataset

    dataset = load_dataset(results[0].get("data", "digits"))
    mixture = CategoricalMixture(dataset.num_levels, 50, seed=0).fit(dataset.train)  # once for all
    rows = []
    for config, runs in by_config.items():
        groups = [[r] for r in runs] + ([runs] if len(runs) > 1 else [])
        for group in groups:
            rows.append(paired_comparison(group, dataset, mixture=mixture, num_steps=num_steps))
            c = rows[-1]
            seeds = ",".join(str(s) for s in c["seeds"])
            print(
                f"{config:14s} seeds {seeds:6s}: diffusion {c['diffusion_bpd']:.4f} (MC se {c['mc_se']:.4f}), "
                f"mixture {c['mixture_bpd']:.4f}; mixture − diffusion {c['difference']:+.4f} ± "
                f"{c['difference_se']:.4f} (z = {c['z']:.1f}); diffusion better on "
                f"{c['images_better']}/{c['num_images']} images",
                flush=True,
            )
    configs = list(by_config)
    for i, first in enumerate(configs):  # the configurations against each other, same images
        for second in configs[i + 1 :]:
            rows.append(
                {
                    "first": first,
                    "second": second,
                    **print_versus(by_config[first], by_config[second], num_steps),
                }
            )
    (folder / "paired.json").write_text(json.dumps(rows, indent=1))


def print_versus(first: list[dict], second: list[dict], num_steps: int | None = None) -> dict:
    """Print and return :func:`~pyro_diffusion.experiments.schedule_study.paired_over_seeds` of two
    configurations' runs: each common seed, then all of them (with the standard error over
    images and the one over seeds)."""
    names = [
        f"{runs[0]['config']}"
        + (f" (trained T={runs[0]['train_num_steps']})" if "train_num_steps" in runs[0] else "")
        for runs in (first, second)
    ]
    at = "T = ∞" if num_steps is None else f"T = {num_steps}"
    result = paired_over_seeds(first, second, num_steps)
    if len(result["seeds"]) > 1:
        for seed, value in zip(result["seeds"], result["per_seed"]):
            one = paired_over_seeds(
                [r for r in first if r["seed"] == seed], [r for r in second if r["seed"] == seed], num_steps
            )
            print(
                f"{names[0]} − {names[1]} at {at}, seed {seed}: {value:+.4f} ± {one['se_images']:.4f} (z = {one['z_images']:.1f})"
            )
    seeds = ",".join(map(str, result["seeds"]))
    print(
        f"{names[0]} − {names[1]} at {at}, seeds {seeds}: {result['difference']:+.4f} bits/dim; "
        f"se over images {result['se_images']:.4f} (z = {result['z_images']:.1f}); "
        f"se over seeds {result['se_seeds']:.4f} (z = {result['z_seeds']:.1f}); "
        f"first better on {result['images_better']}/{result['num_images']} images",
        flush=True,
    )
    return result


def save_figure(fig, axes, out: Path) -> Path:
    """Legends on ``axes``, then ``fig`` written to ``out`` (folders made) and closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_versus(result: dict, names: tuple[str, str], out: Path) -> Path:
    """The figure of a paired comparison (``print_versus``'s result): the per-seed differences
    with their mean and ± 4 standard errors over seeds (left), and the per-image differences of
    the seed means with ± 4 standard errors over images (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at = "T = ∞" if result["num_steps"] is None else f"T = {result['num_steps']}"
    mean = result["difference"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].scatter(result["seeds"], result["per_seed"], s=14, color="k", label="one seed")
    axes[0].axhline(0.0, color="grey", lw=0.8)
    axes[0].axhline(mean, color="C0", label=f"mean {mean:+.4f}")
    se = result["se_seeds"]
    axes[0].axhspan(mean - 4 * se, mean + 4 * se, color="C0", alpha=0.2, label="± 4 se over seeds")
    axes[1].axvline(0.0, color="grey", lw=0.8)
    axes[1].axvline(mean, color="C0", label=f"mean {mean:+.4f}")
    se = result["se_images"]
    axes[1].axvspan(mean - 4 * se, mean + 4 * se, color="C0", alpha=0.2, label="± 4 se over images")
    axes[0].set(xlabel="seed", ylabel="bits/dim", title=f"{names[0]} − {names[1]} ({at}), per seed")
    axes[1].hist(result["per_image"], bins=40, color="grey")
    axes[1].set(
        xlabel="bits/dim", ylabel="test images", title=f"per image (mean over {len(result['seeds'])} seeds)"
    )
    return save_figure(fig, axes, out)


def load_runs(folder: Path, config: str) -> list[dict]:
    """The results of ``config`` in ``folder`` (one per seed), or SystemExit."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{config}_seed*.json"))]
    runs = [r for r in runs if r["config"] == config]
    if not runs:
        raise SystemExit(f"--versus: no {config}_seed*.json results in {folder}")
    return runs


def diagnose(config: str, args) -> dict:
    """One training run of ``config`` with the regularized recipe's flags, logging what the
    validation bound is made of (docs/learned_schedules.md §5, "Why the learned schedule broke
    under the EMA").  Every ``--eval-every`` steps, for the raw and the EMA weights: the
    validation bound's diffusion, decoder and prior terms (bits/dim), the EMA's bound on 200
    training images and with a linear shape at the same endpoints (the same expectation), the
    endpoints and γ'(t) at t = 0, 0.1, …, 1.  At the end: ½‖ε − ε̂‖² and the decoder term at γ
    around γ_min (raw and EMA weights), and the validation bound with the EMA taken for every
    parameter but one group, and for one group only."""
    import math
    import time

    import pyro

    from pyro_diffusion.data import load_dataset
    from pyro_diffusion.experiments import schedule_study as ex
    from pyro_diffusion.schedules import LinearGamma

    dataset = load_dataset("digits")
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    train, val = ex.split_validation(dataset.train, args.val_size or 200)
    train_part = train[:200]
    vdm, _, trainer = ex.build(
        config,
        tuple(train.shape[1:]),
        dataset.num_levels,
        hidden=args.hidden,
        depth=args.depth,
        decoder=args.decoder,
        tuned=tuple(args.tuned),
        lr=args.lr,
        schedule_lr=args.schedule_lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    generator = torch.Generator().manual_seed(args.seed)
    bits = 1 / (64 * math.log(2))
    average, rows = None, []

    @torch.no_grad()
    def terms(data, draws=16):
        with torch.random.fork_rng():
            torch.manual_seed(2024)
            x = data.repeat((draws,) + (1,) * (data.dim() - 1))
            t = ex.bound_terms(vdm, x, torch.rand(x.shape[0], dtype=torch.float64))
            parts = [
                t.diffusion.mean().item() * bits,
                t.decoder.mean().item() * bits,
                t.prior.mean().item() * bits,
            ]
            return {"bound": sum(parts), "diffusion": parts[0], "decoder": parts[1], "prior": parts[2]}

    @torch.no_grad()
    def near_gamma_min(data, deltas):
        gamma0 = vdm.schedule.endpoints()[0].item()
        error, decoder = [], []
        with torch.random.fork_rng():
            torch.manual_seed(7)
            for delta in deltas:
                x = data.repeat(4, *(1,) * (data.dim() - 1))
                gamma = torch.full((x.shape[0],), gamma0 + delta, dtype=torch.float64)
                z = vdm.marginal(x, gamma).rsample()
                eps = vdm.noise_of(x, z, gamma)
                prediction, _ = vdm.predict(z, gamma)
                error.append(0.5 * ((eps - prediction.eps) ** 2).sum((1, 2, 3)).mean().item() * bits)
                nll = -vdm.decoder_distribution(z, gamma).log_prob(x).sum((1, 2, 3)).mean().item() * bits
                decoder.append(nll)
        return {"gamma_min": gamma0, "deltas": deltas, "eps_error": error, "decoder": decoder}

    every = args.eval_every or 250
    start = time.time()
    for step in range(args.steps):
        rows_ = torch.randint(0, train.shape[0], (args.batch,), generator=generator)
        loss = trainer.step(train[rows_]).item() / args.batch * bits
        if average is None:
            average = ex._WeightAverage(vdm, args.ema or 0.999)
        else:
            average.update()
        if (step + 1) % every and step != args.steps - 1:
            continue
        raw = ex._snapshot(vdm)
        row = {"step": step + 1, "train_loss": loss, "raw_val": terms(val)}
        average.copy_to(vdm)
        row["ema_val"], row["ema_train"] = terms(val), terms(train_part)
        low, high = (g.item() for g in vdm.schedule.endpoints())
        with torch.no_grad():
            row["ema_dgamma"] = vdm.schedule(
                torch.linspace(0, 1, 11, dtype=torch.float64)
            ).derivative.tolist()
        schedule, vdm.schedule = vdm.schedule, LinearGamma(low, high)
        row["ema_val_linear_shape"] = terms(val)
        vdm.schedule = schedule
        row["ema_endpoints"] = [low, high]
        ex._restore(vdm, raw)
        row["raw_endpoints"] = [g.item() for g in vdm.schedule.endpoints()]
        rows.append(row)
        print(
            f"{config} step {step + 1}: train loss {loss:.3f}; validation raw {row['raw_val']['bound']:.3f}, "
            f"EMA {row['ema_val']['bound']:.3f} (diffusion {row['ema_val']['diffusion']:.3f}, decoder "
            f"{row['ema_val']['decoder']:.3f}, prior {row['ema_val']['prior']:.4f}); EMA on training images "
            f"{row['ema_train']['bound']:.3f}; EMA with a linear shape {row['ema_val_linear_shape']['bound']:.3f}; "
            f"γ raw [{row['raw_endpoints'][0]:.3f}, {row['raw_endpoints'][1]:.3f}], EMA [{low:.3f}, {high:.3f}]; "
            f"EMA γ'(t) {[round(d, 1) for d in row['ema_dgamma']]}",
            flush=True,
        )
    deltas = [-0.3, -0.1, -0.05, -0.02, -0.01, 0.0, 0.01, 0.02, 0.05, 0.1, 0.3]
    raw = ex._snapshot(vdm)
    result = {"config": config, "seed": args.seed, "rows": rows, "train_seconds": time.time() - start}
    result["near_gamma_min_raw"] = near_gamma_min(val, deltas)
    average.copy_to(vdm)
    result["near_gamma_min_ema"] = near_gamma_min(val, deltas)
    ex._restore(vdm, raw)
    groups: dict[str, list[str]] = {}
    for name, _ in vdm.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[0] == "denoiser" else ".".join(parts[:2])
        groups.setdefault(key, []).append(name)

    def bound_with(ema_names):
        with torch.no_grad():
            for name, param in vdm.named_parameters():
                if name in ema_names:
                    param.copy_(average.shadow[name])
        value = terms(val)["bound"]
        ex._restore(vdm, raw)
        return value

    every_name = {n for names in groups.values() for n in names}
    result["swap"] = {
        key: {"ema_all_but": bound_with(every_name - set(names)), "ema_only": bound_with(set(names))}
        for key, names in groups.items()
    }
    result["swap_raw"], result["swap_ema"] = bound_with(set()), bound_with(every_name)
    for label in ("raw", "ema"):
        probe = result[f"near_gamma_min_{label}"]
        print(f"{label} weights, γ_min = {probe['gamma_min']:.4f}; γ − γ_min: {deltas}")
        print("  ½‖ε − ε̂‖² (bits/dim):", [round(v, 3) for v in probe["eps_error"]])
        print("  decoder term (bits/dim):", [round(v, 3) for v in probe["decoder"]])
    print(f"validation: raw {result['swap_raw']:.3f}, EMA {result['swap_ema']:.3f}")
    for key, value in result["swap"].items():
        print(
            f"  EMA for all but {key:38s} {value['ema_all_but']:.3f}; EMA for {key} only {value['ema_only']:.3f}"
        )
    return result


def plot_diagnosis(folder: Path, out: Path) -> Path:
    """The figure of ``--diagnose`` runs in ``folder``: validation bound over training for the
    raw and the EMA weights (left), and ½‖ε − ε̂‖² on the validation images at γ around γ_min
    for the raw and EMA weights at the end (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("diagnose-*.json"))]
    if not runs:
        raise SystemExit(f"--plot-diagnosis: no diagnose-*.json in {folder}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for run, color in zip(runs, ("C0", "C1", "C2", "C3")):
        steps = [row["step"] for row in run["rows"]]
        label = f"{run['config']} (seed {run['seed']})"
        axes[0].plot(
            steps,
            [row["raw_val"]["bound"] for row in run["rows"]],
            color=color,
            ls="--",
            label=f"{label}, raw",
        )
        axes[0].plot(
            steps, [row["ema_val"]["bound"] for row in run["rows"]], color=color, label=f"{label}, EMA"
        )
        for kind, ls in (("raw", "--"), ("ema", "-")):
            probe = run[f"near_gamma_min_{kind}"]
            axes[1].plot(
                probe["deltas"], probe["eps_error"], color=color, ls=ls, marker=".", label=f"{label}, {kind}"
            )
    axes[0].set(
        xlabel="SVI step", ylabel="validation bound (bits/dim)", yscale="log", title="validation bound"
    )
    axes[1].set(
        xlabel="γ − γ_min (that run's own γ_min)",
        ylabel="½‖ε − ε̂‖² (bits/dim)",
        yscale="log",
        title="the network near γ_min, end of training",
    )
    return save_figure(fig, axes, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="learned", help=f"comma-separated from {CONFIGS}, or 'all'")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--schedule-lr", type=float, default=None, help="learning rate of the schedule (default: --lr)"
    )
    parser.add_argument("--tuned", type=float, nargs=2, default=(-4.0, 2.0), metavar=("GMIN", "GMAX"))
    parser.add_argument(
        "--decoder",
        default="plain",
        choices=("plain", "network", "denoiser"),
        help="plain (VDM's z/α) or network (the network's x̂, a learned scale); denoiser: network",
    )
    parser.add_argument("--eval-times", type=int, default=100)
    parser.add_argument(
        "--eval-steps",
        type=int,
        nargs="*",
        default=[16, 64, 1000],
        help="the T-step bounds to evaluate (T intervals, T + 1 noise levels)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/learned_schedule"))
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (default: on)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 200 steps, 10 test draws per image, the T = 16 bound only (about 10 s on an idle "
        "2-core machine)",
    )
    parser.add_argument("--log-every", type=int, default=0, help="print the training loss every N steps")
    parser.add_argument("--summarize", type=Path, metavar="DIR", help="only summarize the results in DIR")
    parser.add_argument(
        "--paired", type=Path, metavar="DIR", help="only the paired comparison with the mixture"
    )
    parser.add_argument("--val-size", type=int, default=0, help="training images held out for validation")
    parser.add_argument("--eval-every", type=int, default=0, help="validate every N steps, keep the best")
    parser.add_argument("--val-times", type=int, default=16, help="(t, ε) draws per validation image")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: none)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="L2 penalty on the denoiser")
    parser.add_argument(
        "--versus",
        nargs=4,
        metavar=("DIR1", "CONFIG1", "DIR2", "CONFIG2"),
        help="only the paired comparison CONFIG1 (results in DIR1) − CONFIG2 (in DIR2) over their common seeds",
    )
    parser.add_argument(
        "--at",
        type=int,
        default=None,
        metavar="T",
        help="with --versus or --paired: compare the T-step bounds (T intervals; default T = ∞)",
    )
    parser.add_argument(
        "--versus-figure", type=Path, default=None, metavar="PNG", help="with --versus: draw it to this file"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        metavar="T",
        help="train (and select checkpoints) on the T-step bound (T intervals, the library's "
        "num_steps = T + 1) instead of the continuous-time one",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="log the validation bound's terms for raw and EMA weights (one config, one seed)",
    )
    parser.add_argument(
        "--plot-diagnosis", type=Path, metavar="DIR", help="only plot the --diagnose runs in DIR to --figure"
    )
    parser.add_argument(
        "--figure",
        type=Path,
        default=None,
        help="with --plot-diagnosis: the figure (default --out/learned_schedule_ema_diagnosis.png, or the "
        "docs' with --docs)",
    )
    parser.add_argument(
        "--docs",
        action="store_true",
        help="with --plot-diagnosis: write the figure to docs/figures/learned_schedule_ema_diagnosis.png",
    )
    args = parser.parse_args(argv)
    if args.figure is None:
        folder = Path("docs/figures") if args.docs else args.out
        args.figure = folder / "learned_schedule_ema_diagnosis.png"
    if args.quick:
        args.steps, args.eval_times, args.eval_steps = 200, 10, [16]
    if args.decoder == "denoiser":  # the earlier name of the network decoder
        args.decoder = "network"
    torch.set_num_threads(args.threads)
    if args.summarize:
        print(summarize(args.summarize))
        return
    if args.paired:
        print_paired(args.paired, args.at)
        return
    if args.versus:
        dir1, config1, dir2, config2 = args.versus
        first, second = load_runs(Path(dir1), config1), load_runs(Path(dir2), config2)
        result = print_versus(first, second, args.at)
        if args.versus_figure:
            print(plot_versus(result, (config1, config2), args.versus_figure))
        return
    if args.plot_diagnosis:
        print(plot_diagnosis(args.plot_diagnosis, args.figure))
        return
    configs = CONFIGS if args.config == "all" else args.config.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.diagnose and args.train_steps is not None:
        raise SystemExit("--diagnose: runs on the continuous-time bound; drop --train-steps")
    if args.diagnose:
        if "learned-heldout" in configs:  # its held-out endpoint steps are train_and_evaluate's
            raise SystemExit(
                "--diagnose: learned-heldout is not supported; diagnose the other configurations"
            )
        for config in configs:
            result = diagnose(config, args)
            (args.out / f"diagnose-{config}-seed{args.seed}.json").write_text(json.dumps(result, indent=1))
        return
    for config in configs:
        result = train_and_evaluate(
            config,
            seed=args.seed,
            steps=args.steps,
            batch=args.batch,
            hidden=args.hidden,
            depth=args.depth,
            lr=args.lr,
            schedule_lr=args.schedule_lr,
            tuned=tuple(args.tuned),
            decoder=args.decoder,
            eval_times=args.eval_times,
            eval_steps=args.eval_steps,
            log_every=args.log_every,
            progress=args.progress,
            val_size=args.val_size,
            eval_every=args.eval_every,
            val_times=args.val_times,
            ema=args.ema,
            weight_decay=args.weight_decay,
            train_num_steps=args.train_steps,
        )
        (args.out / f"{config}_seed{args.seed}.json").write_text(json.dumps(result, indent=1))
        print(
            f"{config:12s} seed {args.seed}: test {result['test_bpd_continuous']:.4f} ± "
            f"{result['test_bpd_continuous_se']:.4f} bits/dim (T=∞), "
            + ", ".join(f"T={T}: {result[f'test_bpd_T{T}']:.4f}" for T in args.eval_steps)
            + f"; var {result['estimator_variance_bpd2']:.4g}; γ ∈ [{result['gamma_min']:.2f}, "
            f"{result['gamma_max']:.2f}]; {result['train_seconds']:.0f} s"
            + (f"; validation {result['val_bpd']:.4f}" if "val_bpd" in result else "")
            + (f" (best step {result['best_step']})" if "best_step" in result else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
