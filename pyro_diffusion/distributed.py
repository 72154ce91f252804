r"""Data-parallel training on several processes, GPUs and nodes.

``pyro-diffusion train`` started by ``torchrun`` trains data-parallel: every process runs the
package's training engine (:class:`~pyro_diffusion.engine.Engine`) on its share of each
batch, and the run directory it writes is an ordinary one, which ``evaluate``, ``sample``,
``--resume`` and :func:`~pyro_diffusion.training.load_model` read.  Nothing here is home-made
distributed machinery: the loss of one :class:`~pyro_diffusion.Diffusion` becomes an
``nn.Module`` through Pyro's ``ELBOModule`` — ``loss(model, guide)`` over the diffusion's
programs as modules (:func:`~pyro_diffusion.engine.elbo_module`, run with
``module_local_params=True``, so nothing enters Pyro's global param store) — and that module
is wrapped in PyTorch's :class:`~torch.nn.parallel.DistributedDataParallel`, which
all-reduces the gradients during ``backward``.

**Gradient scaling.**  Pyro's losses (and this package's) are *sums* over the batch, while
DDP *averages* gradients over the ``W`` processes.  With local batches ``x^{(1)} … x^{(W)}``
of the combined batch ``x``, the averaged gradient of the local sums is

.. math::  \frac1W \sum_{r=1}^W ∇ \sum_{i ∈ x^{(r)}} ℓ_i = \frac1W ∇ \sum_{i ∈ x} ℓ_i ,

so the engine (and :func:`data_parallel_step` with ``reduction="sum"``) multiplies the
local loss by ``W``: the update is then the one a single process makes with the same
optimizer on the combined batch.  ``reduction="mean"`` divides the local loss by the local
batch size instead, which gives the gradient of the per-datum mean over the combined batch
when every process holds the same number of data.

**Commands.**  On one node with N GPUs (``--batch-size`` is per process)::

    torchrun --standalone --nproc_per_node=N -m pyro_diffusion.distributed \
        --data digits --device cuda --out runs/ddp

On M nodes with N GPUs each (run on every node; ``HOST`` is node 0's address; the run
directory must be on a file system all nodes share, since every process reads the
checkpoint when a run is resumed)::

    torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        --rdzv_id=JOB -m pyro_diffusion.distributed --data digits --device cuda --out runs/ddp

``-m pyro_diffusion.distributed`` takes exactly the flags of ``pyro-diffusion train``
(``torchrun --no-python pyro-diffusion train …`` is the same).  Without GPUs the same
commands run N CPU processes with the gloo backend.  See ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys

import pyro
import torch
import torch.distributed as torch_dist
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import engine
from .engine import elbo_module

__all__ = ["REDUCTIONS", "data_parallel_module", "data_parallel_step", "process_group", "launched", "main"]

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
    from .diffusion import Diffusion
    from .losses import DiffusionELBO

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
    """One optimizer step on this process's batch ``x0`` for a loop of your own; returns the
    local loss, detached.  (The engine's step, :func:`~pyro_diffusion.engine.optimizer_step`.)

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
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    scale = world_size if reduction == "sum" else 1.0 / x0.shape[0]
    return engine.optimizer_step(module, optimizer, x0, scale=scale)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (its environment names a rank and a
    world size)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


@contextlib.contextmanager
def process_group():
    """Inside, ``torch.distributed`` is initialized when this process was started by
    ``torchrun`` (NCCL on GPUs, gloo otherwise; each process on its own GPU ``LOCAL_RANK``)
    and destroyed on leaving; otherwise (a plain process, or a group the caller already
    initialized) nothing changes.  Under ``torchrun`` Pyro's validation is turned off: it
    reads tensor values, a host-device synchronization per step."""
    if (torch_dist.is_available() and torch_dist.is_initialized()) or not launched():
        yield
        return
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    validation = is_validation_enabled()
    pyro.enable_validation(False)
    try:
        yield
    finally:
        pyro.enable_validation(validation)
        torch_dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """``torchrun … -m pyro_diffusion.distributed FLAGS``: ``pyro-diffusion train FLAGS``
    (which trains data-parallel under ``torchrun``)."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
