"""Learned noise schedule vs fixed schedules on the 17-level digits (issue 6).

Trains configurations of :mod:`pyro_diffusion.vdm.experiment` (same network, an MLP over the
64 pixels, and the same budget for each) and writes one JSON of test-set results per
configuration and seed; ``--summarize`` turns a folder of them into a markdown table (with the
per-pixel categorical and mixture-of-categoricals baselines) and figures.

    python examples/learned_schedule_digits.py --config learned,tuned --seed 0 --out runs/vdm
    python examples/learned_schedule_digits.py --config all --steps 300 --out runs/vdm_quick
    python examples/learned_schedule_digits.py --summarize runs/vdm
    python examples/learned_schedule_digits.py --paired runs/vdm    # per-image vs the mixture

Regularized recipe (off by default): ``--val-size 200 --eval-every 250`` holds out 200
training images and keeps the checkpoint with the best validation bound; ``--ema 0.999``
evaluates an EMA of the weights; ``--weight-decay`` penalizes the denoiser's weights.

Configurations: learned, learned-T16, ddpm-linear, cosine, vdm-linear, tuned, simple (see the
module docstring of pyro_diffusion.vdm.experiment).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pyro_diffusion.vdm.experiment import (
    CONFIGS,
    paired_comparison,
    paired_difference,
    summarize,
    train_and_evaluate,
)


def print_paired(folder: Path) -> None:
    """Per configuration (each seed, then all seeds averaged per image): the paired per-image
    difference mixture − diffusion in bits/dim with its standard error over test images."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*_seed*.json"))]
    by_config: dict[str, list[dict]] = {}
    for result in results:
        if "test_per_image_bpd" in result:
            by_config.setdefault(result["config"], []).append(result)
    if not by_config:
        raise SystemExit(f"--paired: no results with per-image values in {folder}")
    rows = []
    for config, runs in by_config.items():
        groups = [[r] for r in runs] + ([runs] if len(runs) > 1 else [])
        for group in groups:
            rows.append(paired_comparison(group))
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
            a = {r["seed"]: r["test_per_image_bpd"] for r in by_config[first]}
            b = {r["seed"]: r["test_per_image_bpd"] for r in by_config[second]}
            seeds = sorted(set(a) & set(b))
            groups = [[s] for s in seeds] + ([seeds] if len(seeds) > 1 else [])
            for group in groups:
                mean_a = [sum(v) / len(group) for v in zip(*(a[s] for s in group))]
                mean_b = [sum(v) / len(group) for v in zip(*(b[s] for s in group))]
                difference, se = paired_difference(mean_a, mean_b)
                rows.append(
                    {"first": first, "second": second, "seeds": group, "difference": difference, "se": se}
                )
                print(
                    f"{first} − {second}, seeds {','.join(map(str, group))}: {difference:+.4f} ± {se:.4f} "
                    f"bits/dim (z = {difference / se:.1f})",
                    flush=True,
                )
    (folder / "paired.json").write_text(json.dumps(rows, indent=1))


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
    parser.add_argument("--decoder", default="plain", choices=("plain", "denoiser"))
    parser.add_argument("--eval-times", type=int, default=100)
    parser.add_argument("--eval-steps", type=int, nargs="*", default=[16, 64, 1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/learned_schedule"))
    parser.add_argument("--progress", action="store_true")
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.summarize:
        print(summarize(args.summarize))
        return
    if args.paired:
        print_paired(args.paired)
        return
    configs = CONFIGS if args.config == "all" else args.config.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
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
