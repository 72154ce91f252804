"""Train a diffusion model on a 2-D data set with Pyro's SVI and the full ELBO.

    python examples/svi_2d.py                # a few minutes on a CPU
    python examples/svi_2d.py --quick        # about 10 s on an idle 2-core machine
    python examples/svi_2d.py --data moons --objective simple --out runs/svi_2d

Writes a scatter of samples against held-out data, the loss curve and the per-step term
profile L_t into ``--out``, and prints the test bound in nats and bits/dim.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import torch
from pyro.infer import SVI
from pyro.optim import ClippedAdam
from tqdm.auto import trange

from pyro_diffusion import DiffusionELBO, GaussianDiffusion, MLPDenoiser, NoiseSchedule, SimplifiedLoss
from pyro_diffusion.data import load_dataset

OBJECTIVES = {
    "elbo": DiffusionELBO,
    "elbo-is": lambda: DiffusionELBO(times="importance"),
    "simple": SimplifiedLoss,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="gmm", help="moons, swissroll or gmm (default: gmm)")
    parser.add_argument("--objective", default="elbo", choices=sorted(OBJECTIVES))
    parser.add_argument("--steps", type=int, default=4000, help="SVI steps (default: 4000)")
    parser.add_argument("--num-steps", type=int, default=100, help="diffusion steps T (default: 100)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/svi_2d", help="directory for the figures")
    parser.add_argument(
        "--quick", action="store_true", help="300 steps, T = 20 (about 10 s on an idle 2-core machine)"
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (default: on)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.num_steps = 300, 20

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = load_dataset(args.data, seed=args.seed)

    # the model: an MLP denoiser, a linear schedule, the reverse chain as a Pyro model
    diffusion = GaussianDiffusion(
        MLPDenoiser(2, hidden=128, depth=3), NoiseSchedule.linear(args.num_steps), (2,)
    )
    optim = ClippedAdam({"lr": 2e-3, "lrd": 0.01 ** (1 / args.steps), "clip_norm": 10.0})
    svi = SVI(diffusion.model, diffusion.guide, optim, OBJECTIVES[args.objective]())

    losses = []
    with trange(args.steps, desc=f"SVI ({args.objective})", disable=not args.progress) as bar:
        for step in bar:
            batch = data.train[torch.randint(len(data.train), (args.batch,))]
            losses.append(svi.step(batch) / args.batch)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")

    test = data.test[:2000]
    terms = diffusion.vlb_terms(test)
    nll = terms.sum(1)
    print(
        f"test -ELBO: {nll.mean():.3f} ± {nll.std() / math.sqrt(len(nll)):.3f} nats "
        f"({nll.mean() / (2 * math.log(2)):.3f} bits/dim)"
    )
    samples = diffusion.sample(2000, progress=args.progress)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].scatter(*test.T, s=2, alpha=0.4, label="held-out data")
    axes[0].scatter(*samples.T, s=2, alpha=0.4, label="samples")
    axes[0].legend(markerscale=5)
    axes[0].set_title(f"{args.data}: samples vs data")
    axes[0].set_xlabel("x₁  [data units]")
    axes[0].set_ylabel("x₂  [data units]")
    low, high = torch.quantile(test, torch.tensor([0.002, 0.998]), dim=0)  # a few outliers do not squash it
    margin = 0.1 * (high - low)
    axes[0].set_xlim(low[0] - margin[0], high[0] + margin[0])
    axes[0].set_ylim(low[1] - margin[1], high[1] + margin[1])
    axes[1].plot(losses, lw=0.5)
    axes[1].set_yscale("symlog")
    axes[1].set_xlabel("SVI step")
    axes[1].set_ylabel(f"loss per datum [{'nats' if args.objective != 'simple' else 'ε-loss units'}]")
    axes[1].set_title(f"training loss ({args.objective})")
    profile = terms.mean(0).detach()
    axes[2].plot(range(terms.shape[1]), profile)
    small = profile.abs()[profile != 0].min().item() if (profile != 0).any() else 1e-6
    axes[2].set_yscale("symlog", linthresh=max(small, 1e-6))  # signed: the decoder term may be negative
    axes[2].axhline(0.0, color="0.6", lw=0.6)
    axes[2].set_xlabel("t (0 = decoder, T = prior KL)")
    axes[2].set_ylabel("L_t  [nats per datum]")
    axes[2].set_title("per-step terms (test data)")
    fig.tight_layout()
    fig.savefig(out / "svi_2d.png", dpi=120)
    print(f"figure: {out / 'svi_2d.png'}")


if __name__ == "__main__":
    main()
