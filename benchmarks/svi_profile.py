"""Where an ``SVI.step`` spends its time beyond the network's forward and backward pass.

``python -m benchmarks.svi_profile [--size mlp2d|digits] [--loss elbo|simple] [--device cpu|cuda]``
times, in µs per call (minimum over 5 repeats of ``--number`` calls, the least disturbed
figure), on the problem of ``benchmarks.svi_step`` (batch 128, T = 1000):

* ``hand-written forward+backward``: the plain-PyTorch loss of ``benchmarks.svi_step`` and
  its backward, no optimizer;
* ``Pyro loss forward+backward``: the same estimator through the Pyro loss
  (``loss.differentiable_loss(diffusion.model, diffusion.guide, x0)``, which records the
  guide under ``poutine.trace`` and the model under ``poutine.trace(poutine.replay(...))`` and
  reads the terms off the traces) and its backward;
* ``network forward`` / ``network forward+backward``: the denoiser alone on a batch of x_t;
* ``guide trace``, ``model trace (replay)``, ``trace_terms``: the three parts of the Pyro
  loss's forward pass, under ``torch.no_grad()`` (the model's includes the network);
* ``… network stubbed``: the two losses' forward+backward, and the Pyro programs, with the
  denoiser replaced by a stub returning a fixed output times a scalar parameter (so the
  backward pass still reaches a parameter): what each side costs *besides* the network;
* ``register()`` plain / under ``poutine.trace(param_only=True)``: entering the parameters
  in Pyro's param store, as each program does once per evaluation, and as ``SVI.step`` sees it
  when it captures the parameters;
* ``pyro.optim.Adam``: Pyro's optimizer step (one ``torch.optim.Adam`` per parameter tensor),
  against ``torch.optim.Adam`` (one optimizer over all parameters; torch's default
  implementation: a loop over the tensors on CPU, foreach kernels on CUDA);
* ``zero_grads`` (SVI: a fresh zero tensor per parameter) against ``Optimizer.zero_grad()``.

``--rounds N`` instead runs ``benchmarks.svi_step``'s ``plain``, ``svi``, ``module`` and
``module+store`` steps interleaved over N rounds and prints each ratio to ``plain`` with its
quartiles over rounds (a longer, steadier form of the benchmark's figure).

``--phases N`` instead times the statements of ``SVI.step`` one by one (the loss and its
backward under SVI's parameter capture, collecting the parameters, ``pyro.optim.Adam``,
``zero_grads``, ``.item()``) next to the ELBOModule step's (``zero_grad``, loss, backward,
``torch.optim.Adam``), alternating one step of each, and prints the median ms per step.

``--cprofile N`` instead runs N ``SVI.step`` calls under :mod:`cProfile` and prints where
the time goes, in ms per step: own time by group (the network's modules, autograd's
backward, the optimizer, Pyro, pyro_diffusion, torch.distributions), the cumulative time of
the calls that make up a step, and the top functions by own time; ``--stub`` with the
network replaced by :class:`NetworkStub`, so that the rest of the step stands out.  The
profiler's own cost inflates Python-heavy parts: read its figures as shares, and the timed
components above as the costs.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import sys
import timeit

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import zero_grads

from pyro_diffusion import StepDraw
from pyro_diffusion.losses import trace_terms

from .common import Problem, make_problem, sync
from .svi_step import DECODER, HandWrittenLoss, pyro_loss


def _problem(size, device):
    return make_problem(size, device, decoder=DECODER)


class NetworkStub(torch.nn.Module):
    """Returns a fixed output times a scalar parameter, whatever the input: a network that
    costs (almost) nothing, so that what remains of a step is the rest of it."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("output", output.detach().clone())
        self.weight = torch.nn.Parameter(torch.ones((), dtype=output.dtype, device=output.device))

    def forward(self, x, level):
        return self.output * self.weight


