"""The `pyro-diffusion` command line: every subcommand, `compare --quick`'s output, errors,
flags generated from the configuration, every model kind from `train`, the documented
learned-schedule command, and reloading a run in another process."""

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_diffusion.cli import build_parser, main
from pyro_diffusion.experiments import schedule_study as ex
from pyro_diffusion.experiments.compare import parse_table
from pyro_diffusion.training import OBJECTIVES, Objective, TrainConfig, load_model

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--num-steps", "20", "--hidden", "16", "--depth", "1", "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def quick_compare(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    status = main(
        ["compare", "--quick", "--data", "digits", "--steps", "20", "--samples", "100", "--out", str(out)]
        + ["--num-steps", "25", "--no-progress"]
    )
    return status, out


def test_compare_quick_writes_files_and_a_table_that_parses(quick_compare):
    status, out = quick_compare
    assert status == 0
    for name in ("results.md", "results.json", "loss_curves.png", "profile.png", "forward_chain.png"):
        assert (out / name).stat().st_size > 500, name
    objectives = ["elbo", "elbo-is", "simple", "hybrid"]
    for objective in objectives:
        assert (out / f"samples_{objective}.png").exists()
        for seed in (0, 1):
            assert (out / objective / f"seed{seed}" / "checkpoint.pt").exists()
            for figure in ("loss.png", "samples.png", "schedule.png", "profile.png"):  # as docs/cli.md says
                assert (out / objective / f"seed{seed}" / figure).stat().st_size > 500, (objective, figure)
    results = json.loads((out / "results.json").read_text())
    rows = parse_table((out / "results.md").read_text().split("\n\n")[2])
    assert list(rows)[:4] == objectives
    assert {"baseline: pixel_categorical", "baseline: categorical_mixture"} <= set(rows)
    for objective in objectives:
        cells = rows[objective]
        mean, sd = (float(v) for v in cells[0].split("±"))  # test bits/dim, mean ± sd over 2 seeds
        assert math.isfinite(mean) and math.isfinite(sd) and mean > 0
        assert mean == pytest.approx(results["runs"][objective]["test_bits_per_dim"][0], abs=1e-4)
        assert all(math.isfinite(float(c.split("±")[0])) for c in cells[:-1])
        assert int(cells[-1]) == 20
        assert len(results["runs"][objective]["profile_bits"]) == 26  # T + 1 terms, T = 25
    # the baselines are real models of the 17-level digits: well below log2(17) = 4.09 bits/dim
    pixel = results["baselines"]["pixel_categorical"]["bits_per_dim"]
    assert 2.0 < pixel < math.log2(17)


def test_compare_reuses_finished_runs(quick_compare, capsys):
    _, out = quick_compare
    before = (out / "elbo" / "seed0" / "checkpoint.pt").stat().st_mtime_ns
    status = main(
        ["compare", "--quick", "--data", "digits", "--steps", "20", "--samples", "100", "--out", str(out)]
        + ["--num-steps", "25", "--objectives", "elbo", "--seeds", "0", "--no-baselines", "--no-progress"]
    )
    assert status == 0
    assert (out / "elbo" / "seed0" / "checkpoint.pt").stat().st_mtime_ns == before
    assert "training" not in capsys.readouterr().out


def test_train_evaluate_sample_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            ["train", "--data", "moons", "--steps", "12", "--out", str(run), "--checkpoint-every", "5"] + TINY
        )
        == 0
    )
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['test_bits_per_dim']:.4f}" in printed
    assert len(metrics["test_profile_bits"]) == 21
    assert sum(metrics["test_profile_bits"]) == pytest.approx(metrics["test_bits_per_dim"], rel=1e-9)
    assert main(["sample", "--run", str(run), "--num", "10", "--no-progress"]) == 0
    samples = torch.load(run / "samples_seed0.pt", weights_only=True)
    assert samples.shape == (10, 2) and torch.isfinite(samples).all()
    # fewer noise levels (respaced), DDIM with and without noise
    for extra in (
        ["--num-steps", "5"],
        ["--sampler", "ddim", "--num-steps", "7"],
        ["--sampler", "ddim", "--eta", "0.5"],
    ):
        out = tmp_path / ("samples_" + "_".join(extra).replace("-", ""))
        assert (
            main(["sample", "--run", str(run), "--num", "6", "--no-progress", "--out", str(out)] + extra) == 0
        )
        drawn = torch.load(out.with_suffix(".pt"), weights_only=True)
        assert drawn.shape == (6, 2) and torch.isfinite(drawn).all()
    first = tmp_path / "ddim_a"
    second = tmp_path / "ddim_b"
    for out in (first, second):  # η = 0 is deterministic given the starting noise (the seed)
        main(
            [
                "sample",
                "--run",
                str(run),
                "--num",
                "4",
                "--sampler",
                "ddim",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
    assert torch.equal(torch.load(first.with_suffix(".pt")), torch.load(second.with_suffix(".pt")))
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--eta", "0.5", "--no-progress"]) == 2
    assert "--eta: only for --sampler ddim" in capsys.readouterr().err
    # resume with more steps: flags not given are taken from the run
    assert main(["train", "--out", str(run), "--steps", "15", "--resume", "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 15
    # a changed configuration is refused, with exit status 2 and a message naming the field
    status = main(["train", "--out", str(run), "--steps", "20", "--resume", "--lr", "0.1", "--no-progress"])
    assert status == 2
    assert "lr: checkpoint has 0.001, asked for 0.1" in capsys.readouterr().err


def test_messages_name_flags_and_say_which_loss_is_printed(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "moons", "--steps", "3", "--out", str(run)] + TINY) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    # one definition of the loss: the progress bar's running mean of the last 50 per-datum losses
    assert metrics["final_loss"] == pytest.approx(sum(metrics["loss_history"][-50:]) / 3)
    assert f"final loss {metrics['final_loss']:.5g} (nats per datum, mean of the last 50 steps" in printed
    assert main(["train", "--data", "moons", "--steps", "3", "--out", str(run)] + TINY) == 2
    err = capsys.readouterr().err
    assert "add --resume to continue it" in err and "resume=True" not in err and err.count("\n") == 1
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.1"] + TINY) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-diffusion train: error: --resume: the checkpoint in"), err
    # Python argument names in library messages come out as flags
    status = main(["train", "--data", "moons", "--out", str(tmp_path / "y"), "--image-size", "8"] + TINY)
    assert status == 2 and "--image-size: only for an image folder" in capsys.readouterr().err


def test_errors_are_reported_clearly(tmp_path, capsys):
    assert main(["train", "--data", "nope", "--out", str(tmp_path / "x"), "--steps", "1"] + TINY) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "x"), "--objective", "bogus"])
    # values are checked by the configuration: one line naming the field, exit status 2
    assert main(["train", "--out", str(tmp_path / "x"), "--steps", "0"]) == 2
    assert "steps: expected a positive integer, got 0" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--eval-every", "5"]) == 2
    assert "--eval-every: checkpoint selection needs a validation split" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--schedule", "linear", "--freeze-endpoints"]) == 2
    assert "--freeze-endpoints: not an option of schedule 'linear'" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "x"), "--num-steps", "-1"]) == 2
    assert "--num-steps" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


