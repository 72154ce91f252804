"""The `pyro-diffusion` command line: every subcommand, `compare --quick`'s output, errors."""

import json
import math

import pytest
import torch

from pyro_diffusion.cli import build_parser, main
from pyro_diffusion.experiments.compare import parse_table

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


def test_errors_are_reported_clearly(tmp_path, capsys):
    assert main(["train", "--data", "nope", "--out", str(tmp_path / "x"), "--steps", "1"] + TINY) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "x"), "--objective", "bogus"])
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "x"), "--steps", "0"])


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
    assert "config" in capsys.readouterr().err
    assert not (refused / "elbo").exists()  # refused before the core comparison trained anything