def profile(size: str, device: torch.device, number: int, loss_name: str = "elbo") -> list[tuple[str, float]]:
    pyro.clear_param_store()
    pyro.enable_validation(False)
    problem = _problem(size, device)
    diffusion, x0 = problem.diffusion, problem.x0
    params = list(diffusion.parameters())
    loss = pyro_loss(loss_name)
    hand = HandWrittenLoss(problem, loss_name)
    B = x0.shape[0]
    view = (B,) + (1,) * (x0.dim() - 1)
    t = torch.randint(1, hand.T + 1, (B,), device=device)
    x_t = hand.sqrt_ac[t - 1].view(view) * x0 + hand.sqrt_1m_ac[t - 1].view(view) * torch.randn_like(x0)
    level = hand.gamma[t - 1]

    def hand_forward_backward():
        hand(x0).backward()

    def forward_backward():
        loss.differentiable_loss(diffusion.model, diffusion.guide, x0).backward()

    def network_forward():
        with torch.no_grad():
            diffusion.denoiser(x_t, level)

    def network_forward_backward():
        diffusion.denoiser(x_t, level).sum().backward()

    def guide_trace():
        with torch.no_grad():
            draw = StepDraw()
            poutine.trace(diffusion.guide).get_trace(x0, steps=draw)
        return draw

    def model_trace():
        with torch.no_grad():
            draw = StepDraw()
            trace = poutine.trace(diffusion.guide).get_trace(x0, steps=draw)
            start = timeit.default_timer()
            poutine.trace(poutine.replay(diffusion.model, trace=trace)).get_trace(x0, steps=draw)
            return timeit.default_timer() - start

    with torch.no_grad():
        fixed_model, fixed_guide, _ = loss.traces(diffusion.model, diffusion.guide, (x0,), {})

    def read_terms():
        with torch.no_grad():
            trace_terms(fixed_model, fixed_guide)

    def register_traced():
        with poutine.trace(param_only=True) as capture:
            diffusion.register()
        return {site["value"].unconstrained() for site in capture.trace.nodes.values()}

    with torch.no_grad():
        output = diffusion.denoiser(x_t, level)
    stubbed = copy.deepcopy(diffusion)
    stubbed.name = "stubbed"
    stubbed.denoiser = NetworkStub(output)
    hand_stubbed = HandWrittenLoss(Problem(problem.name, stubbed, x0), loss_name)

    def hand_stubbed_forward_backward():
        hand_stubbed(x0).backward()

    def stubbed_forward_backward():
        loss.differentiable_loss(stubbed.model, stubbed.guide, x0).backward()

    def stubbed_programs():
        with torch.no_grad():
            loss.traces(stubbed.model, stubbed.guide, (x0,), {})

    forward_backward()  # registers, fills the gradients
    captured = register_traced()
    pyro_adam = pyro.optim.Adam({"lr": 1e-3})
    torch_adam = torch.optim.Adam(params, lr=1e-3)
    parts = {
        "hand-written forward+backward": hand_forward_backward,
        "Pyro loss forward+backward": forward_backward,
        "network forward": network_forward,
        "network forward+backward": network_forward_backward,
        "hand-written f+b, network stubbed": hand_stubbed_forward_backward,
        "Pyro loss f+b, network stubbed": stubbed_forward_backward,
        "both programs traced, stubbed": stubbed_programs,
        "guide trace": guide_trace,
        "model trace (replay)": None,  # timed inside, without the guide it replays
        "trace_terms": read_terms,
        "register()": diffusion.register,
        "register() under trace": register_traced,
        "pyro.optim.Adam step": lambda: pyro_adam(captured),
        "torch.optim.Adam step": torch_adam.step,
        "zero_grads (SVI)": lambda: zero_grads(captured),
        "zero_grad (torch)": lambda: torch_adam.zero_grad(set_to_none=False),
    }
    results = []
    for name, fn in parts.items():
        if fn is None:
            model_trace()
            best = min(sum(model_trace() for _ in range(number)) for _ in range(5)) / number
            results.append((name, best * 1e6))
            continue
        fn()

        def timed(fn=fn):
            fn()
            sync(device)

        best = min(timeit.repeat(timed, number=number, repeat=5)) / number
        results.append((name, best * 1e6))
    pyro.clear_param_store()
    return results


