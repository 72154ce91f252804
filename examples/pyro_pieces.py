"""A diffusion model, piece by piece, for readers who know Pyro but not diffusion models.

    python examples/pyro_pieces.py            # 23–28 s on a shared 2-core CPU (1 thread, load 2–3.7)
    python examples/pyro_pieces.py --quick    # about 10 s on an idle 2-core machine

Read it top to bottom like a notebook: each ``# %%`` cell prints what it shows.  It writes
only ``--out``/pieces.json (default ``runs/pyro_pieces``): the numbers it prints.

1. The model is the reverse chain p_θ(x_{0:T}): latent sites x_T … x_1, observed x_0.
2. The guide is the forward (noising) chain q(x_{1:T} | x_0) over the same sites, with no
   parameters at all.
3. ``poutine.trace`` shows the sites, their distributions and shapes.
4. ``TraceMeanField_ELBO`` uses an analytic KL at each latent site; the per-site KLs add up
   (with the decoder term and the prior KL) to the bound that ``vlb_terms`` computes directly.
5. SVI trains it; the cheap one-step estimator (``DiffusionELBO``) estimates the same
   ELBO with one network call per datum instead of T.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from pyro.poutine.util import site_is_subsample
from tqdm.auto import trange

from pyro_diffusion import DiffusionELBO, GaussianDiffusion, MLPDenoiser, NoiseSchedule
from pyro_diffusion.chains import per_site_kl
from pyro_diffusion.data import load_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="200 SVI steps and 50 draws for the three-way check (about 10 s on an idle 2-core machine)",
    )
    parser.add_argument("--steps", type=int, default=None, help="SVI steps (default 1500; --quick: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument("--out", default="runs/pyro_pieces", help="where pieces.json goes")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar (default: on)"
    )
    args = parser.parse_args(argv)
    steps = args.steps or (200 if args.quick else 1500)
    repeats = 50 if args.quick else 500
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    torch.set_num_threads(1)

    # %% 1. Data and a small diffusion: T = 10 steps so that the traces stay readable.
    data = load_dataset("moons", num_train=2000, num_test=500)
    T = 10
    diffusion = GaussianDiffusion(MLPDenoiser(2, hidden=64, depth=2), NoiseSchedule.cosine(T), (2,))
    x0 = data.train[:4]
    print("x0, a batch of 4 two-dimensional points:", tuple(x0.shape))
    print("schedule:", diffusion.schedule)

    # %% 2. Trace the guide: q(x_{1:T} | x_0) in posterior order, x_T first.
    guide_trace = poutine.trace(diffusion.guide).get_trace(x0)
    print("\nguide sites (forward chain, posterior order):")
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            fn = site["fn"]
            print(
                f"  {name:5s} {type(getattr(fn, 'base_dist', fn)).__name__:8s} batch {tuple(fn.batch_shape)} event {tuple(fn.event_shape)}"
            )

    # %% 3. Replay the model against the guide's draws: p_θ(x_T) p_θ(x_{t-1} | x_t) … p_θ(x_0 | x_1).
    model_trace = poutine.trace(poutine.replay(diffusion.model, trace=guide_trace)).get_trace(x0)
    model_trace.compute_log_prob()
    print("\nmodel sites (reverse chain), log p per datum:")
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            kind = "observed" if site["is_observed"] else "latent"
            print(f"  {name:5s} {kind:8s} log p = {site['log_prob'].detach().numpy().round(2)}")

    # %% 4. Per-site KL(q ‖ p): what TraceMeanField_ELBO takes at each latent site.
    kls = per_site_kl(model_trace, guide_trace)
    print("\nper-site KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)) for the first datum, in nats:")
    for name, kl in kls.items():
        print(f"  {name:5s} {kl[0].item():9.4f}")
    decoder = -model_trace.nodes["x_0"]["log_prob"]
    single_draw = sum(kls.values()) + decoder
    print("−ELBO, one draw, per datum:", single_draw.detach().numpy().round(3))

    # %% 5. Train with SVI. DiffusionELBO: one t per datum, ℓ_t / r(t) + L_T, unbiased.
    svi = SVI(diffusion.model, diffusion.guide, Adam({"lr": 2e-3}), DiffusionELBO())
    g = torch.Generator().manual_seed(args.seed)
    bar = trange(1, steps + 1, desc="SVI", disable=not args.progress, leave=False)
    for step in bar:
        batch = data.train[torch.randint(len(data.train), (256,), generator=g)]
        loss = svi.step(batch) / 256
        if step % max(1, steps // 5) == 0:
            bar.write(f"  SVI step {step:5d}: −ELBO estimate {loss:8.3f} nats per datum")
    test_terms = diffusion.vlb_terms(data.test)
    nats = test_terms.sum(1).mean().item()
    print(f"\ntest −ELBO: {nats:.3f} nats = {nats / (2 * math.log(2)):.3f} bits/dim")
    print("where the bound spends its nats (L_0 decoder, L_1..L_{T-1} KLs, L_T prior):")
    print("  ", test_terms.mean(0).numpy().round(3))

    # %% 6. The same bound three ways, now that the numbers are small: term by term
    # (vlb_terms, one batched network call per step), TraceMeanField_ELBO (analytic KL per
    # site) and Trace_ELBO (Monte Carlo log p − log q). All are unbiased for the same −ELBO.
    torch.manual_seed(1)
    draws = diffusion.vlb_terms(x0.repeat(repeats, 1)).sum(1).reshape(repeats, 4).mean(1)
    print(
        f"\nmean −ELBO per datum of the 4 points: vlb_terms {draws.mean().item():.3f} "
        f"± {draws.std().item() / math.sqrt(repeats):.3f} (se, {repeats} draws)"
    )
    torch.manual_seed(2)
    tmf = TraceMeanField_ELBO(num_particles=repeats).loss(diffusion.model, diffusion.guide, x0) / 4
    mc = Trace_ELBO(num_particles=repeats).loss(diffusion.model, diffusion.guide, x0) / 4
    print(f"TraceMeanField_ELBO ({repeats} particles): {tmf:.3f};  Trace_ELBO: {mc:.3f} (higher variance)")

    # %% 7. The trained reverse chain is an ordinary Pyro model: sample it with Predictive.
    from pyro.infer import Predictive

    predictive = Predictive(diffusion.model, num_samples=1, return_sites=["x_0"])
    samples = predictive(None, num_samples=500)["x_0"][0]
    print(
        "\n500 samples from the model via pyro.infer.Predictive:",
        tuple(samples.shape),
        "mean",
        samples.mean(0).numpy().round(2),
        "(test data mean",
        data.test.mean(0).numpy().round(2),
        ")",
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "svi_steps": steps,
        "test_minus_elbo_nats": nats,
        "test_bits_per_dim": nats / (2 * math.log(2)),
        "test_terms_nats": test_terms.mean(0).tolist(),
        "check_draws": repeats,
        "vlb_terms": draws.mean().item(),
        "trace_mean_field_elbo": float(tmf),
        "trace_elbo": float(mc),
    }
    (out / "pieces.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out / 'pieces.json'}")


if __name__ == "__main__":
    main()
