"""``pyro-diffusion``: train, sample, evaluate and compare from the command line.

::

    pyro-diffusion train    --data moons --objective elbo --steps 3000 --out runs/moons
    pyro-diffusion train    --out runs/moons --steps 6000 --resume     # continue the run
    pyro-diffusion evaluate --run runs/moons                            # test bits/dim
    pyro-diffusion sample   --run runs/moons --num 1000
    pyro-diffusion sample   --run runs/moons --num-steps 50 --sampler ddim   # 50 respaced levels
    pyro-diffusion compare  --data digits --quick --out runs/demo
    torchrun --standalone --nproc_per_node=2 -m pyro_diffusion.distributed --out runs/ddp   # train, DDP

The flags of ``train`` (and ``compare``) are generated from the fields of
:class:`~pyro_diffusion.training.TrainConfig` (:func:`add_config_flags`), their choices from
the registries; ``train`` runs the package's training engine, data-parallel when started by
``torchrun``.  Every subcommand explains its flags with ``--help``; see docs/cli.md.

A bad value, file or run directory ends the command with exit status 2 and one line
``pyro-diffusion CMD: error: --flag: what was expected``, before anything in a run directory
is changed; checkpoints are only read with ``weights_only=True`` (:mod:`~pyro_diffusion.runs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path

from . import runs
from .training import OBJECTIVES, TrainConfig

__all__ = ["main", "build_parser", "add_config_flags"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


_GROUP_TITLES = {
    "data": "data",
    "objective": "objective",
    "model": "model",
    "optimizer": "optimizer",
    "validation": "validation and checkpoint selection",
    "run": "run",
}


def _field_type(annotation) -> type:
    """``int`` for ``int`` and ``int | None`` (and so on)."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return options[0]


def _choices_help(registry) -> str:
    entries = [
        f"{name}: {entry.description}"
        for name, entry in registry.items()
        if getattr(entry, "description", "")
    ]
    return " (" + "; ".join(entries) + ")" if entries else ""


