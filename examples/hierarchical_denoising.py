"""Hierarchical denoising of digits: an unknown noise scale σ_y inferred jointly with the images.

    σ_y ~ HalfNormal(0.5)
    x_i ~ p_θ(x_0)                 (the trained diffusion as a prior, i = 1..n, in a plate)
    y_i ~ N(x_i, σ_y² I)           (observed: test digits plus noise of true scale 0.25)

Joint inference by SVI: a LogNormal guide over σ_y, a mean-field Normal over each x_i, and
the diffusion's forward chain as the guide over each image's x_{1:T}
(``pyro_diffusion.inference.svi.chain_guide``).  Posterior summaries go through ArviZ
(``az.summary``, ``az.plot_posterior``, the SVI loss trace).

Two checks on σ_y.  ``--from-model`` draws the true images from the prior program itself, so
the model is correctly specified and what is left of the error in σ_y is the guide's (and
the bound's); on test digits, the difference between the two runs is what the prior's
misfit to real digits costs.  ``--grid N`` computes σ_y's marginal posterior on a grid from
twisted-SMC estimates of the evidence p_θ(y_i | σ_y) (unbiased, but with the default 64
particles per 64-pixel image far too noisy to read as a posterior: docs/prior.md).

    python examples/hierarchical_denoising.py            # 6 images, 300 SVI steps
    python examples/hierarchical_denoising.py --grid 12  # and the SMC-evidence grid (see above)
    python examples/hierarchical_denoising.py --quick   # a smoke run (about 20 s), model under --out
    python examples/hierarchical_denoising.py --from-model  # images drawn from the prior
    python examples/hierarchical_denoising.py --prior-loss simple  # a prior trained on L_simple
"""

import argparse
import math
import warnings
from pathlib import Path

import torch
from tqdm.auto import trange

torch.set_num_threads(1)

