"""Inpainting 8×8 digits with a trained diffusion as a prior.

Observes the left half of each test image (plus Gaussian noise σ_y) and fills in the right
half with twisted SMC (asymptotically exact for the model's conditional), the replacement
heuristic and DPS, and, when asked (``--nuts-images``), NUTS over the whole chain on a short
sub-grid.  Reports, per method, the mean squared error of the posterior mean on the
*unobserved* pixels against the true image, the wall-clock time and the network calls per
image, SMC's ESS per step and NUTS's R-hat; writes figures and ``results.json`` to ``--out``.

Two priors (``--prior``):

* ``ddpm`` (default): a small MLP diffusion (T = 100, Gaussian decoder on the [-1, 1] scale:
  the continuous relaxation of the 17-level data) trained with L_simple and cached under
  runs/inference; the methods run on its own 100-level grid (``--num-steps K``: a respaced
  K-level sub-grid).
* ``learned``: the best learned-schedule model of docs/learned_schedules.md, the schedule
  study's ``learned-shape`` on [−2, 4] with the network decoder discretized to the 17 levels,
  trained with the ``regularized`` recipe (at most ``--train-steps`` steps, checkpoint and
  EMA selected on 200 held-out images; pyro_diffusion.inference.pretrained.load_learned_digits;
  the first run trains it, about 2–3 minutes on one CPU thread, and caches it under
  ``--model-root``).  It is a continuous-time model: the methods run on a K-level grid
  (``--num-steps``, default 20; NUTS on ``--nuts-steps``, default 10).  SMC and NUTS need a
  continuous x_0 and use the Gaussian relaxation of the discretized decoder (its location and
  scale); replacement and DPS end on the decoder's location.  Default: NUTS on the first 2
  images.

The MSE is reported for the draws as they come and for the draws mapped to the data's 17
levels (clamped to [-1, 1] and rounded, as the discretized decoder maps its Gaussian draw).
The trained network decoder puts its location well outside [-1, 1] for saturated pixels (the
edge bins are open), so its plain Gaussian relaxation draws background pixels near -1.6
rather than -1.  ``--relaxation moments`` uses instead the Gaussian with the discretized
decoder's own mean and variance (plus the within-bin variance h²/3, h = 1/16), for every
method (a subclass of the diffusion that overrides ``decoder_distribution``; not in the
library).

    python examples/inpainting_digits.py                   # DDPM: 8 images, 128 particles
    python examples/inpainting_digits.py --quick           # 2 images, 16 particles, a 300-step prior (about 20 s)
    python examples/inpainting_digits.py --prior learned   # the learned schedule, NUTS on 2 images
    python examples/inpainting_digits.py --prior learned --quick
    python examples/inpainting_digits.py --prior learned --relaxation moments
"""

import argparse
import json
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import arviz as az
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro.distributions as dist
from tqdm.auto import tqdm

from pyro_diffusion.data import load_dataset
from pyro_diffusion.decoders import DiscretizedGaussian
from pyro_diffusion.diffusion import Diffusion
from pyro_diffusion.inference import (
    LinearObservation,
    dps_sample,
    nuts_conditional,
    replacement_sample,
    twisted_smc,
)
from pyro_diffusion.inference import arviz as pd_arviz
from pyro_diffusion.inference.pretrained import (
    learned_digits_paths,
    load_learned_digits,
    load_or_train,
    train_learned_digits,
)


class MomentMatchedDecoder(Diffusion):
    """A diffusion whose discretized decoder is replaced by the Gaussian with the same mean and
    variance over the K levels, plus the within-bin variance h²/3 (h = 1/(K − 1)): a
    continuous x_0 that stays in [-1, 1] where the discretized decoder's mass is."""

    def decoder_distribution(self, z_1, gamma_1, prediction=None, variance_output=None, **kwargs):
        decoder = super().decoder_distribution(z_1, gamma_1, prediction, variance_output, **kwargs)
        if not isinstance(decoder, DiscretizedGaussian):
            return decoder
        h = decoder.half_width
        levels = torch.linspace(-1, 1, decoder.num_levels, dtype=torch.float64, device=decoder.loc.device)
        loc, scale = decoder.loc.to(torch.float64)[..., None], decoder.scale.to(torch.float64)[..., None]
        cdf = torch.special.ndtr((levels[:-1] + h - loc) / scale)  # the K − 1 inner bin edges
        zero, one = torch.zeros_like(cdf[..., :1]), torch.ones_like(cdf[..., :1])
        mass = torch.cat([cdf, one], -1) - torch.cat([zero, cdf], -1)  # edge bins open
        mean = (mass * levels).sum(-1)
        variance = (mass * levels**2).sum(-1) - mean**2
        scale = (variance.clamp(min=0) + h * h / 3).sqrt()
        return dist.Normal(mean.to(decoder.loc.dtype), scale.to(decoder.loc.dtype))


