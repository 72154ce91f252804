r"""Data-parallel training on several processes, GPUs and nodes.

Nothing here is home-made distributed machinery: the loss of one
:class:`~pyro_diffusion.Diffusion` becomes an ``nn.Module`` through Pyro's ``ELBOModule`` —
``loss(model, guide)`` over the diffusion's programs as modules
(:func:`~pyro_diffusion.training.elbo_module`, which runs them with
``module_local_params=True``, so nothing enters Pyro's global param store) — and that module
is wrapped in PyTorch's :class:`~torch.nn.parallel.DistributedDataParallel`, which
all-reduces the gradients during ``backward``.

**Gradient scaling.**  Pyro's losses (and this package's) are *sums* over the batch, while
DDP *averages* gradients over the ``W`` processes.  With local batches ``x^{(1)} … x^{(W)}``
of the combined batch ``x``, the averaged gradient of the local sums is

.. math::  \frac1W \sum_{r=1}^W ∇ \sum_{i ∈ x^{(r)}} ℓ_i = \frac1W ∇ \sum_{i ∈ x} ℓ_i ,

so :func:`data_parallel_step` multiplies the local loss by ``W`` (``reduction="sum"``): the
update is then the one a single process makes with the same optimizer on the combined
batch.  ``reduction="mean"`` divides the local loss by the local batch size instead, which
gives the gradient of the per-datum mean over the combined batch when every process holds
the same number of data (as ``DistributedSampler(drop_last=True)`` ensures).

**Commands.**  On one node with N GPUs::

    torchrun --standalone --nproc_per_node=N -m pyro_diffusion.distributed --data digits

On M nodes with N GPUs each (run on every node; ``HOST`` is node 0's address)::

    torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        --rdzv_id=JOB -m pyro_diffusion.distributed --data digits

Without GPUs the same commands run N CPU processes with the gloo backend.  ``--batch-size``
is per process; see ``docs/distributed.md``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys

import pyro
import torch
import torch.distributed as torch_dist
from pyro.infer import ELBO
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .diffusion import Diffusion
from .losses import DiffusionELBO, HybridLoss, SimplifiedLoss
from .training import elbo_module

__all__ = ["REDUCTIONS", "data_parallel_module", "data_parallel_step", "main"]

REDUCTIONS = ("sum", "mean")


def data_parallel_module(
    diffusion: nn.Module,
    loss: ELBO | None = None,
    *,
    device_ids: list[int] | None = None,
    **ddp_kwargs,
) -> DistributedDataParallel:
    """The diffusion's loss as a :class:`DistributedDataParallel` module.

    ``module(x0)`` returns the local loss (a sum over the local batch ``x0`` of shape
    ``(B_local, *event_shape)``); its ``backward`` all-reduces (averages) the gradients of the
    denoiser's parameters across processes.

    Args:
        diffusion: a :class:`~pyro_diffusion.Diffusion`, already on this process's device.
        loss: a Pyro ELBO over the diffusion's programs (default
            :class:`~pyro_diffusion.DiffusionELBO`, the full ELBO with one network call;
            ``pyro.infer.TraceMeanField_ELBO()`` runs the whole chain).
        device_ids: DDP's ``device_ids`` (``[local_rank]`` on a GPU, ``None`` on CPU).
        ddp_kwargs: passed to ``DistributedDataParallel``; buffers are not re-sent at every
            forward by default (``forward_sync_buffers=False``, or ``broadcast_buffers=False``
            before PyTorch named it so): the schedule's buffers are constants.

    Needs ``torch.distributed`` initialized (``torch.distributed.init_process_group``).
    """
    if not torch_dist.is_available() or not torch_dist.is_initialized():
        raise RuntimeError(
            "data_parallel_module: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group (torchrun sets the environment for it)"
        )
    if loss is None:
        loss = DiffusionELBO()
    if not isinstance(loss, ELBO):
        raise TypeError(f"loss: expected a pyro.infer.ELBO instance, got {type(loss).__name__}")
    if not isinstance(diffusion, Diffusion):
        raise TypeError(f"diffusion: expected a Diffusion, got {type(diffusion).__name__}")
    module = elbo_module(diffusion, loss)
    if "broadcast_buffers" not in ddp_kwargs and "forward_sync_buffers" not in ddp_kwargs:
        # the name changed in recent PyTorch; either way, don't re-send constants every step
        parameters = inspect.signature(DistributedDataParallel.__init__).parameters
        ddp_kwargs[
            "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
        ] = False
    return DistributedDataParallel(module, device_ids=device_ids, **ddp_kwargs)


def data_parallel_step(
    module: DistributedDataParallel,
    optimizer: torch.optim.Optimizer,
    x0: torch.Tensor,
    *,
    reduction: str = "sum",
    world_size: int | None = None,
) -> torch.Tensor:
    """One optimizer step on this process's batch ``x0``; returns the local loss, detached.

    The loss handed to ``backward`` is ``W · loss_local`` (``reduction="sum"``: after DDP's
    average the gradient is that of the loss summed over the combined batch) or
    ``loss_local / B_local`` (``reduction="mean"``: the gradient of the mean over the
    combined batch, for equal local batches).  No value is read back from the device.

    Args:
        module: from :func:`data_parallel_module`.
        optimizer: a ``torch.optim`` optimizer over ``module.parameters()``.
        x0: the local batch ``(B_local, *event_shape)``.
        reduction: ``"sum"`` or ``"mean"``.
        world_size: W (default: ``torch.distributed.get_world_size()``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if world_size is None:
        world_size = torch_dist.get_world_size()
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    optimizer.zero_grad(set_to_none=True)
    loss = module(x0)
    scale = world_size if reduction == "sum" else 1.0 / x0.shape[0]
    (loss * scale).backward()
    optimizer.step()
    return loss.detach()


# ------------------------------------------------------------------------------ torchrun entry
LOSSES = {"elbo": DiffusionELBO, "simple": SimplifiedLoss, "hybrid": HybridLoss}


def _build(args, data, device):
    """A DDPM (:func:`~pyro_diffusion.GaussianDiffusion`): an MLP for vector data, a U-Net for
    images; learned variances for the hybrid loss."""
    from .diffusion import GaussianDiffusion
    from .nets import MLPDenoiser, UNetDenoiser
    from .schedules import NoiseSchedule

    event_shape = tuple(data.train.shape[1:])
    schedule = NoiseSchedule.cosine(args.num_steps) if args.schedule == "cosine" else None
    schedule = schedule or NoiseSchedule.linear(args.num_steps)
    learned = args.loss == "hybrid"
    if len(event_shape) == 1:
        net = MLPDenoiser(event_shape, hidden=args.hidden, learned_variance=learned)
    else:
        net = UNetDenoiser(event_shape[0], base=args.hidden // 4 or 8, learned_variance=learned)
    decoder = "discretized" if data.num_levels else "gaussian"
    diffusion = GaussianDiffusion(
        net,
        schedule,
        event_shape,
        variance="learned" if learned else "large",
        decoder=decoder,
        num_levels=data.num_levels,
    )
    return diffusion.to(device)


def main(argv: list[str] | None = None) -> int:
    """Train with DistributedDataParallel; run under ``torchrun`` (module docstring)."""
    from .data import load_dataset

    parser = argparse.ArgumentParser(prog="torchrun ... -m pyro_diffusion.distributed", description=__doc__)
    parser.add_argument("--data", default="digits", help="moons, swissroll, gmm, digits or a .npy/.pt path")
    parser.add_argument("--loss", choices=sorted(LOSSES), default="elbo")
    parser.add_argument("--num-steps", type=int, default=1000, help="T")
    parser.add_argument("--schedule", choices=("linear", "cosine"), default="linear")
    parser.add_argument("--hidden", type=int, default=128, help="MLP width, or 4 × the U-Net's base width")
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    parser.add_argument("--iterations", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--reduction", choices=REDUCTIONS, default="mean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="ddp_checkpoint.pt", help="written by rank 0 at the end")
    parser.add_argument("--progress", action="store_true", help="progress bar on rank 0")
    args = parser.parse_args(argv)

    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
    pyro.enable_validation(False)  # validation reads tensor values: a host-device sync per step
    try:
        torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
        data = load_dataset(args.data)
        diffusion = _build(args, data, device)
        module = data_parallel_module(
            diffusion, LOSSES[args.loss](), device_ids=[local_rank] if use_cuda else None
        )
        optimizer = torch.optim.Adam(module.parameters(), lr=args.lr)
        dataset = torch.utils.data.TensorDataset(data.train.float())
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, seed=args.seed, drop_last=True)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True
        )
        if len(loader) == 0:
            raise ValueError(
                f"--batch-size: {args.batch_size} per process × {world_size} processes exceeds the "
                f"{len(dataset)} training data"
            )
        torch.manual_seed(args.seed + 1 + rank)  # independent t and noise draws on each process
        running = torch.zeros((), device=device)
        bar = tqdm(total=args.iterations, disable=not (args.progress and rank == 0), desc="ddp")
        iteration, epoch = 0, 0
        while iteration < args.iterations:
            sampler.set_epoch(epoch)
            for (x0,) in loader:
                x0 = x0.to(device, non_blocking=True)
                running += data_parallel_step(module, optimizer, x0, reduction=args.reduction) / x0.shape[0]
                iteration += 1
                bar.update(1)
                if iteration >= args.iterations:
                    break
            epoch += 1
        bar.close()
        torch_dist.all_reduce(running)
        mean_loss = running.item() / (world_size * args.iterations)
        if rank == 0:
            units = "nats per datum" if args.loss == "elbo" else "per datum"
            bits = mean_loss / (math.prod(diffusion.event_shape) * math.log(2))
            print(
                f"{world_size} processes × batch {args.batch_size}, {args.iterations} steps: "
                f"mean training loss {mean_loss:.4f} {units}"
                + (f" ({bits:.4f} bits/dim)" if args.loss == "elbo" else "")
            )
            torch.save({"config": diffusion.config(), "state_dict": diffusion.state_dict()}, args.out)
            print(f"saved {args.out}")
    finally:
        torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