@pytest.mark.parametrize("command", ["train", "sample", "evaluate", "compare"])
def test_help_explains_every_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings} has no help"
        for option in action.option_strings:
            assert option in text
    if command in ("train", "compare"):
        for flag in ("--data", "--steps", "--seed", "--device", "--out"):
            assert flag in text


def test_compare_runs_the_vdm_configurations_with_a_recipe(tmp_path, capsys):
    out = tmp_path / "compare"
    common = ["compare", "--quick", "--data", "digits", "--steps", "5", "--num-steps", "10", "--seeds", "0"]
    common += ["--objectives", "elbo", "--no-baselines", "--no-progress", "--out", str(out)]
    status = main(common + ["--vdm", "learned-shape", "linear:-1:3", "--vdm-recipe", "regularized"])
    assert status == 0
    for config, endpoints in (("learned-shape", (-2.0, 4.0)), ("linear:-1:3", (-1.0, 3.0))):
        result = json.loads((out / "vdm" / f"{config}_seed0.json").read_text())
        assert result["decoder"] == "network" and result["val_size"] == 200 and result["ema"] == 0.999
        assert result["steps"] == 150 and result["best_step"] == 150  # --quick over the recipe
        assert (result["gamma_min"], result["gamma_max"]) == pytest.approx(endpoints, abs=1e-9)
    assert "learned-shape" in (out / "vdm" / "results.md").read_text()
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main(common[:-1] + [str(refused), "--vdm", "linear:3:1"]) == 2
    assert "--vdm: expected one of" in capsys.readouterr().err
    assert not (refused / "elbo").exists()  # refused before the core comparison trained anything