def phases(size: str, device: torch.device, steps: int, loss_name: str = "elbo") -> list[tuple[str, float]]:
    """Median ms per step of the phases of ``SVI.step`` (the same statements as Pyro's, timed
    one by one) and of the ELBOModule step with ``torch.optim.Adam``, alternating one step of
    each, ``steps`` times."""
    import statistics
    import time

    from .common import GuideModule, ModelModule

    pyro.clear_param_store()
    pyro.enable_validation(False)
    problem = _problem(size, device)
    x0 = problem.x0
    svi_diffusion = copy.deepcopy(problem.diffusion)
    module_diffusion = copy.deepcopy(problem.diffusion)
    module_diffusion.name = "module"
    loss = pyro_loss(loss_name)
    pyro_adam = pyro.optim.Adam({"lr": 1e-3})
    elbo_module = pyro_loss(loss_name)(ModelModule(module_diffusion), GuideModule(module_diffusion))
    torch_adam = torch.optim.Adam(elbo_module.parameters(), lr=1e-3)
    marks: dict[str, list[float]] = {}

    def mark(name, start):
        sync(device)
        now = time.perf_counter()
        marks.setdefault(name, []).append((now - start) * 1e3)
        return now

    for k in range(steps + 3):
        # SVI.step, statement by statement
        sync(device)
        start = begin = time.perf_counter()
        with poutine.trace(param_only=True) as param_capture:
            value = loss.loss_and_grads(svi_diffusion.model, svi_diffusion.guide, x0)
        start = mark("svi: loss_and_grads under param capture", start)
        params = {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}
        start = mark("svi: collect params", start)
        pyro_adam(params)
        start = mark("svi: pyro.optim.Adam", start)
        zero_grads(params)
        start = mark("svi: zero_grads", start)
        value.item()
        mark("svi: loss.item()", start)
        mark("svi: total", begin)
        # the ELBOModule step
        with pyro.settings.context(module_local_params=True):
            sync(device)
            start = begin = time.perf_counter()
            torch_adam.zero_grad()
            start = mark("module: zero_grad", start)
            value = elbo_module(x0)
            start = mark("module: loss forward", start)
            value.backward()
            start = mark("module: backward", start)
            torch_adam.step()
            mark("module: torch.optim.Adam", start)
            mark("module: total", begin)
        if k < 3:  # warm-up
            marks.clear()
    pyro.clear_param_store()
    return [(name, statistics.median(values)) for name, values in marks.items()]


def long_ab(size: str, device: torch.device, rounds: int, loss_name: str = "elbo") -> list[str]:
    """``benchmarks.svi_step``'s ``plain``, ``svi``, ``module`` and ``module+store`` steps,
    interleaved over ``rounds`` rounds (4 steps per block on the U-Nets, 20 on the MLP): the
    median paired ratio to ``plain`` with its quartiles over rounds, and the median ms."""
    import statistics

    from .common import interleaved
    from .svi_step import step_functions

    pyro.clear_param_store()
    pyro.enable_validation(False)
    problem = _problem(size, device)
    steps = step_functions(problem, loss_name)
    steps = {name: steps[name] for name in ("plain", "svi", "module", "module+store")}
    inner = 20 if size == "mlp2d" else 4
    times, _ = interleaved(steps, device, reps=rounds, inner=inner)
    lines = [f"plain: median {statistics.median(times['plain']):.2f} ms"]
    for name in ("svi", "module", "module+store"):
        ratios = [a / b for a, b in zip(times[name], times["plain"])]
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        lines.append(
            f"{name}: ratio {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f}), "
            f"median {statistics.median(times[name]):.2f} ms"
        )
    pyro.clear_param_store()
    return lines


#: cProfile groups: (label, test on the function's file name and function name)
GROUPS = (
    ("network (torch.nn modules' forward)", lambda f, n: "torch/nn/" in f),
    ("autograd backward", lambda f, n: "torch/autograd" in f or "run_backward" in n),
    ("optimizer (torch.optim)", lambda f, n: "torch/optim" in f),
    ("Pyro (pyro/)", lambda f, n: "/pyro/" in f and "/pyro_diffusion/" not in f),
    ("pyro_diffusion (its own code)", lambda f, n: "/pyro_diffusion/" in f),
    ("torch.distributions", lambda f, n: "torch/distributions" in f),
)


