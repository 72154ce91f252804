"""Run the benchmarks and print one table: ``python -m benchmarks.run [--quick] [--device cuda]``.

Benchmarks (one module each; every one compares its variants side by side in one run):

* ``svi_step`` — a Pyro training step (SVI, ELBOModule) against the hand-written step.
* ``full_bound`` — all T terms of the bound, batched over steps, against one call per step.
* ``chain_cost`` — the sequential chain under ``TraceMeanField_ELBO`` as T grows, against
  the one-step estimator (DiffusionELBO); the per-step cost of Pyro's machinery in µs.
* ``sampling`` — ancestral sampling against a plain loop with the same network.

Every row has a peak-memory column (benchmark 5).  Columns: ``ms`` median time per call,
``ratio`` median paired ratio against the row's baseline (see ``benchmarks/common.py``),
``peak_MiB`` peak memory of one call above what was in use before it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

from . import chain_cost, full_bound, sampling, svi_step
from .common import Row

BENCHMARKS = {
    "svi_step": svi_step,
    "full_bound": full_bound,
    "chain_cost": chain_cost,
    "sampling": sampling,
}
HEADER = ["benchmark", "size", "variant", "ms", "ratio", "peak_MiB", "note"]


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    cells = [HEADER] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]
    lines = []
    for k, line in enumerate(cells):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def describe_machine(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (
        f"{platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPU cores · "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads) · {gpu}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller T lists")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(BENCHMARKS), default=None, help="run only these benchmarks"
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=["mlp2d", "digits", "unet32"],
        default=None,
        help="problem sizes (default: mlp2d digits on CPU, plus unet32 on CUDA)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time sampling with the denoiser under torch.compile (always on CUDA)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    sizes = tuple(args.sizes or (("mlp2d", "digits") + (("unet32",) if device.type == "cuda" else ())))
    names = args.only or list(BENCHMARKS)

    started = time.perf_counter()
    print(f"# pyro_diffusion benchmarks — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# {describe_machine(device)}")
    print(f"# command: python -m benchmarks.run {' '.join(argv if argv is not None else sys.argv[1:])}")
    rows: list[Row] = []
    for name in names:
        section_start = time.perf_counter()
        if name == "sampling":
            section = sampling.run(device, args.quick, sizes, compile_denoiser=args.compile)
        else:
            section = BENCHMARKS[name].run(device, args.quick, sizes)
        rows.extend(section)
        print(f"# {name}: {time.perf_counter() - section_start:.0f} s", file=sys.stderr, flush=True)
    print()
    print(format_table(rows))
    print(f"\n# total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
