"""Where an ``SVI.step`` spends its time beyond the forward and backward pass.

``python -m benchmarks.svi_profile [--size mlp2d|digits] [--device cpu|cuda]`` times, in µs
per call (minimum over 5 repeats of ``--number`` calls, so the least disturbed figure):

* ``forward+backward``: the step-subsampled loss and its backward, no optimizer;
* ``register``: ``diffusion.register()`` (``pyro.module`` over every parameter), plain;
* ``register under trace``: the same inside ``poutine.trace(param_only=True)``, as
  ``SVI.step`` runs it to find the parameters;
* ``pyro.optim.Adam``: Pyro's optimizer step (one ``torch.optim.Adam`` per parameter tensor);
* ``torch.optim.Adam``: one ``torch.optim.Adam`` over all parameters (torch's default
  implementation: a loop over the tensors on CPU, foreach kernels on CUDA);
* ``FusedAdam``: :class:`pyro_diffusion.FusedAdam`, the same inside a ``PyroOptim`` (here
  keeping the gradients, so that every repeat steps);
* ``zero_grads``: ``pyro.infer.util.zero_grads`` (a fresh zero tensor per parameter), as SVI
  does after each step, against ``Optimizer.zero_grad()``.
"""

from __future__ import annotations

import argparse
import sys
import timeit

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer.util import zero_grads

from pyro_diffusion import FusedAdam, StepSubsampledELBO

from .common import make_problem, sync


def profile(size: str, device: torch.device, number: int) -> list[tuple[str, float]]:
    pyro.clear_param_store()
    pyro.enable_validation(False)
    problem = make_problem(size, device)
    diffusion, x0 = problem.diffusion, problem.x0
    params = list(diffusion.parameters())
    loss = StepSubsampledELBO()

    def forward_backward():
        loss.differentiable_loss(diffusion.model, diffusion.guide, x0).backward()

    def register_traced():
        with poutine.trace(param_only=True) as capture:
            diffusion.register()
        return {site["value"].unconstrained() for site in capture.trace.nodes.values()}

    forward_backward()  # registers, fills the gradients
    captured = register_traced()
    pyro_adam = pyro.optim.Adam({"lr": 1e-3})
    torch_adam = torch.optim.Adam(params, lr=1e-3)
    fused_adam = FusedAdam({"lr": 1e-3}, set_grads_to_none=False)  # timed again and again
    parts = {
        "forward+backward": forward_backward,
        "register": diffusion.register,
        "register under trace": register_traced,
        "pyro.optim.Adam": lambda: pyro_adam(captured),
        "torch.optim.Adam": torch_adam.step,
        "FusedAdam": lambda: fused_adam(captured),
        "zero_grads (SVI)": lambda: zero_grads(captured),
        "zero_grad (torch)": lambda: torch_adam.zero_grad(set_to_none=False),
    }
    results = []
    for name, fn in parts.items():
        fn()

        def timed(fn=fn):
            fn()
            sync(device)

        best = min(timeit.repeat(timed, number=number, repeat=5)) / number
        results.append((name, best * 1e6))
    pyro.clear_param_store()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.svi_profile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", choices=("mlp2d", "digits", "unet32"), default="mlp2d")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--number", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    print(f"# SVI step components, {args.size} on {device}, µs per call (min of 5 × {args.number})")
    for name, micros in profile(args.size, device, args.number):
        print(f"{name:24s} {micros:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