def cprofile_svi(
    size: str, device: torch.device, steps: int, loss_name: str = "elbo", top: int = 25, stub: bool = False
) -> None:
    """Run ``steps`` SVI steps under cProfile; print ms per step by group and the top
    functions by own time.  ``stub``: with the network replaced by :class:`NetworkStub`."""
    pyro.clear_param_store()
    pyro.enable_validation(False)
    problem = _problem(size, device)
    diffusion, x0 = problem.diffusion, problem.x0
    if stub:
        with torch.no_grad():
            level = torch.zeros(x0.shape[0], device=device)
            diffusion.denoiser = NetworkStub(diffusion.denoiser(x0, level))
    svi = SVI(diffusion.model, diffusion.guide, pyro.optim.Adam({"lr": 1e-3}), pyro_loss(loss_name))
    for _ in range(3):
        svi.step(x0)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        svi.step(x0)
    sync(device)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    own: dict[str, float] = {label: 0.0 for label, _ in GROUPS}
    own["other (builtins, C calls outside the groups)"] = 0.0
    for (filename, _line, name), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():
        for label, test in GROUPS:
            if test(filename, name):
                own[label] += tt
                break
        else:
            own["other (builtins, C calls outside the groups)"] += tt
    what = f"{size} on {device}, {loss_name}" + (", network stubbed" if stub else "")
    print(
        f"# cProfile of {steps} SVI steps, {what}: {total / steps * 1e3:.2f} ms per step (profiler included)"
    )
    print("# own time by group, ms per step (C functions count in 'other' unless called through a group")
    for label, value in own.items():
        print(f"{label:48s} {value / steps * 1e3:9.3f}")
    print("\n# cumulative time of selected calls, ms per step")
    wanted = {
        "step": "svi.py",
        "loss_and_grads": "losses.py",
        "traces": "losses.py",
        "per_datum": "losses.py",
        "trace_terms": "losses.py",
        "model": "diffusion.py",
        "guide": "diffusion.py",
        "register": "diffusion.py",
        "step_model": "chains.py",
        "step_guide": "chains.py",
        "levels": "chains.py",
        "denoise": "diffusion.py",
        "reverse_step": "diffusion.py",
        "decoder_distribution": "diffusion.py",
        "marginal": "diffusion.py",
        "forward_step": "diffusion.py",
        "__call__": "optim.py",
        "zero_grads": "util.py",
        "backward": "_tensor.py",
        "forward": "unet.py",
    }
    rows = []
    for (filename, _line, name), (_cc, nc, _tt, ct, _callers) in stats.stats.items():
        if name in wanted and filename.endswith(wanted[name]) and ("pyro" in filename or "torch" in filename):
            rows.append((ct / steps * 1e3, nc / steps, f"{filename.split('site-packages/')[-1]}:{name}"))
    for ct, calls, label in sorted(rows, reverse=True):
        print(f"{label:60s} {ct:9.3f} ms  ({calls:.0f} calls/step)")
    print(f"\n# top {top} functions by own time, ms per step")
    entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (filename, line, name), (_cc, nc, tt, ct, _callers) in entries:
        where = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        print(
            f"{tt / steps * 1e3:8.3f} own {ct / steps * 1e3:8.3f} cum {nc / steps:6.0f}/step  {where}:{line}({name})"
        )
    pyro.clear_param_store()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.svi_profile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", choices=("mlp2d", "digits", "unet32"), default="mlp2d")
    parser.add_argument("--loss", choices=("elbo", "simple"), default="elbo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--number", type=int, default=50, help="calls per repeat")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="profile N SVI steps instead")
    parser.add_argument("--rounds", type=int, default=0, metavar="N", help="a long interleaved A/B instead")
    parser.add_argument(
        "--phases", type=int, default=0, metavar="N", help="time the phases of N steps instead"
    )
    parser.add_argument("--stub", action="store_true", help="with --cprofile: the network replaced by a stub")
    parser.add_argument("--top", type=int, default=25, help="with --cprofile: how many functions to list")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if args.rounds:
        print(f"# {args.rounds} interleaved rounds, {args.size}, {args.loss}: ratio to the hand-written step")
        for line in long_ab(args.size, device, args.rounds, args.loss):
            print(line)
        return 0
    if args.phases:
        print(
            f"# phases of SVI.step and of the ELBOModule step, {args.size}, {args.loss}: median ms per step"
        )
        for name, ms in phases(args.size, device, args.phases, args.loss):
            print(f"{name:44s} {ms:9.3f}")
        return 0
    if args.cprofile:
        cprofile_svi(args.size, device, args.cprofile, args.loss, top=args.top, stub=args.stub)
        return 0
    print(
        f"# SVI step components, {args.size} on {device}, {args.loss}, µs per call (min of 5 × {args.number})"
    )
    for name, micros in profile(args.size, device, args.number, args.loss):
        print(f"{name:32s} {micros:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
