"""Benchmark 4: ancestral sampling throughput against a plain loop with the same network.

* ``plain``: the loop a practitioner writes — per-step coefficients precomputed as Python
  floats, ``x ← (x − β_t/√(1−ᾱ_t) ε_θ(x, γ_t)) / √α_t + σ_t z`` for t = T..2, the mean
  (rounded to the nearest level for K-level data) at t = 1.  The baseline.
* ``ancestral``: :func:`pyro_diffusion.sample` with ``method="ancestral"`` (what
  ``diffusion.sample`` runs): the model's reverse step between consecutive levels, its
  coefficients computed from the two levels at every step.
* ``compiled`` (``--compile`` only, or on CUDA): the same with the denoiser wrapped in
  ``torch.compile``.

``ms`` is per sampling call (n samples, T steps); the ratio column is throughput (samples/s)
relative to ``plain``, so > 1 is faster.
"""

from __future__ import annotations

import copy
import functools

import torch

from pyro_diffusion import sample

from .common import Row, interleaved, make_problem, median, paired_ratio

SETTINGS = {  # size: (num_samples, T) for --quick, and for the full run
    "mlp2d": ((256, 1000), (512, 1000)),
    "digits": ((32, 100), (64, 200)),
    "unet32": ((64, 250), (64, 1000)),
}


@torch.no_grad()
def plain_sample(
    net, schedule, num_samples: int, event_shape, num_levels: int | None, device
) -> torch.Tensor:
    """Ancestral sampling as a plain PyTorch loop (ε-prediction, σ_t² = β_t, decoder mean)."""
    T = schedule.num_steps
    betas = schedule.betas
    abar = schedule.alphas_cumprod
    inv_sqrt_alpha = (1 / (1 - betas).sqrt()).tolist()
    eps_coef = (betas / (1 - abar).sqrt()).tolist()
    sigma = betas.sqrt().tolist()
    levels = schedule.gammas.to(device=device, dtype=torch.float32)
    x = torch.randn((num_samples, *event_shape), device=device)
    for t in range(T, 0, -1):
        mean = (x - eps_coef[t - 1] * net(x, levels[t - 1].expand(num_samples))) * inv_sqrt_alpha[t - 1]
        x = mean + sigma[t - 1] * torch.randn_like(x) if t > 1 else mean
    if num_levels:
        k = num_levels - 1
        x = torch.round((x.clamp(-1, 1) + 1) / 2 * k) / k * 2 - 1
    return x


def run(
    device: torch.device, quick: bool, sizes: tuple[str, ...], compile_denoiser: bool = False
) -> list[Row]:
    rows = []
    for size in sizes:
        num_samples, T = SETTINGS[size][0 if quick else 1]
        problem = make_problem(size, device, num_steps=T)
        diffusion = problem.diffusion
        variants = {
            "plain": functools.partial(
                plain_sample,
                diffusion.denoiser,
                diffusion.schedule,
                num_samples,
                diffusion.event_shape,
                diffusion.num_levels,
                device,
            ),
            "ancestral": functools.partial(sample, diffusion, num_samples, method="ancestral"),
        }
        if compile_denoiser or device.type == "cuda":
            compiled = copy.deepcopy(diffusion)
            compiled.denoiser = torch.compile(compiled.denoiser)
            variants["compiled"] = functools.partial(sample, compiled, num_samples, method="ancestral")
        times, peaks = interleaved(variants, device, reps=3 if quick else 7, inner=1, warmup=1)
        for variant in variants:
            ratio = None if variant == "plain" else 1 / paired_ratio(times, variant, "plain")
            ms = median(times[variant])
            note = f"n={num_samples}, T={T}, {num_samples / ms * 1e3:.0f} samples/s"
            if variant == "ancestral":
                note += f"; goal >= 1.0x: {'met' if ratio >= 1.0 else 'MISSED'}"
            rows.append(Row("sampling", size, variant, ms, ratio, peaks[variant], note))
    return rows
