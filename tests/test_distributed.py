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


@pytest.mark.skipif(not torch_dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("loss", ["elbo", "hybrid"])
def test_torchrun_entry_point_trains_in_a_world_of_one(tmp_path, monkeypatch, capsys, loss):
    import socket

    from pyro_diffusion.distributed import main

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    out = tmp_path / "ddp.pt"
    args = ["--data", "moons", "--loss", loss, "--num-steps", "10", "--hidden", "16", "--batch-size", "32"]
    assert main(args + ["--iterations", "3", "--out", str(out)]) == 0
    assert "1 processes × batch 32, 3 steps" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved["config"]["variance"] == ("learned" if loss == "hybrid" else "large")
    assert len(pyro.get_param_store()) == 0