import arviz as az
import matplotlib
import pyro
import pyro.distributions as dist
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import ClippedAdam
from torch.distributions import constraints

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pyro_diffusion.data import load_dataset
from pyro_diffusion.inference import (
    DiffusionPrior,
    LinearObservation,
    MonteCarloNormal,
    PosteriorResult,
    chain_guide,
    twisted_smc,
)
from pyro_diffusion.inference import arviz as pd_arviz


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--true-sigma", type=float, default=0.25)
    parser.add_argument("--svi-steps", type=int, default=300)
    parser.add_argument("--particles", type=int, default=4, help="ELBO particles per SVI step")
    parser.add_argument(
        "--grid",
        type=int,
        default=0,
        help="σ_y grid points for the SMC-evidence check (default 0: skipped; with 64 particles "
        "per image its evidence estimates are too noisy to trust, docs/prior.md)",
    )
    parser.add_argument("--smc-particles", type=int, default=64)
    parser.add_argument("--out", default="runs/hierarchical_denoising")
    parser.add_argument(
        "--from-model",
        action="store_true",
        help="a self-consistency check: the true images are draws from the prior itself (the "
        "model's x_0), not test digits, so the model is correctly specified",
    )
    parser.add_argument(
        "--prior-loss",
        choices=("simple", "elbo"),
        default="elbo",
        help="the loss the digits prior was trained with: the one-step estimate of the full ELBO (default) "
        "or L_simple (whose prior puts σ_y too high: docs/prior.md)",
    )
    parser.add_argument(
        "--cache", default="runs/inference", help="where the digits prior is cached (default runs/inference)"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="optimizer steps of the prior (default 6000; --quick 300)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 images, 10 SVI steps, a 300-step prior cached under --out/models: about 20 s on an idle "
        "2-core machine",
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (default: on)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.svi_steps, args.particles, args.grid, args.smc_particles = 2, 10, 2, 3, 8
        args.train_steps = args.train_steps or 300
        args.cache = str(Path(args.out) / "models")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from pyro_diffusion.inference.pretrained import load_or_train

    diffusion = load_or_train(
        "digits",
        args.prior_loss,
        num_steps=100,
        train_steps=args.train_steps,
        root=args.cache,
        progress=args.progress,
    )
    prior = DiffusionPrior(diffusion, decoder="gaussian")
    pyro.set_rng_seed(0)  # after the prior: the same draws whether it was just trained or loaded
    if args.from_model:
        # x_0 drawn from the prior program exactly as the model below uses it
        with torch.no_grad(), pyro.poutine.block(), pyro.plate("images", args.images, dim=-1):
            truth = prior("x").detach()
    else:
        truth = load_dataset("digits").test[: args.images]
    g = torch.Generator().manual_seed(1)
    y = truth + args.true_sigma * torch.randn(truth.shape, generator=g)
    n = y.shape[0]

    def model(y):
        sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
        with pyro.plate("images", n, dim=-1):
            x = prior("x")
            pyro.sample("y", dist.Normal(x, sigma[..., None, None, None]).to_event(3), obs=y)

    def guide(y):
        s_loc = pyro.param("sigma_loc", torch.tensor(math.log(0.5)))
        s_scale = pyro.param("sigma_scale", torch.tensor(0.1), constraint=constraints.positive)
        pyro.sample("sigma", dist.LogNormal(s_loc, s_scale))
        x_loc = pyro.param("x_loc", y.clone())
        x_scale = pyro.param("x_scale", torch.full(y.shape, 0.1), constraint=constraints.positive)
        with pyro.plate("images", n, dim=-1):
            x0 = pyro.sample("x/x_0", MonteCarloNormal(x_loc, x_scale).to_event(3))
            chain_guide(diffusion, x0, "x")

    elbo = TraceMeanField_ELBO(num_particles=args.particles, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, ClippedAdam({"lr": 0.02, "clip_norm": 10.0}), elbo)
    losses = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        bar = trange(args.svi_steps, desc="SVI", disable=not args.progress, leave=False)
        for step in bar:
            losses.append(svi.step(y))
            if step % 50 == 0 or step == args.svi_steps - 1:
                s = pyro.param("sigma_loc").exp().item()
                bar.write(f"step {step:4d}  loss {losses[-1]:10.1f}  σ_y guide median {s:.3f}")

    store = pyro.get_param_store()
    x_loc, x_scale = store["x_loc"].detach().clone(), store["x_scale"].detach().clone()

    def draw_images(num, generator=None):  # q(x): the fitted mean-field Normal over the n images
        return x_loc + x_scale * torch.randn((num, *x_loc.shape), generator=generator)

    result = PosteriorResult(
        draws=draw_images(10),
        diagnostics={"loc": x_loc, "scale": x_scale, "losses": losses},
        method="svi",
        num_steps=prior.num_steps,
        sampler=draw_images,
    )
    idata = pd_arviz.from_svi(result, var_name="x", num_draws=1000)
    sigma_draws = dist.LogNormal(store["sigma_loc"], store["sigma_scale"]).sample((1000,)).detach()
    idata.posterior["sigma"] = (("chain", "draw"), sigma_draws.numpy()[None])
    print(az.summary(idata, var_names=["sigma"], kind="stats"))
    mse_noisy = ((y - truth) ** 2).mean().item()
    mse_post = ((x_loc - truth) ** 2).mean().item()
    print(
        f"true σ_y {args.true_sigma}; MSE of y to the truth {mse_noisy:.4f}, of E_q[x] to the truth {mse_post:.4f}"
    )

    ref = {}
    if args.grid:
        grid = torch.linspace(0.1, 0.45, args.grid)
        log_post = []
        for sigma in grid:
            observation = LinearObservation.denoising((1, 8, 8), float(sigma))
            log_lik = sum(
                twisted_smc(
                    diffusion, observation, y[i].reshape(-1), num_particles=args.smc_particles, seed=i
                ).diagnostics["log_evidence"]
                for i in range(n)
            )
            log_post.append(log_lik + dist.HalfNormal(0.5).log_prob(sigma).item())
            print(f"σ_y = {sigma:.3f}: log p̂(y | σ_y) = {log_lik:.1f}", flush=True)
        log_post = torch.tensor(log_post)
        weights = (log_post - log_post.logsumexp(0)).exp()
        mean = (weights * grid).sum().item()
        sd = ((weights * (grid - mean) ** 2).sum().sqrt()).item()
        ref = {"grid": grid, "weights": weights}
        print(f"σ_y on the grid (SMC evidence × prior): posterior mean {mean:.3f}, sd {sd:.3f}")

    az.plot_posterior(idata, var_names=["sigma"], ref_val=args.true_sigma)
    if ref:
        ax = plt.gca()
        width = float(ref["grid"][1] - ref["grid"][0])
        ax.plot(ref["grid"], ref["weights"] / width, "o-", label="grid: SMC evidence × prior")
        ax.legend(fontsize=7)
    plt.savefig(out / "sigma_posterior.png", dpi=90)
    plt.close("all")
    az.plot_trace(az.from_dict(posterior={"loss": torch.tensor(losses)[None].numpy()}))
    plt.savefig(out / "svi_loss.png", dpi=80)
    plt.close("all")
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 4), squeeze=False)
    for i in range(n):
        for row, (title, picture) in enumerate(
            [("truth", truth[i]), ("noisy y", y[i]), ("E_q[x]", x_loc[i])]
        ):
            axes[row, i].imshow(picture.reshape(8, 8).clamp(-1, 1), cmap="gray_r", vmin=-1, vmax=1)
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
            if i == 0:
                axes[row, i].set_ylabel(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "denoised.png", dpi=90)
    print(f"wrote {out}/sigma_posterior.png, svi_loss.png, denoised.png")


if __name__ == "__main__":
    main()
