"""Data-parallel training: two CPU processes with gloo against one process on the combined batch.

Each replica draws its steps t and noise ε from its own seed; the single-process reference
draws the same numbers for the same half of the batch, so all three compute the same loss
terms and the only differences are DDP's gradient all-reduce and the scaling of the loss.
Float64 throughout, so agreement is checked to 1e-10 relative; a factor-of-2 error in the
scaling (DDP averages, the losses sum) would miss by far more.  SGD makes the update
proportional to the gradient (Adam's first step is ≈ lr·sign(g) and would hide a scale
error); a second run with Adam checks the documented optimizer path too.
"""

from __future__ import annotations

import datetime
import json
import math
import os

import pyro
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from pyro_diffusion import Diffusion, DiffusionELBO, GaussianDiffusion, MLPDenoiser, NoiseSchedule
from pyro_diffusion.distributed import data_parallel_module, data_parallel_step
from pyro_diffusion.training import elbo_module

WORLD = 2
LOCAL_BATCH = 8
# (reduction, optimizer) pairs run one after the other on the same replicas
PLAN = [("sum", "sgd"), ("mean", "sgd"), ("mean", "adam")]


def _diffusion() -> Diffusion:
    torch.manual_seed(0)
    net = MLPDenoiser(2, hidden=16, depth=1).double()
    return GaussianDiffusion(net, NoiseSchedule.linear(50), (2,))


def _data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * LOCAL_BATCH, 2, generator=generator, dtype=torch.float64)


def _optimizer(kind: str, params):
    return torch.optim.SGD(params, lr=0.05) if kind == "sgd" else torch.optim.Adam(params, lr=0.05)