def moment_matched(diffusion: Diffusion) -> Diffusion:
    """``diffusion`` (its modules shared) with :class:`MomentMatchedDecoder`'s decoder."""
    copy = MomentMatchedDecoder(
        diffusion.denoiser,
        diffusion.schedule,
        diffusion.event_shape,
        mean=diffusion.mean,
        variance=diffusion.variance,
        decoder=diffusion.decoder,
        num_levels=diffusion.num_levels,
        num_steps=diffusion.num_steps,
        guide_order=diffusion.guide_order,
        name=diffusion.name,
        anchor=diffusion.anchor,
    )
    copy.load_state_dict(diffusion.state_dict())
    return copy.eval()


def to_levels(x: torch.Tensor, num_levels: int = 17) -> torch.Tensor:
    """x clamped to [-1, 1] and rounded to the nearest of ``num_levels`` levels."""
    steps = num_levels - 1
    return torch.round((x.clamp(-1, 1) + 1) / 2 * steps) / steps * 2 - 1


@torch.no_grad()
def decoder_location_check(diffusion: Diffusion, images: torch.Tensor) -> dict:
    """Where the decoder p(x_0 | x_1) puts its location for x_1 ~ q(x_1 | x_0) at the first level
    γ(0) of the schedule, on ``images``: the fraction outside [-1, 1], the mean at the pixels
    that are -1, and the MSE to x_0 of the location, of the location clamped to [-1, 1] and of
    the plain estimate x_1/α_1 (seeded; the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        gamma = diffusion.schedule.endpoints()[0]
        x_1 = diffusion.marginal(images, gamma).sample()
        loc = diffusion.decoder_distribution(x_1, gamma).loc
    alpha = torch.sigmoid(-gamma).sqrt()
    return {
        "gamma_1": gamma.item(),
        "outside": ((loc < -1) | (loc > 1)).float().mean().item(),
        "mean_at_background": loc[images == -1].mean().item(),
        "mse_location": ((loc - images) ** 2).mean().item(),
        "mse_clamped_location": ((loc.clamp(-1, 1) - images) ** 2).mean().item(),
        "mse_x1_over_alpha": ((x_1 / alpha - images) ** 2).mean().item(),
    }


def load_prior(args):
    """(diffusion, description) for ``--prior``."""
    if args.prior == "ddpm":
        steps = args.ddpm_train_steps or 6000
        diffusion = load_or_train(
            "digits", "simple", num_steps=100, train_steps=steps, root=args.model_root, progress=args.progress
        )
        return diffusion, {
            "prior": "ddpm",
            "model": f"T = 100 MLP, L_simple, {steps} steps, Gaussian decoder",
        }
    start = time.perf_counter()
    if args.quick:  # a small stand-in for the study's model: 200 steps, few test draws, under --out
        weights, _ = learned_digits_paths(args.model_seed, args.train_steps, args.model_root)
        if not weights.exists():
            print(
                f"training a {args.train_steps}-step learned-schedule model under {args.model_root}",
                flush=True,
            )
            train_learned_digits(
                seed=args.model_seed,
                steps=args.train_steps,
                root=args.model_root,
                progress=args.progress,
                eval_every=100,
                eval_times=10,
                eval_steps=[],
            )
    diffusion, config = load_learned_digits(
        seed=args.model_seed, steps=args.train_steps, root=args.model_root, progress=args.progress
    )
    results = config["results"]
    low, high = (g.item() for g in diffusion.schedule.endpoints())
    print(
        f"learned-schedule model ({config['config']}, recipe {config['recipe']}, seed {config['seed']}, "
        f"≤ {args.train_steps} steps, selected step {results.get('best_step')}; loaded or trained in "
        f"{time.perf_counter() - start:.1f} s): test bound {results['test_bpd_continuous']:.4f} ± "
        f"{results['test_bpd_continuous_se']:.4f} bits/dim (T = ∞, {results['eval_times']} draws per image), "
        f"γ ∈ [{low:.2f}, {high:.2f}]",
        flush=True,
    )
    check = decoder_location_check(diffusion, load_dataset("digits").test)
    print(
        f"its decoder at γ(0) = {check['gamma_1']:.2f} on the 297 test images: location outside [-1, 1] for "
        f"{100 * check['outside']:.1f} % of the pixels, mean location {check['mean_at_background']:.3f} where the "
        f"pixel is -1; MSE to x_0 of the location {check['mse_location']:.4f}, of the location clamped to [-1, 1] "
        f"{check['mse_clamped_location']:.4f}, of x_1/α_1 {check['mse_x1_over_alpha']:.4f}",
        flush=True,
    )
    if args.relaxation == "moments":
        diffusion = moment_matched(diffusion)
    return diffusion, {
        "prior": "learned",
        "relaxation": args.relaxation,
        "model": {k: config[k] for k in ("config", "recipe", "seed")},
        "train_steps": args.train_steps,
        "best_step": results.get("best_step"),
        "train_seconds": results["train_seconds"],
        "test_bpd_continuous": results["test_bpd_continuous"],
        "test_bpd_continuous_se": results["test_bpd_continuous_se"],
        "val_bpd": results.get("val_bpd"),
        "decoder_location_check": check,
    }


def run_nuts(args, diffusion, observation, y):
    """NUTS on the ``--nuts-steps`` grid; its draws and a row of diagnostics (R-hat over the 64
    pixels of x_0 and over every site of the non-centred chain)."""
    nuts = nuts_conditional(
        diffusion,
        observation,
        y,
        num_samples=args.nuts_draws,
        warmup_steps=args.nuts_warmup,
        num_chains=args.nuts_chains,
        num_steps=args.nuts_steps,
        max_tree_depth=args.nuts_tree_depth,
        jit_compile=args.nuts_jit,
        seed=args.seed,
        progress=args.progress,
    )
    idata = pd_arviz.from_nuts(nuts, include_noise=True)
    summary = az.summary(idata, round_to="none")
    x0_rows = summary.index.str.startswith("x0")
    stats = nuts.diagnostics["sample_stats"]
    row = {
        "max_rhat_x0": float(summary["r_hat"][x0_rows].max()),
        "median_rhat_x0": float(summary["r_hat"][x0_rows].median()),
        "min_ess_bulk_x0": float(summary["ess_bulk"][x0_rows].min()),
        "max_rhat_all_sites": float(summary["r_hat"].max()),
        "divergences": int(stats["diverging"].sum()),
        "mean_tree_size": float(stats["tree_size"].float().mean()),
        "step_size": float(stats["step_size"].float().mean()),
    }
    return nuts, row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prior", choices=("ddpm", "learned"), default="ddpm")
    parser.add_argument(
        "--relaxation",
        choices=("gaussian", "moments"),
        default="gaussian",
        help="learned: the continuous x_0 (the decoder's location and scale, or its moments)",
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--particles", type=int, default=128)
    parser.add_argument("--samples", type=int, default=16, help="draws per image for the heuristics")
    parser.add_argument("--noise", type=float, default=0.1, help="σ_y on the [-1, 1] scale")
    parser.add_argument("--dps-step", type=float, default=0.3)
    parser.add_argument(
        "--num-steps",
        type=int,
        default=None,
        help="grid of SMC, replacement and DPS (default: ddpm its own 100 levels, learned 20)",
    )
    parser.add_argument(
        "--nuts-images",
        type=int,
        default=None,
        help="NUTS on the first N images (default: ddpm 0, learned 2)",
    )
    parser.add_argument("--nuts-steps", type=int, default=10, help="NUTS's grid (levels)")
    parser.add_argument("--nuts-draws", type=int, default=100, help="NUTS draws per chain")
    parser.add_argument("--nuts-warmup", type=int, default=100)
    parser.add_argument("--nuts-chains", type=int, default=2)
    parser.add_argument("--nuts-tree-depth", type=int, default=6)
    parser.add_argument(
        "--no-nuts-jit", dest="nuts_jit", action="store_false", help="do not JIT-compile NUTS's potential"
    )
    parser.add_argument("--seed", type=int, default=0, help="NUTS's seed (chain c: seed + c)")
    parser.add_argument("--train-steps", type=int, default=8000, help="learned: the model's training budget")
    parser.add_argument("--model-seed", type=int, default=0, help="learned: the model's training seed")
    parser.add_argument(
        "--model-root", default="runs/inference", help="where the prior is cached (default runs/inference)"
    )
    parser.add_argument(
        "--ddpm-train-steps",
        type=int,
        default=None,
        help="ddpm: the prior's training steps (default 6000; --quick 300, cached under --out/models)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="default runs/inpainting_digits (ddpm), runs/inpainting_digits_learned[_moments] (learned)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 images, 16 particles, a small prior trained into --out/models (ddpm: 300 steps, about "
        "20 s on an idle 2-core machine; learned: 200 steps, about 15 s)",
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (default: on)"
    )
    args = parser.parse_args(argv)
    learned = args.prior == "learned"
    if args.relaxation != "gaussian" and not learned:
        parser.error("--relaxation: the ddpm prior has a Gaussian decoder; moments is for --prior learned")
    if args.num_steps is None and learned:
        args.num_steps = 20
    if args.nuts_images is None:
        args.nuts_images = 2 if learned else 0
    if args.quick:
        args.images, args.particles, args.samples = 2, 16, 4
        args.nuts_images = min(args.nuts_images, 1)
        args.nuts_draws, args.nuts_warmup, args.nuts_tree_depth = 10, 10, 4
    default_out = "runs/inpainting_digits" + ("_learned" if learned else "")
    default_out += "_moments" if args.relaxation == "moments" else ""
    out = Path(args.out or default_out)
    if args.quick:  # a small prior of its own, cached under --out
        args.ddpm_train_steps = args.ddpm_train_steps or 300
        if args.train_steps == 8000:
            args.train_steps = 200
        args.model_root = str(out / "models")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    diffusion, description = load_prior(args)
    images = load_dataset("digits").test[: args.images]
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[..., :4] = True  # the left half is observed
    observation = LinearObservation.mask(mask, noise_scale=args.noise)
    hidden = ~mask.reshape(-1)
    generator = torch.Generator().manual_seed(0)
    grid = {"num_steps": args.num_steps} if args.num_steps is not None else {}

    names = ["twisted SMC", "replacement", "DPS"] + (["NUTS"] if args.nuts_images else [])
    methods = {name: {} for name in names}  # name -> {image: draws}
    errors = {name: [] for name in names}
    level_errors = {name: [] for name in names}
    seconds = {name: [] for name in names}
    calls = {name: [] for name in names}
    ess, nuts_rows = [], []
    for i, image in enumerate(tqdm(images, desc="images", disable=not args.progress)):
        y = observation.sample(image[None], generator=generator)[0]
        smc = twisted_smc(diffusion, observation, y, num_particles=args.particles, seed=i, **grid)
        ess.append(smc.diagnostics["ess"])
        results = {
            "twisted SMC": (smc, smc.sample(args.samples, generator=generator)),
        }
        replacement = replacement_sample(diffusion, observation, y, args.samples, **grid)
        results["replacement"] = (replacement, replacement.draws)
        dps = dps_sample(diffusion, observation, y, args.samples, step_size=args.dps_step, **grid)
        results["DPS"] = (dps, dps.draws)
        if i < args.nuts_images:
            nuts, row = run_nuts(args, diffusion, observation, y)
            results["NUTS"] = (nuts, nuts.draws)
            nuts_rows.append({"image": i, **row})
        for name, (result, samples) in results.items():
            methods[name][i] = samples
            posterior_mean = samples.mean(0).reshape(-1)
            errors[name].append(((posterior_mean - image.reshape(-1))[hidden] ** 2).mean().item())
            level_mean = to_levels(samples).mean(0).reshape(-1)
            level_errors[name].append(((level_mean - image.reshape(-1))[hidden] ** 2).mean().item())
            seconds[name].append(result.seconds)
            calls[name].append(result.network_calls)
        line = f"image {i}: min ESS {ess[-1].min():.1f} of {args.particles}, " + ", ".join(
            f"{k} MSE {errors[k][-1]:.3f}" for k in results
        )
        if i < args.nuts_images:
            row = nuts_rows[-1]
            line += (
                f"; NUTS R-hat max {row['max_rhat_x0']:.3f} (x_0), {row['max_rhat_all_sites']:.3f} (all sites), "
                f"{row['divergences']} divergences, {results['NUTS'][0].seconds:.0f} s"
            )
        print(line, flush=True)

    train_mean = load_dataset("digits").train.mean(0).reshape(-1)
    reference = torch.tensor(
        [((train_mean - image.reshape(-1))[hidden] ** 2).mean().item() for image in images]
    )
    reference_se = (reference.std() / len(reference) ** 0.5).item() if len(reference) > 1 else float("nan")
    print("mean squared error of the posterior mean on the hidden half (± standard error over images):")
    print(f"  (the training images' mean as the guess: {reference.mean():.4f} ± {reference_se:.4f})")
    summary = {}
    for name in names:
        v = torch.tensor(errors[name])
        se = (v.std() / len(v) ** 0.5).item() if len(v) > 1 else float("nan")
        grid_size = {"NUTS": args.nuts_steps}.get(name, args.num_steps or diffusion.num_steps)
        w = torch.tensor(level_errors[name])
        level_se = (w.std() / len(w) ** 0.5).item() if len(w) > 1 else float("nan")
        summary[name] = {
            "mse": v.mean().item(),
            "mse_se": se,
            "mse_levels": w.mean().item(),
            "mse_levels_se": level_se,
            "images": len(v),
            "num_steps": grid_size,
            "seconds_per_image": sum(seconds[name]) / len(v),
            "network_calls_per_image": sum(calls[name]) / len(v),
        }
        print(
            f"  {name:>12}: {v.mean():.4f} ± {se:.4f} (on the 17 levels: {w.mean():.4f} ± {level_se:.4f}) "
            f"over {len(v)} images, K = {grid_size}, "
            f"{summary[name]['seconds_per_image']:.2f} s and {summary[name]['network_calls_per_image']:.0f} "
            "network calls per image",
            flush=True,
        )
    min_ess = [float(trace.min()) for trace in ess]
    print(f"twisted SMC: min ESS per image {', '.join(f'{e:.1f}' for e in min_ess)} of {args.particles}")
    (out / "results.json").write_text(
        json.dumps(
            {
                **description,
                "settings": {k: v for k, v in vars(args).items()},
                "methods": summary,
                "mean_image_mse": reference.mean().item(),
                "mean_image_mse_se": reference_se,
                "per_image_mse": errors,
                "per_image_mse_levels": level_errors,
                "smc_min_ess": min_ess,
                "nuts": nuts_rows,
            },
            indent=1,
        )
    )

    rows = len(images)
    fig, axes = plt.subplots(
        rows, 2 + 2 * len(names), figsize=(1.25 * (2 + 2 * len(names)), 1.3 * rows), squeeze=False
    )
    for i, image in enumerate(images):
        panels = [("truth", image), ("observed", image * mask)]
        for name in names:
            draws = methods[name].get(i)
            panels += [(f"{name} {j + 1}", None if draws is None else draws[j]) for j in range(2)]
        for ax, (title, picture) in zip(axes[i], panels):
            if picture is not None:
                ax.imshow(picture.reshape(8, 8).clamp(-1, 1), cmap="gray_r", vmin=-1, vmax=1)
            else:
                ax.axis("off")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "inpainting_digits.png", dpi=90)
    fig, ax = plt.subplots(figsize=(4, 2.5))
    for trace in ess:
        ax.plot(trace, alpha=0.6)
    ax.set_xlabel("reweighting (0 = x_K, K = x_0)")
    ax.set_ylabel("ESS")
    fig.tight_layout()
    fig.savefig(out / "inpainting_digits_ess.png", dpi=90)
    print(f"wrote {out}/inpainting_digits.png, inpainting_digits_ess.png and results.json")


if __name__ == "__main__":
    main()