def _subparser(command):
    return build_parser()._subparsers._group_actions[0].choices[command]


def test_train_flags_are_the_configuration_fields_with_registry_choices(monkeypatch):
    train = _subparser("train")
    by_dest = {a.dest: a for a in train._actions}
    for field in dataclasses.fields(TrainConfig):
        action = by_dest[field.name]  # one flag per field, nothing kept by hand
        assert action.option_strings[0] == "--" + field.name.replace("_", "-")
        assert action.default is None and action.help
    assert set(by_dest) - {f.name for f in dataclasses.fields(TrainConfig)} == {
        "help",
        "out",
        "resume",
        "evaluate",
    }
    assert by_dest["schedule"].choices == sorted(
        ["linear", "cosine", "log-snr", "gamma-linear", "gamma-cosine", "learned", "learned-multivariate"]
    )
    assert set(by_dest["decoder"].choices) >= {"plain", "network", "ddpm"}
    assert set(by_dest["mean"].choices) >= {"eps", "x0", "v"}
    # an entry another module adds to a registry becomes a choice
    monkeypatch.setitem(OBJECTIVES, "mine", Objective(OBJECTIVES["elbo"].make_loss, description="my loss"))
    assert "mine" in {a.dest: a for a in _subparser("train")._actions}["objective"].choices
    compare = {a.dest for a in _subparser("compare")._actions}
    assert "objective" not in compare and "seed" not in compare and {"objectives", "seeds", "ema"} <= compare


