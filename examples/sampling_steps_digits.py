"""Sample quality against the number of sampling steps, for a model trained on the full ELBO
and one trained on L_simple, on scikit-learn's 8×8 digits.

    python examples/sampling_steps_digits.py --quick     # about 20 s on one CPU core
    python examples/sampling_steps_digits.py             # the results page (docs/results.md)
    python examples/sampling_steps_digits.py --docs      # also copy the figure to docs/figures/

Two DDPM-style models with T = 1000 noise levels (:func:`~pyro_diffusion.GaussianDiffusion`:
ε-prediction, σ_t² = β_t, the network's x̂ as the decoder's location with DDPM's variance β̃_2,
discretized to the data's K = 17 levels) share the network (:class:`~pyro_diffusion.MLPDenoiser`
on the 64 flattened pixels), the schedule (log SNR linear in t from +7 to −9, the CLI's default
for K-level data: ``SCHEDULES["log-snr"](1000)``), the initial weights, the minibatches and the
budget (``--steps`` SVI steps of ``--batch-size`` images, Adam at ``--lr``).  One is trained on
the full ELBO (:class:`~pyro_diffusion.DiffusionELBO`, the one-step estimate with t uniform),
the other on L_simple (:class:`~pyro_diffusion.SimplifiedLoss`), each with a plain
``pyro.infer.SVI`` loop.

Then, for each model, each sampler — ancestral sampling on the respaced sub-grid of K of the
model's own levels (its reverse step between consecutive levels, σ² = β of the respaced step)
and DDIM with η = 0 on the same sub-grid — and each K in ``--ks``, ``--num-samples`` images are
drawn and compared with the test split by the Fréchet distance in the feature space of a small
digits classifier (:func:`pyro_diffusion.metrics.frechet_distance`, the classifier trained on the
training split).  Every sampling seed draws one starting noise x_T shared by all models,
samplers and K (so the curves are paired), and ``--seeds`` seeds give the mean and its standard
error.  The standard error covers the sampling only: each model is one training run.

For scale, the same distance between ``--num-samples`` training images and the test images is
reported (the ``reference``), and the test bound of each model in bits/dim over all T terms.

Writes under ``--out`` (default ``runs/sampling_steps``): ``results.json`` (configuration,
training losses, bounds, every distance), ``frechet_vs_steps.png`` (distance against K, log
x-axis, both models, both samplers, ± one standard error) and ``samples.png`` (the first
images of seed 0 at the smallest and the largest K).  ``--docs`` copies the distance figure to
``docs/figures/sampling_steps_digits.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.optim
import torch
from pyro.infer import SVI
from tqdm.auto import tqdm

from pyro_diffusion import Diffusion, DiffusionELBO, MLPDenoiser, SimplifiedLoss
from pyro_diffusion.data import load_dataset
from pyro_diffusion.decoders import DiscretizedGaussian
from pyro_diffusion.metrics import DigitsClassifier, frechet_distance
from pyro_diffusion.schedules import SCHEDULES

NUM_STEPS = 1000
OBJECTIVES = {"elbo": ("full ELBO", DiffusionELBO), "simple": ("L_simple", SimplifiedLoss)}
SAMPLERS = {"ancestral": "ancestral (respaced)", "ddim": "DDIM, η = 0"}
DOCS_FIGURE = Path(__file__).resolve().parent.parent / "docs" / "figures" / "sampling_steps_digits.png"

FULL = {"steps": 15000, "hidden": 256, "depth": 3, "seeds": 10, "ks": [10, 25, 50, 100, 1000]}
QUICK = {"steps": 600, "hidden": 64, "depth": 1, "seeds": 2, "ks": [10, 100, 1000]}


class Float64Decoder(DiscretizedGaussian):
    """The discretized decoder with its log-probability computed in float64 (the location
    clamped to ±10⁴, far outside the data's [−1, 1]).

    The one-step ELBO computes the decoder's term for every datum and masks it to the data
    whose step is the decoder's.  For the others x̂ comes from a high noise level, where
    x̂ = (z − σ ε̂)/α with α ≈ 0.01 is far from the data, and float32 ``log_ndtr`` has a NaN
    gradient beyond about 4.6·10⁴ standard deviations: the mask keeps the value finite but
    0 · NaN reaches the weights.  Float64 keeps the gradient finite (and zero under the mask);
    the decoder's values where it counts are unchanged."""

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return Float64Decoder(self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.num_levels)

    def log_prob(self, value):
        loc = self.loc.double().clamp(-1e4, 1e4)
        exact = DiscretizedGaussian(loc, self.scale.double(), self.num_levels)
        return exact.log_prob(value.double()).to(value.dtype)


class DigitsDiffusion(Diffusion):
    """:class:`~pyro_diffusion.Diffusion` with :class:`Float64Decoder` as p(x_0 | x_1)."""

    def decoder_distribution(self, *args, **kwargs):
        decoder = super().decoder_distribution(*args, **kwargs)
        return Float64Decoder(decoder.loc, decoder.scale, decoder.num_levels)


def build(name: str, hidden: int, depth: int, seed: int) -> Diffusion:
    """The DDPM-style diffusion for the digits (what ``GaussianDiffusion(..., decoder=
    "discretized", num_levels=17)`` builds, with :class:`Float64Decoder`), its initial weights
    drawn from ``seed``."""
    torch.manual_seed(seed)
    network = MLPDenoiser((1, 8, 8), hidden=hidden, depth=depth)
    schedule = SCHEDULES["log-snr"](NUM_STEPS)
    return DigitsDiffusion(
        network, schedule, (1, 8, 8), mean="eps", variance="large", decoder="ddpm", num_levels=17, name=name
    )


def train(
    diffusion, loss, images: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int, desc: str
):
    """``steps`` SVI steps over minibatches drawn without replacement (reshuffled every epoch,
    the order fixed by ``seed``); returns the loss per step divided by the batch size."""
    svi = SVI(diffusion.model, diffusion.guide, pyro.optim.Adam({"lr": lr}), loss)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order, position = torch.randperm(len(images), generator=generator), 0
    history = []
    bar = tqdm(range(steps), desc=desc, unit="step", mininterval=1.0)
    for step in bar:
        if position + batch_size > len(images):
            order, position = torch.randperm(len(images), generator=generator), 0
        batch = images[order[position : position + batch_size]]
        position += batch_size
        value = svi.step(batch) / batch_size
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: the loss is {value} at step {step}")
        history.append(value)
        if step % 100 == 99:
            bar.set_postfix(loss=f"{np.mean(history[-100:]):.4g}")
    bar.close()
    return history


def mean_and_se(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


@torch.no_grad()
def evaluate(models: dict, data, classifier, ks: list[int], seeds: int, num_samples: int) -> dict:
    """Fréchet distances to the test images for every model, sampler, K and seed."""
    test_features = classifier.features(data.test)
    reference = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(10_000 + seed)
        index = torch.randperm(len(data.train), generator=generator)[:num_samples]
        reference.append(frechet_distance(classifier.features(data.train[index]), test_features))
    distances = {name: {method: {k: [] for k in ks} for method in SAMPLERS} for name in models}
    seconds = {name: {method: {k: 0.0 for k in ks} for method in SAMPLERS} for name in models}
    first_images = {}
    total = seeds * len(models) * len(SAMPLERS) * len(ks)
    bar = tqdm(total=total, desc="sampling", unit="batch", mininterval=1.0)
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        x_T = torch.randn((num_samples, 1, 8, 8), generator=generator)
        for name, diffusion in models.items():
            for method in SAMPLERS:
                for k in ks:
                    torch.manual_seed(seed)  # the ancestral sampler's noise
                    start = time.perf_counter()
                    samples = diffusion.sample(num_samples, num_steps=k, method=method, x_T=x_T.clone())
                    seconds[name][method][k] += time.perf_counter() - start
                    distances[name][method][k].append(
                        frechet_distance(classifier.features(samples), test_features)
                    )
                    if seed == 0 and k in (ks[0], ks[-1]):
                        first_images[(name, method, k)] = samples[:8]
                    bar.update(1)
    bar.close()
    table = {
        name: {
            method: {
                str(k): dict(
                    zip(("mean", "se"), mean_and_se(values)),
                    values=values,
                    seconds_per_batch=seconds[name][method][k] / seeds,
                )
                for k, values in by_k.items()
            }
            for method, by_k in by_method.items()
        }
        for name, by_method in distances.items()
    }
    ref_mean, ref_se = mean_and_se(reference)
    return {
        "frechet": table,
        "reference": {"mean": ref_mean, "se": ref_se, "values": reference},
    }, first_images


def figure(results: dict, ks: list[int], path: Path) -> Path:
    """Fréchet distance against K (log x), one line per model and sampler, ± one standard error."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = {"elbo": "tab:blue", "simple": "tab:orange"}
    styles = {"ancestral": ("-", "o"), "ddim": ("--", "s")}
    for name, (label, _) in OBJECTIVES.items():
        for method, method_label in SAMPLERS.items():
            rows = results["frechet"][name][method]
            means = [rows[str(k)]["mean"] for k in ks]
            ses = [rows[str(k)]["se"] for k in ks]
            line, marker = styles[method]
            ax.errorbar(
                ks, means, yerr=ses, color=colours[name], linestyle=line, marker=marker, capsize=3,
                label=f"{label}, {method_label}",
            )  # fmt: skip
    ref = results["reference"]
    ax.axhline(ref["mean"], color="grey", linestyle=":", label="training images (reference)")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    values = [v["mean"] for by in results["frechet"].values() for rows in by.values() for v in rows.values()]
    if max(values) / max(min(values + [ref["mean"]]), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("sampling steps K (of the model's T = 1000 levels)")
    ax.set_ylabel("Fréchet distance to test images (classifier features)")
    seeds = len(ref["values"])
    ax.set_title(f"8×8 digits: sample quality against steps (mean ± s.e., {seeds} seeds)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def samples_figure(images: dict, ks: list[int], path: Path) -> Path:
    """The first 8 images of seed 0 for every model and sampler at the smallest and largest K."""
    rows = [(name, method) for name in OBJECTIVES for method in SAMPLERS]
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 0.75 * len(rows) + 0.4))
    for r, (name, method) in enumerate(rows):
        for c, k in enumerate((ks[0], ks[-1])):
            strip = images[(name, method, k)].reshape(-1, 8, 8).permute(1, 0, 2).reshape(8, -1)
            ax = axes[r, c]
            ax.imshow(strip.numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"K = {k}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{name}\n{method}", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small network, 600 steps, 2 seeds, K in 10 100 1000 (about 20 s on an idle 2-core machine)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"SVI steps per model (default {FULL['steps']})"
    )
    parser.add_argument("--hidden", type=int, default=None, help=f"MLP width (default {FULL['hidden']})")
    parser.add_argument("--depth", type=int, default=None, help=f"residual blocks (default {FULL['depth']})")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--seed", type=int, default=0, help="training seed (initial weights, minibatch order)"
    )
    parser.add_argument("--seeds", type=int, default=None, help=f"sampling seeds (default {FULL['seeds']})")
    parser.add_argument(
        "--num-samples", type=int, default=297, help="images per sample batch (the test split's size)"
    )
    parser.add_argument(
        "--ks", type=int, nargs="+", default=None, help="sampling steps K (default 10 25 50 100 1000)"
    )
    parser.add_argument("--out", default="runs/sampling_steps", help="output directory")
    parser.add_argument(
        "--docs",
        action="store_true",
        help=f"copy the figure to {DOCS_FIGURE.relative_to(DOCS_FIGURE.parents[2])}",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    preset = QUICK if args.quick else FULL
    steps = args.steps or preset["steps"]
    hidden = args.hidden or preset["hidden"]
    depth = preset["depth"] if args.depth is None else args.depth
    seeds = args.seeds or preset["seeds"]
    ks = sorted(args.ks or preset["ks"])
    if any(k < 1 or k > NUM_STEPS for k in ks):
        parser.error(f"--ks: expected values in 1..{NUM_STEPS}, got {ks}")
    if seeds < 2:
        parser.error("--seeds: a standard error needs at least 2 seeds")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    data = load_dataset("digits")
    train_images = data.train.float()
    results: dict = {
        "config": {
            "data": "digits",
            "num_steps": NUM_STEPS,
            "schedule": "log-snr (log SNR +7 → −9)",
            "network": f"MLPDenoiser((1, 8, 8), hidden={hidden}, depth={depth})",
            "diffusion": "GaussianDiffusion(mean='eps', variance='large', decoder='discretized', num_levels=17)",
            "steps": steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "sampling_seeds": seeds,
            "num_samples": args.num_samples,
            "ks": ks,
            "quick": args.quick,
            "torch": torch.__version__,
            "pyro": pyro.__version__,
        },
        "training": {},
        "test_bits_per_dim": {},
    }
    models = {}
    for name, (label, loss_class) in OBJECTIVES.items():
        pyro.clear_param_store()
        diffusion = build(name, hidden, depth, args.seed)
        start = time.perf_counter()
        history = train(
            diffusion, loss_class(), train_images, steps, args.batch_size, args.lr, args.seed, label
        )
        seconds = time.perf_counter() - start
        diffusion.eval()
        with torch.no_grad():
            bits = diffusion.nll(data.test.float())
        bpd_mean, bpd_se = mean_and_se(bits.tolist())
        every = max(1, steps // 200)
        results["training"][name] = {
            "loss": label,
            "seconds": seconds,
            "final_loss_per_image": float(np.mean(history[-max(1, steps // 20) :])),
            "history_every": every,
            "history": [float(np.mean(history[i : i + every])) for i in range(0, steps, every)],
        }
        results["test_bits_per_dim"][name] = {"mean": bpd_mean, "se": bpd_se}
        print(f"{label}: {seconds:.0f} s of training, test bound {bpd_mean:.3f} ± {bpd_se:.3f} bits/dim")
        models[name] = diffusion

    classifier = DigitsClassifier.fit(data.train, data.labels_train, epochs=30, seed=0)
    results["classifier_test_accuracy"] = classifier.accuracy(data.test, data.labels_test)
    evaluation, images = evaluate(models, data, classifier, ks, seeds, args.num_samples)
    results.update(evaluation)
    results["seconds"] = time.perf_counter() - started

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    path = figure(results, ks, out / "frechet_vs_steps.png")
    samples_figure(images, ks, out / "samples.png")
    if args.docs:
        DOCS_FIGURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_FIGURE)

    ref = results["reference"]
    print(f"\nFréchet distance to the {len(data.test)} test images (mean ± s.e. over {seeds} seeds; "
          f"training images: {ref['mean']:.2f} ± {ref['se']:.2f})")  # fmt: skip
    print("| model | sampler | " + " | ".join(f"K = {k}" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for name, (label, _) in OBJECTIVES.items():
        for method, method_label in SAMPLERS.items():
            rows = results["frechet"][name][method]
            cells = " | ".join(f"{rows[str(k)]['mean']:.2f} ± {rows[str(k)]['se']:.2f}" for k in ks)
            print(f"| {label} | {method_label} | {cells} |")
    print(f"\n{results['seconds']:.0f} s in all; results in {out}/")
    return results


if __name__ == "__main__":
    main()
