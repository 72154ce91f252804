"""Paired comparison of two trained models by their per-datum bounds on the same test data.

The 2-D mixture model trained with the full ELBO (one step per datum) against the
same network trained with L_simple, T = 50, 4000 SVI steps each (cached under runs/).
Each test point's bound ELBO_θ(x_0) is averaged over ``--draws`` Monte Carlo evaluations and
handed to ArviZ as a ``log_likelihood`` group; the comparison is the mean of the per-datum
differences and its standard error (paired, so the spread of the data cancels).

    python examples/paired_bounds_2d.py [--points 2000] [--draws 4]
"""

import argparse

import torch

torch.set_num_threads(1)

from pyro_diffusion.data import load_dataset
from pyro_diffusion.inference import arviz as pd_arviz
from pyro_diffusion.inference.pretrained import load_or_train


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    test = load_dataset("gmm").test[: args.points]
    elbo_model = load_or_train("gmm", "elbo", num_steps=50)
    simple_model = load_or_train("gmm", "simple", num_steps=50)
    first = pd_arviz.from_bounds(elbo_model, test, num_draws=args.draws)
    second = pd_arviz.from_bounds(simple_model, test, num_draws=args.draws)
    for name, idata in (("full ELBO", first), ("L_simple", second)):
        bits = idata.bound_terms["bits_per_dim"].values
        print(f"{name:>9}: bits/dim {bits.mean():.4f} ± {bits.std(ddof=1) / len(bits) ** 0.5:.4f}")
    out = pd_arviz.paired_bound_difference(first, second, event_size=2)
    print(
        f"ELBO(full-ELBO model) − ELBO(L_simple model) per datum: {out['mean']:.4f} ± {out['se']:.4f} nats "
        f"(z = {out['z']:.1f}, n = {out['n']}); in bits/dim {out['mean_bpd']:.4f} ± {out['se_bpd']:.4f} fewer"
    )


if __name__ == "__main__":
    main()