def add_config_flags(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of :class:`~pyro_diffusion.training.TrainConfig` (``--batch-size`` for
    ``batch_size``; ``--flag/--no-flag`` for a boolean), its type, choices (from the
    registries), help and default taken from the field.  Every flag defaults to None,
    "not given": the configuration's default, or the resumed run's value."""
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name in exclude:
            continue
        meta = field.metadata
        title = meta.get("group", "run")
        if title not in groups:
            groups[title] = parser.add_argument_group(_GROUP_TITLES.get(title, title))
        group = groups[title]
        kind = _field_type(hints[field.name])
        shown = meta.get("shown") if meta.get("shown") is not None else field.default
        text = meta.get("help", field.name)
        flag = "--" + field.name.replace("_", "-")
        options: dict = {"dest": field.name, "default": None}
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, help=f"{text} (default: {shown})", **options
            )
            continue
        if meta.get("choices") is not None:
            registry = meta["choices"]()
            options["choices"] = sorted(registry)
            text += _choices_help(registry) if isinstance(registry, dict) else ""
        group.add_argument(flag, type=kind, help=f"{text} (default: {shown})", **options)


def _config_from_args(args, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the defaults) with the configuration flags that were given."""
    values = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    return dataclasses.replace(base or TrainConfig(), **values)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``PROG: error: MESSAGE``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {runs.one_line(message, None)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-diffusion",
        description="Denoising diffusion models as Pyro programs: train on the full ELBO "
        "(or L_simple / hybrid), sample, evaluate the test NLL bound, compare objectives.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,evaluate,compare}")

    train = sub.add_parser(
        "train",
        help="train a diffusion into a run directory",
        description="Train the loss of the Pyro programs (Pyro's ELBOModule) with torch.optim.Adam in the "
        "package's training engine. Writes OUT/config.json, OUT/metrics.json, atomic checkpoints "
        "OUT/checkpoint.pt every --checkpoint-every steps, and figures (loss.png, samples.png, "
        "schedule.png). --resume continues exactly where the checkpoint stopped. Started by torchrun, "
        "it trains data-parallel (one process per GPU, --batch-size per process). Every flag below "
        "the first three sets a field of the run's configuration.",
    )
    train.add_argument("--out", required=True, help="run directory (created)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint; the configuration must match "
        "(only --steps, --device, --checkpoint-every, --progress, --log-every may change); unset flags "
        "are taken from the run",
    )
    train.add_argument("--evaluate", action="store_true", help="after training, also run `evaluate`")
    add_config_flags(train)

    sample = sub.add_parser(
        "sample",
        help="draw samples from a trained run",
        description="Sample a run's reverse chain (ancestral, or DDIM) on its own grid of noise levels or "
        "on K of them. Writes samples (.pt) and a figure (.png).",
    )
    sample.add_argument("--run", required=True, help="run directory written by `train`")
    sample.add_argument("--num", type=_positive_int, default=64, help="number of samples (default 64)")
    sample.add_argument(
        "--num-steps",
        type=_positive_int,
        default=None,
        metavar="K",
        help="sample on K noise levels (for a DDPM schedule, K evenly spaced levels of the model's own: "
        "respacing; default: the model's own T)",
    )
    sample.add_argument(
        "--sampler",
        choices=("ancestral", "ddim"),
        default="ancestral",
        help="ancestral: the model's reverse steps; ddim: DDIM with --eta (default ancestral)",
    )
    sample.add_argument(
        "--eta",
        type=_unit_interval,
        default=None,
        help="DDIM's η in [0, 1]: 0 deterministic (the default), 1 the posterior variance; only with --sampler ddim",
    )
    sample.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise (default 0)")
    sample.add_argument("--device", default=None, help="torch device (default: the run's)")
    sample.add_argument("--out", default=None, help="output file stem (default RUN/samples_seedS)")
    sample.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = sub.add_parser(
        "evaluate",
        help="test NLL bound (bits/dim) of a run",
        description="Evaluate −ELBO on the test split, in bits/dim, on the grid of the run's training loss: "
        "on a grid all its terms (decoder, per-step KLs, prior) once per test datum, with the per-step "
        "profile; in continuous time --num-times draws of the one-step estimator per datum. Writes it into "
        "RUN/metrics.json (and RUN/profile.png) and prints it.",
    )
    evaluate.add_argument("--run", required=True, help="run directory written by `train`")
    evaluate.add_argument(
        "--num-steps",
        type=int,
        default=None,
        metavar="K",
        help="the bound's grid: K levels, 0 continuous time (default: the grid of the run's training loss)",
    )
    evaluate.add_argument(
        "--num-times",
        type=_positive_int,
        default=None,
        help="draws per test datum of the continuous-time bound (default 100)",
    )
    evaluate.add_argument(
        "--importance-particles",
        type=_positive_int,
        default=None,
        metavar="M",
        help="instead, the importance-weighted bound with M whole trajectories of the chain per estimate "
        "(a tighter bound than the ELBO) on the grid of --num-steps levels (default: the model's own grid)",
    )
    evaluate.add_argument("--device", default=None, help="torch device (default: the run's)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    compare = sub.add_parser(
        "compare",
        help="compare objectives (full ELBO, importance-sampled ELBO, L_simple, hybrid) over seeds",
        description="Train the same network, schedule and budget with each objective and seed; "
        "report test bits/dim, sample quality, time; write OUT/results.{md,json} and figures. "
        "The configuration flags are those of `train` (default data: digits).",
    )
    compare.add_argument("--out", required=True, help="comparison directory (created; finished runs reused)")
    compare.add_argument(
        "--objectives",
        "--objective",
        nargs="+",
        choices=sorted(OBJECTIVES),
        default=["elbo", "elbo-is", "simple", "hybrid"],
        help="objectives to compare (default: elbo elbo-is simple hybrid)",
    )
    compare.add_argument(
        "--seeds", "--seed", nargs="+", type=int, default=None, help="seeds (default 0 1 2; --quick: 0 1)"
    )
    compare.add_argument(
        "--quick",
        action="store_true",
        help="a small comparison that runs in about a minute on a CPU: 1000 steps, T = 100, "
        "an MLP of width 128 and depth 2, 2 seeds (explicit flags still override)",
    )
    compare.add_argument("--samples", type=_positive_int, help="samples per run for quality metrics")
    compare.add_argument("--no-baselines", action="store_true", help="skip the categorical baselines")
    study = _schedule_study()
    compare.add_argument(
        "--vdm",
        nargs="+",
        default=None,
        metavar="CONFIG",
        help="also run the schedule study (fixed against learned γ = −log SNR, continuous time), written "
        f"to OUT/vdm: {', '.join(study.CONFIGS)} or linear:GMIN:GMAX (see docs/learned_schedules.md)",
    )
    compare.add_argument(
        "--vdm-recipe",
        choices=tuple(study.RECIPES),
        default="short",
        help="training recipe of the --vdm runs: 'short' (2,500 steps, plain decoder) or 'regularized' "
        "(the network decoder, checkpoints selected on 200 held-out images, EMA, weight decay, at most "
        "8,000 steps, tuned endpoints [−2, 4]: the recipe of the best results in docs/learned_schedules.md)",
    )
    add_config_flags(compare, exclude=("objective", "seed"))
    return parser


def _schedule_study():
    """The schedule study (imported here, for ``compare`` only: the core never imports the
    experiments)."""
    from .experiments import schedule_study

    return schedule_study


def _train(args) -> int:
    from .distributed import process_group
    from .engine import world
    from .training import CHECKPOINT, CONFIG, FINAL_LOSS_STEPS, evaluate_run, read_config, train

    out = runs.check_out(args.out, argument="--out")
    if not args.resume and (out / CHECKPOINT).exists():
        raise FileExistsError(
            f"--out: {out} already holds a checkpoint; add --resume to continue it or choose another --out"
        )
    base = TrainConfig()
    if args.resume and (out / CONFIG).exists():
        base = read_config(out, argument="--out")
    config = _config_from_args(args, base)
    with process_group():
        metrics = train(config, out, resume=args.resume)
        rank, world_size = world()
    if rank != 0:
        return 0
    where = f" on {world_size} processes" if world_size > 1 else ""
    unit = "nats per datum" if OBJECTIVES[config.objective].is_bound else "per datum"
    print(
        f"trained {metrics['steps']} steps{where} in {metrics['train_seconds']:.1f} s; "
        f"final loss {metrics['final_loss']:.5g} ({unit}, mean of the last {FINAL_LOSS_STEPS} steps, "
        f"as on the progress bar); weights: {metrics['selected']}"
    )
    if args.evaluate:
        metrics = evaluate_run(out, device=args.device, progress=config.progress)
        _print_bound(metrics)
    return 0


def _print_bound(metrics: dict) -> None:
    grid = metrics.get("test_num_steps")
    where = "continuous time" if grid == 0 else f"T = {grid}"
    draws = f", {metrics['test_num_times']} draws per datum" if "test_num_times" in metrics else ""
    print(
        f"test bits/dim: {metrics['test_bits_per_dim']:.4f} ± {metrics['test_bits_per_dim_se']:.4f} (se; "
        f"{where}{draws})"
    )


def _sample(args) -> int:
    import torch

    from . import plots
    from .training import load_run

    if args.eta is not None and args.sampler != "ddim":
        raise ValueError(f"--eta: only for --sampler ddim, got --sampler {args.sampler}")
    runs.check_seed(args.seed, argument="--seed")
    run = runs.check_run_dir(args.run, argument="--run")
    if args.out is not None:
        stem = runs.check_out(args.out, argument="--out")
        if stem.is_dir():
            raise ValueError(f"--out: {stem} is a directory; expected a file stem such as {stem / 'samples'}")
    else:
        stem = run / f"samples_seed{args.seed}"
    config, diffusion, dataset = load_run(run, args.device)
    runs.check_sample_count(args.num, diffusion.event_size, argument="--num")
    if args.num_steps is not None:
        diffusion.grid(args.num_steps)  # a grid the schedule cannot give is refused before sampling
    options = {"eta": args.eta or 0.0} if args.sampler == "ddim" else {}
    torch.manual_seed(args.seed)
    samples = diffusion.sample(
        args.num, num_steps=args.num_steps, method=args.sampler, progress=not args.no_progress, **options
    ).cpu()
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise runs.RunFileError(f"--out: cannot create {stem.parent}: {error.strerror or error}") from None
    runs.atomic_save(samples, stem.with_suffix(".pt"), argument="--out")
    if dataset.is_image:
        plots.sample_grid(samples[:64], stem.with_suffix(".png"))
    else:  # vectors of any dimension: the first two coordinates, or a histogram of one
        plots.scatter(
            {"held-out data": dataset.test[: args.num], "samples": samples}, stem.with_suffix(".png")
        )
    print(f"wrote {stem.with_suffix('.pt')} ({tuple(samples.shape)})")
    return 0


def _evaluate(args) -> int:
    from .training import evaluate_run

    if args.num_steps is not None and args.num_steps < 0:
        raise ValueError(f"--num-steps: expected K >= 1 or 0 (continuous time), got {args.num_steps}")
    if args.importance_particles is not None:
        if args.num_times is not None:
            raise ValueError(
                "--num-times: not an option of the importance-weighted bound (--importance-particles)"
            )
        if args.num_steps is not None and args.num_steps < 2:
            raise ValueError(
                f"--num-steps: the importance-weighted bound needs a grid of K >= 2 levels, got {args.num_steps}"
            )
    runs.check_run_dir(args.run, argument="--run")
    metrics = evaluate_run(
        args.run,
        device=args.device,
        num_steps=args.num_steps,
        num_times=args.num_times,
        importance_particles=args.importance_particles,
        progress=not args.no_progress,
    )
    if args.importance_particles is not None:
        print(
            f"test bits/dim, importance-weighted: {metrics['test_iw_bits_per_dim']:.4f} ± "
            f"{metrics['test_iw_bits_per_dim_se']:.4f} (se; T = {metrics['test_iw_num_steps']}, "
            f"{metrics['test_iw_particles']} trajectories per estimate)"
        )
        return 0
    _print_bound(metrics)
    return 0


def _compare(args) -> int:
    from .experiments.compare import QUICK, run_comparison

    runs.check_out(args.out, argument="--out")
    for seed in args.seeds or ():
        runs.check_seed(seed, argument="--seeds")
    study = _schedule_study() if args.vdm else None
    if args.vdm:  # before the long core comparison, not after it
        for name in args.vdm:
            try:
                study.check_config(name)
            except ValueError as error:
                raise ValueError(f"--vdm: {runs.one_line(error, None).split(': ', 1)[-1]}") from None
    base = TrainConfig(data="digits")
    if args.quick:
        base = dataclasses.replace(base, **QUICK)
    config = _config_from_args(args, base)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    run_comparison(
        config,
        args.out,
        objectives=args.objectives,
        seeds=seeds,
        num_samples=args.samples,
        baselines=not args.no_baselines,
        mixture_components=10 if args.quick else 50,
    )
    print(f"wrote {Path(args.out) / 'results.md'}")
    if args.vdm:
        study.run_vdm_comparison(
            args.vdm,
            seeds,
            Path(args.out) / "vdm",
            quick=args.quick,
            baselines=not args.no_baselines,
            recipe=args.vdm_recipe,
            progress=config.progress,
        )
        print(f"wrote {Path(args.out) / 'vdm' / 'results.md'}")
    return 0


_FIELD = re.compile(r"^([a-z_]+)(, [a-z_]+)*: ")


_ASSIGNED = re.compile(r"\b([a-z][a-z_]*)=(['\"]?)([\w.\-]+)\2")
_UNDERSCORED = re.compile(r"(?<![\w\-/.])([a-z]+(?:_[a-z]+)+)\b(?![(/.])")


def _flagged(message: str) -> str:
    """An error as the command line names things: a leading ``lr: ...`` becomes ``--lr: ...``,
    ``resume: ...`` becomes ``--resume: ...``, a configuration field written as a Python
    argument (``image_size=S``, ``num_levels``) becomes its flag (``--image-size S``,
    ``--num-levels``)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}

    def assigned(match: re.Match) -> str:
        name, value = match.group(1), match.group(3)
        if name not in fields:
            return match.group(0)
        flag = "--" + name.replace("_", "-")
        if isinstance(getattr(TrainConfig, name, None), bool) or value in ("True", "False"):
            return flag if value != "False" else "--no-" + name.replace("_", "-")
        return f"{flag} {value}"

    def bare(match: re.Match) -> str:
        name = match.group(1)
        return "--" + name.replace("_", "-") if name in fields else name

    head, rest = "", message
    match = _FIELD.match(message)
    names = match.group(0)[:-2].split(", ") if match else []
    if names and all(name in fields for name in names):
        head = ", ".join("--" + name.replace("_", "-") for name in names) + ": "
        rest = message[len(match.group(0)) :]
    elif message.startswith("resume: "):
        head, rest = "--resume: ", message[len("resume: ") :]
    rest = _UNDERSCORED.sub(bare, _ASSIGNED.sub(assigned, rest))
    return head + rest


def _error_message(error: BaseException) -> str:
    import torch

    if isinstance(error, FloatingPointError):
        return f"{error}; the checkpoint before it is kept (lower --lr, or clip with --clip-norm)"
    if isinstance(error, torch.cuda.OutOfMemoryError) or isinstance(error, MemoryError):
        return "out of memory; use a smaller --batch-size, --num or model"
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, FileExistsError)):
        where = f" {error.filename}" if error.filename else ""
        return f"cannot read or write{where}: {error.strerror or error}"
    return _flagged(runs.one_line(error, None))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pyro-diffusion``; returns the exit status.  Every error a user can
    cause (a bad flag value, data file, run directory or checkpoint, a run locked by another
    process, a full or read-only disk, a diverging loss) is one line on stderr and status 2."""
    import torch

    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": _train, "sample": _sample, "evaluate": _evaluate, "compare": _compare}
    try:
        return handlers[args.command](args)
    except (
        ValueError,
        OSError,
        FloatingPointError,
        MemoryError,
        torch.cuda.OutOfMemoryError,
    ) as error:
        print(f"pyro-diffusion {args.command}: error: {_error_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyro-diffusion {args.command}: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
