"""One process or many: torchrun's environment decides; the rest of the code only asks `is_main`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from geektime.machine import resolve_device


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _submitit_tasks() -> int:
    """Tasks of the submitit SLURM job this process is one of (1 outside such a job)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return 1
    return int(os.environ.get("SLURM_NTASKS", "1"))


def launch_rank() -> int:
    """This process's rank as its launcher gave it, before any process group exists.

    torchrun's RANK; in a submitit SLURM job of several tasks (hydra/launcher=slurm with
    tasks_per_node > 1) the task's SLURM_PROCID; 0 for a single process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0"))
    if _submitit_tasks() > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def setup(device_setting: str) -> Processes:
    """Join torchrun's process group when launched by it (nccl on CUDA, gloo on CPU).

    The tasks of a submitit SLURM job are ranks too: submitit exports torchrun's variables for them.
    """
    if "WORLD_SIZE" not in os.environ and _submitit_tasks() > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(device=resolve_device(device_setting))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = resolve_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return Processes(rank, world_size, local_rank, local_world_size, device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, processes: Processes):
    """Rank 0's value on every rank (e.g. the run folder)."""
    if not processes.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(model: torch.nn.Module, processes: Processes) -> None:
    """Rank 0's buffers (BatchNorm running stats) on every rank.

    In training each rank updates its running stats from its own batches, so after an epoch they
    differ; evaluating, and the checkpoint, must use one set: rank 0's, which the checkpoint holds.
    """
    if not processes.distributed:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)
