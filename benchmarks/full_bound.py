"""Benchmark 2: all T = 1000 terms of the bound (bits/dim), batched over steps, against the
sequential one-network-call-per-step loop that reference implementations use.

Variants (same diffusion, same data):

* ``sequential``: ``vlb_terms(..., steps_per_call=1)`` — for t = 1..T one call of the
  network on the batch at step t, as in Improved DDPM's ``calc_bpd_loop``.  The baseline.
* ``batched``: ``vlb_terms(...)`` with the default chunks (``bound.CHUNK_ELEMENTS``).
* ``chunk=N`` (full run, smallest batch only): N steps per call, 8× fewer and 8× more than
  the default, to show where the default lies.

The ratio column is time(baseline) / time(variant): the speed-up.
"""

from __future__ import annotations

import functools

import torch

from pyro_diffusion import vlb_terms
from pyro_diffusion.bound import _default_chunk

from .common import Row, interleaved, make_problem, median, paired_ratio

NUM_STEPS = 1000


def run(device: torch.device, quick: bool, sizes: tuple[str, ...]) -> list[Row]:
    rows = []
    batches = {
        "mlp2d": (16, 256),
        "digits": (4,) if quick else (4, 16),
        "unet32": (16,) if quick else (16, 128),
    }
    for size in sizes:
        for batch in batches[size]:
            problem = make_problem(size, device, num_steps=NUM_STEPS, batch=batch)
            diffusion, x0 = problem.diffusion, problem.x0
            default = _default_chunk(batch, NUM_STEPS, 8192, diffusion.event_size, device)
            variants = {
                "sequential": functools.partial(vlb_terms, diffusion, x0, steps_per_call=1),
                "batched": functools.partial(vlb_terms, diffusion, x0),
            }
            if not quick and batch == batches[size][0]:
                for chunk in sorted({max(1, default // 8), default * 8}):
                    if chunk != default and chunk <= NUM_STEPS:
                        variants[f"chunk={chunk}"] = functools.partial(
                            vlb_terms, diffusion, x0, steps_per_call=chunk
                        )
            times, peaks = interleaved(variants, device, reps=3, inner=1, warmup=1)
            for variant in variants:
                speedup = None if variant == "sequential" else 1 / paired_ratio(times, variant, "sequential")
                note = f"B={batch}, T={NUM_STEPS}"
                if variant == "batched":
                    limit = 3.0 if device.type == "cpu" else 10.0
                    note += f", {default} steps/call; goal >= {limit:g}x: {'met' if speedup >= limit else 'MISSED'}"
                rows.append(
                    Row("full_bound", size, variant, median(times[variant]), speedup, peaks[variant], note)
                )
    return rows
