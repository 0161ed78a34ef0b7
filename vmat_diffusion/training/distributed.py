"""Multi-GPU / multi-node training through torchrun (``torch.distributed.run``) and DDP.

How a run becomes distributed
-----------------------------
* Started by torchrun (the environment holds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``):
  ``init_distributed`` joins the process group (NCCL on CUDA, gloo on CPU), every process
  trains on its own shard of the cases with its own seed, rank 0 alone writes logs and
  checkpoints.
* ``vmat-train --devices N --strategy ddp`` started by hand (no torchrun environment): the
  CLI prints the torchrun line to use and, for a single machine (``--num_nodes 1``), runs it
  (``python -m torch.distributed.run --standalone --nproc_per_node N -m
  vmat_diffusion.cli.train <same arguments>``) and returns its exit code. For several machines
  it only prints the line, with the ``--nnodes/--node_rank/--rdzv_endpoint`` options to fill in,
  because each machine has to start its own copy.
"""
from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist

TRAIN_MODULE = "vmat_diffusion.cli.train"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job; ``world_size == 1`` for a plain run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    """True when this process was started by torchrun (its environment variables are set)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def context_from_env() -> DistContext:
    """The rank, world size and local rank torchrun set (0, 1, 0 when not under torchrun)."""
    if not under_torchrun():
        return DistContext()
    return DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def local_world_size() -> int:
    """Processes on this machine: torchrun's LOCAL_WORLD_SIZE (1 when not under torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if under_torchrun() else 1


def init_distributed(device_type: str, timeout_minutes: float = 30.0) -> DistContext:
    """Join the torchrun process group (if any): NCCL for ``device_type == "cuda"``, else gloo."""
    ctx = context_from_env()
    if ctx.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return ctx


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: Sequence[float], device) -> List[float]:
    """Sum plain numbers over all processes (returned unchanged in a single-process run)."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_true(flag: bool, device) -> bool:
    """True only if ``flag`` is True on every process (so all ranks take the same branch)."""
    return _agree(flag, device, "min")


def any_true(flag: bool, device) -> bool:
    """True if ``flag`` is True on any process (so all ranks take the same branch)."""
    return _agree(flag, device, "max")


def _agree(flag: bool, device, how: str) -> bool:
    if not is_distributed():
        return bool(flag)
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if how == "min" else dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def torchrun_args(nproc_per_node: int, num_nodes: int = 1) -> List[str]:
    """The torchrun options (without the program) for ``nproc_per_node`` processes per machine."""
    if num_nodes > 1:
        return ["--nnodes", str(num_nodes), "--node_rank", "<0..%d>" % (num_nodes - 1),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", "<host:port>",
                "--nproc_per_node", str(nproc_per_node)]
    return ["--standalone", "--nproc_per_node", str(nproc_per_node)]


def torchrun_command_line(argv: Sequence[str], nproc_per_node: int, num_nodes: int = 1) -> str:
    """The shell line a user types: ``torchrun ... -m vmat_diffusion.cli.train <argv>``."""
    parts = ["torchrun"] + torchrun_args(nproc_per_node, num_nodes) + ["-m", TRAIN_MODULE] + list(argv)
    return " ".join(shlex.quote(p) if not p.startswith("<") else p for p in parts)


def launch_torchrun(argv: Sequence[str], nproc_per_node: int) -> int:
    """Run this training as ``nproc_per_node`` processes on this machine; returns the exit code.

    Uses ``sys.executable -m torch.distributed.run`` (torchrun itself) so the same Python
    environment is used even when the ``torchrun`` script is not on PATH.
    """
    command = [sys.executable, "-m", "torch.distributed.run"] + torchrun_args(nproc_per_node) \
        + ["-m", TRAIN_MODULE] + list(argv)
    return subprocess.call(command)
