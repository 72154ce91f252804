"""``pyro-diffusion``: train, sample, evaluate and compare from the command line.

::

    pyro-diffusion train    --data moons --objective elbo --steps 3000 --out runs/moons
    pyro-diffusion train    --out runs/moons --steps 6000 --resume     # continue the run
    pyro-diffusion evaluate --run runs/moons                            # test bits/dim
    pyro-diffusion sample   --run runs/moons --num 1000
    pyro-diffusion sample   --run runs/moons --num-steps 50 --sampler ddim   # 50 respaced levels
    pyro-diffusion compare  --data digits --quick --out runs/demo

Every subcommand explains its flags with ``--help``; see docs/cli.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .training import NETWORKS, OBJECTIVES, SCHEDULES, TrainConfig

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _add_model_flags(parser: argparse.ArgumentParser, compare: bool = False) -> None:
    """Flags that set a TrainConfig field; default None means "the configuration's default"."""
    defaults = TrainConfig()
    parser.add_argument(
        "--data",
        default=None,
        help="data set: moons, swissroll, gmm, digits, or a path to a .npy/.pt array (N, *event_shape)"
        f" (default {defaults.data}{'; digits for compare' if compare else ''})",
    )
    parser.add_argument("--steps", type=_positive_int, help=f"SVI steps (default {defaults.steps})")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument(
        "--batch-size", type=_positive_int, help=f"minibatch size (default {defaults.batch_size})"
    )
    parser.add_argument("--lr", type=float, help=f"Adam learning rate (default {defaults.lr})")
    parser.add_argument(
        "--lr-final-fraction",
        type=float,
        help="decay the learning rate geometrically to lr × this at the last step (default 1: no decay)",
    )
    parser.add_argument(
        "--num-steps",
        type=_positive_int,
        help=f"T, the model's number of noise levels (diffusion steps) (default {defaults.num_steps})",
    )
    parser.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        help="noise schedule: linear (DDPM), cosine (Improved DDPM), log-snr (log SNR linear in t "
        "between --log-snr-max and --log-snr-min), all tabulated on T levels; or gamma-linear (VDM's "
        "γ = −log SNR linear in time), gamma-cosine, learned (VDM's learned γ), functions of time on a "
        "T-level grid between --gamma-min and --gamma-max; default log-snr for K-level data, linear otherwise",
    )
    parser.add_argument(
        "--beta-start",
        type=float,
        help="β_1 of the linear schedule, β linear in t (default, with --beta-end unset too: DDPM's "
        "1000-step range of noise levels at T levels; else 1e-4·1000/T)",
    )
    parser.add_argument(
        "--beta-end",
        type=float,
        help="β_T of the linear schedule (default, with --beta-start unset too: as for --beta-start; "
        "else 0.02·1000/T)",
    )
    parser.add_argument(
        "--log-snr-max",
        type=float,
        help=f"log SNR at t = 1 for --schedule log-snr (default {defaults.log_snr_max})",
    )
    parser.add_argument(
        "--log-snr-min",
        type=float,
        help=f"log SNR at t = T for --schedule log-snr (default {defaults.log_snr_min})",
    )
    parser.add_argument(
        "--gamma-min",
        type=float,
        help="γ = −log SNR at t = 0 for gamma-linear, gamma-cosine, learned (default −13.3, −10, −10)",
    )
    parser.add_argument(
        "--gamma-max",
        type=float,
        help="γ = −log SNR at t = 1 for gamma-linear, gamma-cosine, learned (default 5, 10, 6)",
    )
    parser.add_argument(
        "--network",
        choices=sorted(NETWORKS),
        help="denoiser: mlp (on the flattened datum, default) or unet",
    )
    parser.add_argument(
        "--hidden", type=_positive_int, help=f"MLP width / U-Net base channels ({defaults.hidden})"
    )
    parser.add_argument("--depth", type=int, help=f"residual blocks of the MLP (default {defaults.depth})")
    parser.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        help=f"write a checkpoint every N steps (default {defaults.checkpoint_every})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


_FIELDS = {
    "data": "data",
    "objective": "objective",
    "steps": "steps",
    "seed": "seed",
    "device": "device",
    "batch_size": "batch_size",
    "lr": "lr",
    "lr_final_fraction": "lr_final_fraction",
    "num_steps": "num_steps",
    "schedule": "schedule",
    "beta_start": "beta_start",
    "beta_end": "beta_end",
    "log_snr_max": "log_snr_max",
    "log_snr_min": "log_snr_min",
    "gamma_min": "gamma_min",
    "gamma_max": "gamma_max",
    "network": "network",
    "hidden": "hidden",
    "depth": "depth",
    "checkpoint_every": "checkpoint_every",
}


def _config_from_args(args, base: TrainConfig | None = None) -> TrainConfig:
    values = {}
    for flag, field in _FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            values[field] = value
    if getattr(args, "no_progress", False):
        values["progress"] = False
    return dataclasses.replace(base or TrainConfig(), **values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-diffusion",
        description="Denoising diffusion models as Pyro programs: train with SVI on the full ELBO "
        "(or L_simple / hybrid), sample, evaluate the test NLL bound, compare objectives.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,evaluate,compare}")

    train = sub.add_parser(
        "train",
        help="train a diffusion with SVI into a run directory",
        description="Train with pyro.infer.SVI. Writes OUT/config.json, OUT/metrics.json, atomic "
        "checkpoints OUT/checkpoint.pt every --checkpoint-every steps, and figures (loss.png, "
        "samples.png). --resume continues exactly where the checkpoint stopped.",
    )
    train.add_argument("--out", required=True, help="run directory (created)")
    train.add_argument(
        "--objective",
        choices=sorted(OBJECTIVES),
        help="training objective: "
        + "; ".join(f"{name}: {entry.description}" for name, entry in OBJECTIVES.items())
        + " (default elbo)",
    )
    train.add_argument("--seed", type=int, help="seed for weights, data order and noise (default 0)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint; the configuration must match "
        "(only --steps, --device, --checkpoint-every may change); unset flags are taken from the run",
    )
    train.add_argument("--evaluate", action="store_true", help="after training, also run `evaluate`")
    _add_model_flags(train)

    sample = sub.add_parser(
        "sample",
        help="draw samples from a trained run",
        description="Sample a run's reverse chain (ancestral, or DDIM) on its own grid of noise levels or "
        "on K of them. Writes samples (.pt) and a figure (.png).",
    )
    sample.add_argument("--run", required=True, help="run directory written by `train`")
    sample.add_argument("--num", type=_positive_int, default=64, help="number of samples (default 64)")
    sample.add_argument(
        "--num-steps",
        type=_positive_int,
        default=None,
        metavar="K",
        help="sample on K noise levels (for a DDPM schedule, K evenly spaced levels of the model's own: "
        "respacing; default: the model's own T)",
    )
    sample.add_argument(
        "--sampler",
        choices=("ancestral", "ddim"),
        default="ancestral",
        help="ancestral: the model's reverse steps; ddim: DDIM with --eta (default ancestral)",
    )
    sample.add_argument(
        "--eta",
        type=_unit_interval,
        default=None,
        help="DDIM's η in [0, 1]: 0 deterministic (the default), 1 the posterior variance; only with --sampler ddim",
    )
    sample.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise (default 0)")
    sample.add_argument("--device", default=None, help="torch device (default: the run's)")
    sample.add_argument("--out", default=None, help="output file stem (default RUN/samples_seedS)")
    sample.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = sub.add_parser(
        "evaluate",
        help="test NLL bound (bits/dim, all T terms) of a run",
        description="Evaluate −ELBO over all T + 1 terms on the test split, in bits/dim; writes it "
        "(with the per-step profile) into RUN/metrics.json and RUN/profile.png, and prints it.",
    )
    evaluate.add_argument("--run", required=True, help="run directory written by `train`")
    evaluate.add_argument("--device", default=None, help="torch device (default: the run's)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    compare = sub.add_parser(
        "compare",
        help="compare objectives (full ELBO, importance-sampled ELBO, L_simple, hybrid) over seeds",
        description="Train the same network, schedule and budget with each objective and seed; "
        "report test bits/dim, sample quality, time; write OUT/results.{md,json} and figures.",
    )
    compare.add_argument("--out", required=True, help="comparison directory (created; finished runs reused)")
    compare.add_argument(
        "--objectives",
        "--objective",
        nargs="+",
        choices=sorted(OBJECTIVES),
        default=["elbo", "elbo-is", "simple", "hybrid"],
        help="objectives to compare (default: elbo elbo-is simple hybrid)",
    )
    compare.add_argument(
        "--seeds", "--seed", nargs="+", type=int, default=None, help="seeds (default 0 1 2; --quick: 0 1)"
    )
    compare.add_argument(
        "--quick",
        action="store_true",
        help="a small comparison that runs in about a minute on a CPU: 1000 steps, T = 100, "
        "an MLP of width 128 and depth 2, 2 seeds (explicit flags still override)",
    )
    compare.add_argument("--samples", type=_positive_int, help="samples per run for quality metrics")
    compare.add_argument("--no-baselines", action="store_true", help="skip the categorical baselines")
    study = _schedule_study()
    compare.add_argument(
        "--vdm",
        nargs="+",
        default=None,
        metavar="CONFIG",
        help="also run the schedule study (fixed against learned γ = −log SNR, continuous time), written "
        f"to OUT/vdm: {', '.join(study.CONFIGS)} or linear:GMIN:GMAX (see docs/learned_schedules.md)",
    )
    compare.add_argument(
        "--vdm-recipe",
        choices=tuple(study.RECIPES),
        default="short",
        help="training recipe of the --vdm runs: 'short' (2,500 steps, plain decoder) or 'regularized' "
        "(the network decoder, checkpoints selected on 200 held-out images, EMA, weight decay, at most "
        "8,000 steps, tuned endpoints [−2, 4]: the recipe of the best results in docs/learned_schedules.md)",
    )
    _add_model_flags(compare, compare=True)
    return parser


def _schedule_study():
    """The schedule study (imported here, for ``compare`` only: the core never imports the
    experiments)."""
    from .experiments import schedule_study

    return schedule_study


def _train(args) -> int:
    from .training import CONFIG, evaluate_run, train

    out = Path(args.out)
    base = TrainConfig()
    if args.resume and (out / CONFIG).exists():
        base = TrainConfig.from_dict(json.loads((out / CONFIG).read_text()))
    config = _config_from_args(args, base)
    metrics = train(config, out, resume=args.resume)
    print(
        f"trained {metrics['steps']} steps in {metrics['train_seconds']:.1f} s; final loss {metrics['final_loss']:.5g}"
    )
    if args.evaluate:
        metrics = evaluate_run(out, device=args.device, progress=config.progress)
        print(
            f"test bits/dim: {metrics['test_bits_per_dim']:.4f} ± {metrics['test_bits_per_dim_se']:.4f} (se)"
        )
    return 0


def _sample(args) -> int:
    import torch

    from . import plots
    from .training import load_run

    if args.eta is not None and args.sampler != "ddim":
        raise ValueError(f"--eta: only for --sampler ddim, got --sampler {args.sampler}")
    config, diffusion, dataset = load_run(args.run, args.device)
    options = {"eta": args.eta or 0.0} if args.sampler == "ddim" else {}
    torch.manual_seed(args.seed)
    samples = diffusion.sample(
        args.num, num_steps=args.num_steps, method=args.sampler, progress=not args.no_progress, **options
    ).cpu()
    stem = Path(args.out) if args.out else Path(args.run) / f"samples_seed{args.seed}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    torch.save(samples, stem.with_suffix(".pt"))
    if dataset.is_image:
        plots.sample_grid(samples[:64], stem.with_suffix(".png"))
    elif samples.shape[1:] == (2,):
        plots.scatter(
            {"held-out data": dataset.test[: args.num], "samples": samples}, stem.with_suffix(".png")
        )
    print(f"wrote {stem.with_suffix('.pt')} ({tuple(samples.shape)})")
    return 0


def _evaluate(args) -> int:
    from .training import evaluate_run

    metrics = evaluate_run(args.run, device=args.device, progress=not args.no_progress)
    print(f"test bits/dim: {metrics['test_bits_per_dim']:.4f} ± {metrics['test_bits_per_dim_se']:.4f} (se)")
    return 0


def _compare(args) -> int:
    from .experiments.compare import QUICK, run_comparison

    study = _schedule_study() if args.vdm else None
    if args.vdm:  # before the long core comparison, not after it
        for name in args.vdm:
            study.check_config(name)
    base = TrainConfig(data="digits")
    if args.quick:
        base = dataclasses.replace(base, **QUICK)
    config = _config_from_args(args, base)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    run_comparison(
        config,
        args.out,
        objectives=args.objectives,
        seeds=seeds,
        num_samples=args.samples,
        baselines=not args.no_baselines,
        mixture_components=10 if args.quick else 50,
    )
    print(f"wrote {Path(args.out) / 'results.md'}")
    if args.vdm:
        study.run_vdm_comparison(
            args.vdm,
            seeds,
            Path(args.out) / "vdm",
            quick=args.quick,
            baselines=not args.no_baselines,
            recipe=args.vdm_recipe,
        )
        print(f"wrote {Path(args.out) / 'vdm' / 'results.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pyro-diffusion``; returns the exit status (errors: 2, with a message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": _train, "sample": _sample, "evaluate": _evaluate, "compare": _compare}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"pyro-diffusion {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