def test_every_model_kind_trains_from_the_cli_and_reloads_in_another_process(tmp_path, capsys):
    """A learned schedule in continuous time, the network decoder, v-prediction, an EMA and
    validation selection, all as `train` flags; `evaluate` and `sample` read the run; the
    stored configuration rebuilds the model in a fresh process with `load_model`."""
    run = tmp_path / "learned"
    flags = ["--data", "digits", "--schedule", "learned", "--gamma-min", "-2", "--gamma-max", "4"]
    flags += [
        "--schedule-hidden",
        "8",
        "--loss-steps",
        "0",
        "--times",
        "low-discrepancy",
        "--decoder",
        "network",
    ]
    flags += ["--variance", "small", "--mean", "v", "--ema", "0.9", "--val-size", "40", "--eval-every", "3"]
    flags += ["--val-times", "2", "--steps", "6", "--batch-size", "16", "--hidden", "16", "--depth", "1"]
    assert main(["train", "--out", str(run), "--no-progress", *flags]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selected"] == "best" and metrics["best_step"] in (3, 6)
    assert [row[0] for row in metrics["val_history"]] == [3, 6]
    assert (run / "schedule.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--num-times", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "continuous time, 3 draws per datum" in captured.out and "bound" not in captured.err
    assert main(["evaluate", "--run", str(run), "--num-times", "3"]) == 0  # continuous time: a bar too
    assert "bound" in capsys.readouterr().err
    evaluated = json.loads((run / "metrics.json").read_text())
    assert evaluated["test_num_steps"] == 0 and math.isfinite(evaluated["test_bits_per_dim"])
    assert main(["evaluate", "--run", str(run), "--num-steps", "20", "--no-progress"]) == 0
    assert len(json.loads((run / "metrics.json").read_text())["test_profile_bits"]) == 21  # T + 1 terms
    assert main(["sample", "--run", str(run), "--num", "4", "--num-steps", "10", "--no-progress"]) == 0
    model = load_model(run)
    assert model.mean == "v" and model.decoder == "network" and model.schedule.in_bias.numel() == 8
    assert (model.schedule.gamma_min.item(), model.schedule.gamma_max.item()) != (-2.0, 4.0)  # learned
    torch.manual_seed(0)
    here = model.nll(torch.zeros(2, 1, 8, 8), num_steps=10).tolist()
    code = (
        "import torch; from pyro_diffusion.training import load_model; "
        f"m = load_model({str(run)!r}); torch.manual_seed(0); "
        "print(m.nll(torch.zeros(2, 1, 8, 8), num_steps=10).tolist())"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(there) == here


def _documented_command(page: str) -> list[str]:
    text = (ROOT / "docs" / page).read_text()
    block = re.search(r"```\n(pyro-diffusion train --out runs/learned-shape .*?)\n```", text, re.S)
    assert block, f"docs/{page}: no `pyro-diffusion train --out runs/learned-shape` block"
    return block.group(1).replace("\\\n", " ").split("\n")[0].split()


def test_the_documented_learned_schedule_command_is_the_studys_best_configuration():
    recipe = {k: v for k, v in ex.RECIPES["regularized"].items() if k != "eval_times"}
    expected = ex.study_config("learned-shape", **recipe).flags()
    command = _documented_command("cli.md")
    assert command[:4] == ["pyro-diffusion", "train", "--out", "runs/learned-shape"]
    assert command[4:] == expected


def test_train_with_the_study_flags_reproduces_the_studys_result(tmp_path, capsys):
    """The study's configuration trained by `pyro-diffusion train` and measured by
    `pyro-diffusion evaluate` gives the study's own test bound, to the last digit."""
    settings = dict(steps=6, hidden=8, depth=1, val_size=40, eval_every=3, val_times=2, ema=0.9)
    settings.update(weight_decay=1.0, decoder="network", tuned=(-2.0, 4.0))
    result = ex.train_and_evaluate("learned-shape", eval_times=3, eval_steps=(), **settings)
    flags = ex.study_config("learned-shape", **settings).flags()
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *flags]) == 0
    assert main(["evaluate", "--run", str(run), "--num-times", "3", "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_step"] == result["best_step"]
    assert metrics["val_history"] == [list(row) for row in result["val_history"]]
    assert metrics["test_bits_per_dim"] == result["test_bpd_continuous"]
    assert metrics["test_bits_per_dim_se"] == result["test_bpd_continuous_se"]


def test_figures_read_right_outliers_negative_terms_and_units(tmp_path, monkeypatch):
    """samples.png's axes follow the bulk of the points (quantiles), a negative decoder term is
    drawn below zero on a signed axis (not clipped to ~1e-7 on a log one), every axis has units."""
    import matplotlib.pyplot as plt

    from pyro_diffusion import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or Path(path))
    points = torch.randn(1000, 2)
    outliers = points.clone()
    outliers[:3] = 1e4
    plots.scatter({"held-out data": points, "samples": outliers}, tmp_path / "s.png")
    ax = figures[-1].axes[1]
    assert ax.get_xlim()[1] < 10 and ax.get_ylim()[1] < 10  # not squashed by the three outliers
    outside = int(re.search(r"(\d+) of 1000 outside the axes", ax.get_title()).group(1))
    assert 3 <= outside <= 30  # the outliers and the far tail of the bulk are counted, not drawn
    assert "[data units]" in ax.get_xlabel() and "[data units]" in ax.get_ylabel()
    plots.term_profile({"elbo": [-2.5] + [0.01] * 19 + [1e-5]}, tmp_path / "p.png")
    left = figures[-1].axes[0]
    assert left.get_yscale() == "symlog" and left.get_ylim()[0] < -2
    assert all("bits/dim" in a.get_ylabel() for a in figures[-1].axes)
    plots.term_profile({"elbo": [0.5] + [0.01] * 20}, tmp_path / "q.png")
    assert figures[-1].axes[0].get_yscale() == "log"
    plots.loss_curves({"elbo": [3.0] * 100, "simple": [0.5] * 100}, tmp_path / "l.png")
    assert "[nats]" in figures[-1].axes[0].get_ylabel() and "per datum" in figures[-1].axes[1].get_ylabel()
    for fig in figures:
        plt.close(fig)