def _seed(step: int, rank: int) -> int:
    return 1000 * step + rank


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        pyro.clear_param_store()
        diffusion = _diffusion()
        if rank == 1:  # DDP must broadcast rank 0's weights at construction
            with torch.no_grad():
                for p in diffusion.parameters():
                    p.add_(1.0)
        module = data_parallel_module(diffusion, DiffusionELBO())
        x0 = _data()[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
        states = []
        for step, (reduction, kind) in enumerate(PLAN):
            optimizer = _optimizer(kind, module.parameters())
            torch.manual_seed(_seed(step, rank))
            data_parallel_step(module, optimizer, x0, reduction=reduction)
            states.append([p.detach().clone() for p in diffusion.parameters()])
        torch.save(states, os.path.join(out_dir, f"rank{rank}.pt"))
        # both ranks done before either tears down gloo: a rank that destroys its group while
        # the other is still inside a collective can abort the other process
        torch_dist.barrier()
    finally:
        torch_dist.destroy_process_group()


def _reference() -> list[list[torch.Tensor]]:
    """The same steps in one process on the combined batch (the loss summed over it)."""
    pyro.clear_param_store()
    diffusion = _diffusion()
    module = elbo_module(diffusion, DiffusionELBO())
    x0 = _data()
    states = []
    for step, (reduction, kind) in enumerate(PLAN):
        optimizer = _optimizer(kind, module.parameters())
        optimizer.zero_grad()
        total = 0.0
        for rank in range(WORLD):
            torch.manual_seed(_seed(step, rank))
            total = total + module(x0[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH])
        loss = total if reduction == "sum" else total / x0.shape[0]
        loss.backward()
        optimizer.step()
        states.append([p.detach().clone() for p in diffusion.parameters()])
    assert len(pyro.get_param_store()) == 0  # the programs ran with module-local parameters
    return states


@pytest.mark.skipif(not torch_dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_replicas_match_a_single_process_step(tmp_path):
    init_file = str(tmp_path / "rendezvous")
    mp.start_processes(_worker, args=(init_file, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    replicas = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    reference = _reference()
    initial = list(_diffusion().parameters())
    for step, (reduction, kind) in enumerate(PLAN):
        label = f"step {step} ({reduction}, {kind})"
        for a, b in zip(replicas[0][step], replicas[1][step]):
            assert torch.equal(a, b), f"{label}: replicas differ"
        for a, ref in zip(replicas[0][step], reference[step]):
            torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12, msg=lambda m, s=label: f"{s}: {m}")
        previous = initial if step == 0 else reference[step - 1]
        moved = max((ref - p).abs().max().item() for ref, p in zip(reference[step], previous))
        assert moved > 1e-4, f"{label}: the reference step did not move the parameters"


def test_data_parallel_step_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="init_process_group"):
        data_parallel_module(_diffusion())
    with pytest.raises(ValueError, match="reduction"):
        data_parallel_step(None, None, torch.zeros(1, 2), reduction="average", world_size=1)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


TINY_RUN = ["--data", "moons", "--num-steps", "10", "--hidden", "16", "--depth", "1", "--num-train", "400"]
TINY_RUN += ["--num-test", "100", "--batch-size", "16", "--no-progress"]


@pytest.mark.skipif(not torch_dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("objective", ["elbo", "hybrid"])
def test_torchrun_entry_point_trains_a_run_directory_in_a_world_of_one(
    tmp_path, monkeypatch, capsys, objective
):
    from pyro_diffusion.cli import main as cli_main
    from pyro_diffusion.distributed import main

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    out = tmp_path / "run"
    assert main([*TINY_RUN, "--objective", objective, "--steps", "3", "--out", str(out)]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert not torch_dist.is_initialized()  # the entry point's process group is gone again
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["engine"]["world_size"] == 1 and checkpoint["config"]["objective"] == objective
    assert cli_main(["evaluate", "--run", str(out), "--no-progress"]) == 0
    assert len(pyro.get_param_store()) == 0


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Process ``rank`` of two: the CLI's `train` into a run directory, then an uninterrupted
    run and an interrupted-and-resumed one through ``training.fit``."""
    from pyro_diffusion.cli import main
    from pyro_diffusion.training import TrainConfig, fit

    torch.set_num_threads(1)
    torch_dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),  # a failing process does not leave the other hanging
    )
    try:
        run = os.path.join(out_dir, "cli")
        assert main(["train", "--out", run, *TINY_RUN, "--steps", "6", "--checkpoint-every", "4"]) == 0
        config = TrainConfig(
            data="moons",
            num_train=400,
            num_test=100,
            num_steps=10,
            hidden=16,
            depth=1,
            batch_size=16,
            steps=8,
            checkpoint_every=3,
            ema=0.9,
            val_size=40,
            eval_every=4,
            val_times=2,
            progress=False,
        )
        whole = fit(config, out=os.path.join(out_dir, "whole"))
        fit(config, out=os.path.join(out_dir, "part"), stop_after=5)
        torch.rand(100)  # unrelated use of the global RNG between the two parts
        resumed = fit(config, out=os.path.join(out_dir, "part"), resume=True)
        torch.save(
            {
                "whole": whole.engine.diffusion.state_dict(),
                "resumed": resumed.engine.diffusion.state_dict(),
                "history": resumed.engine.history,
            },
            os.path.join(out_dir, f"replica{rank}.pt"),
        )
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.skipif(not torch_dist.is_available(), reason="torch.distributed is not available")
def test_a_ddp_run_is_a_run_directory_that_the_cli_evaluates_samples_and_resumes(tmp_path, capsys):
    """Two gloo processes train through the engine; the directory they write is an ordinary
    run: `evaluate` and `sample` read it, `load_model` rebuilds it, an interrupted DDP run
    resumed equals an uninterrupted one, and resuming with another number of processes is
    refused with a message naming world_size."""
    from pyro_diffusion.cli import main
    from pyro_diffusion.training import load_model

    init_file = str(tmp_path / "rendezvous")
    mp.start_processes(_ddp_worker, args=(init_file, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    run = tmp_path / "cli"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == WORLD and metrics["steps"] == 6 and len(metrics["loss_history"]) == 6
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["engine"]["world_size"] == WORLD and len(checkpoint["engine"]["ranks"]) == WORLD
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    assert "test bits/dim" in capsys.readouterr().out
    assert math.isfinite(json.loads((run / "metrics.json").read_text())["test_bits_per_dim"])
    assert main(["sample", "--run", str(run), "--num", "8", "--no-progress"]) == 0
    samples = torch.load(run / "samples_seed0.pt", weights_only=True)
    assert samples.shape == (8, 2) and torch.isfinite(samples).all()
    assert load_model(run).num_steps == 10
    # resuming needs the same number of processes
    assert main(["train", "--out", str(run), "--steps", "8", "--resume", "--no-progress"]) == 2
    assert "world_size: the checkpoint was written by 2 processes" in capsys.readouterr().err
    # both replicas hold the same weights; interrupted + resumed equals uninterrupted
    replicas = [torch.load(tmp_path / f"replica{r}.pt", weights_only=True) for r in range(WORLD)]
    for key in ("whole", "resumed"):
        for name, value in replicas[0][key].items():
            assert torch.equal(value, replicas[1][key][name]), (key, name)
    for name, value in replicas[0]["whole"].items():
        assert torch.equal(value, replicas[0]["resumed"][name]), name
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["engine"]
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["engine"]
    assert whole["history"] == part["history"] == replicas[0]["history"]
    assert whole["best"]["step"] == part["best"]["step"]
    assert all(torch.equal(v, part["ema"][k]) for k, v in whole["ema"].items())
