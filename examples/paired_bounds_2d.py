"""Paired comparison of two trained models by their per-datum bounds on the same test data.

The 2-D mixture model trained with the full ELBO (one step per datum) against the
same network trained with L_simple, T = 50, 4000 optimizer steps each (cached under
``--cache``, default ``runs/inference``; the first run trains them, a few minutes on a CPU).
Each test point's bound ELBO_θ(x_0) is averaged over ``--draws`` Monte Carlo evaluations and
handed to ArviZ as a ``log_likelihood`` group; the comparison is the mean of the per-datum
differences and its standard error (paired, so the spread of the data cancels).

    python examples/paired_bounds_2d.py [--points 2000] [--draws 4]
    python examples/paired_bounds_2d.py --quick   # 300 training steps each, cached under --out

Writes ``--out``/paired_bounds.json (default ``runs/paired_bounds_2d``).
"""

import argparse
import json
from pathlib import Path

import torch

torch.set_num_threads(1)

from pyro_diffusion.data import load_dataset
from pyro_diffusion.inference import arviz as pd_arviz
from pyro_diffusion.inference.pretrained import load_or_train


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, default=2000, help="test points (default 2000)")
    parser.add_argument("--draws", type=int, default=4, help="Monte Carlo draws of each bound (default 4)")
    parser.add_argument(
        "--train-steps", type=int, default=4000, help="optimizer steps of each model (default 4000)"
    )
    parser.add_argument("--out", default="runs/paired_bounds_2d", help="where paired_bounds.json goes")
    parser.add_argument(
        "--cache",
        default="runs/inference",
        help="where the trained models are cached (default runs/inference)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="300 training steps per model (cached under --out/models), 500 points, 2 draws: "
        "about 15 s on an idle 2-core machine",
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (default: on)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    cache = Path(args.cache)
    if args.quick:
        args.points, args.draws, args.train_steps = 500, 2, 300
        cache = out / "models"
    torch.manual_seed(0)
    test = load_dataset("gmm").test[: args.points]
    models = {}
    for loss in ("elbo", "simple"):
        models[loss] = load_or_train(
            "gmm", loss, num_steps=50, train_steps=args.train_steps, root=cache, progress=args.progress
        )
    first = pd_arviz.from_bounds(models["elbo"], test, num_draws=args.draws)
    second = pd_arviz.from_bounds(models["simple"], test, num_draws=args.draws)
    bits = {}
    for name, idata in (("full ELBO", first), ("L_simple", second)):
        values = idata.bound_terms["bits_per_dim"].values
        bits[name] = (float(values.mean()), float(values.std(ddof=1) / len(values) ** 0.5))
        print(f"{name:>9} model: test bound {bits[name][0]:.4f} ± {bits[name][1]:.4f} bits/dim (se)")
    paired = pd_arviz.paired_bound_difference(first, second, event_size=2)
    # ELBO_1 − ELBO_2 > 0: the full-ELBO model's bound is tighter, i.e. it needs fewer bits
    difference = -paired["mean_bpd"]  # bits/dim of the full-ELBO model minus those of the L_simple model
    verdict = "fewer" if difference < 0 else "more"
    print(
        f"paired over n = {paired['n']} test points: ELBO(full-ELBO model) − ELBO(L_simple model) = "
        f"{paired['mean']:.4f} ± {paired['se']:.4f} nats per datum (z = {paired['z']:.1f});\n"
        f"the full-ELBO model needs {abs(difference):.4f} ± {paired['se_bpd']:.4f} bits/dim {verdict} "
        f"than the L_simple model (bits/dim difference full − simple = {difference:+.4f})"
    )
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "points": args.points,
        "draws": args.draws,
        "train_steps": args.train_steps,
        "bits_per_dim": bits,
        "paired": paired,
        "bits_per_dim_difference_full_minus_simple": difference,
    }
    (out / "paired_bounds.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / 'paired_bounds.json'}")


if __name__ == "__main__":
    main()
