"""Data-parallel training under `torchrun`: PyTorch's own DistributedDataParallel, nothing else.

`torchrun --nproc_per_node=K -m imgcls train ...` sets RANK, WORLD_SIZE and LOCAL_RANK (and, across
machines, GROUP_WORLD_SIZE: the number of nodes); `fit` then joins the process group (gloo on CPU, NCCL
on GPUs). `--batch-size` stays the global batch:
every rank draws the same permutation each epoch and takes its share of every global batch, so
K processes take the optimizer steps one process would. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from imgcls.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives' tensors live: NCCL takes CUDA tensors only
    nodes: int = 1  # torchrun's agents, one per machine
    restarts: int = 0  # how often torchrun restarted the workers before this attempt (--max-restarts)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


JOIN_TIMEOUT = timedelta(hours=2)  # generous: ranks > 0 wait while rank 0 alone tests and writes the summary


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def join(device_name: str) -> tuple[World, str]:
    """The world this process is part of (joined when launched by torchrun), and the device name
    it should use: a CUDA process takes the GPU of its local rank."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device_name
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    world = World(int(os.environ["RANK"]), size, local_rank, device_name if cuda else "cpu",
                  int(os.environ.get("GROUP_WORLD_SIZE", "1")), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one store across worker restarts (--max-restarts), so a restarted
            # group would read the keys of the attempt before, a dead worker's address among them, and
            # hang connecting to it (pytorch/pytorch#135712): each attempt gets keys of its own.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False,
                                  timeout=JOIN_TIMEOUT)
            store = dist.PrefixStore(f"imgcls/attempt-{world.restarts}", store)
            dist.init_process_group(backend, store=store, rank=world.rank, world_size=size, timeout=JOIN_TIMEOUT)
        else:
            dist.init_process_group(backend, timeout=JOIN_TIMEOUT)
        _joined.append(True)
    return world, device_name


_joined: list[bool] = []  # whether join() made the process group, so leave() undoes only that


def leave(world: World) -> None:
    if _joined and dist.is_initialized():
        dist.destroy_process_group()
        _joined.clear()


def check_batch_size(world: World, batch_size: int) -> None:
    if batch_size % world.size:
        raise UserError(f"--batch-size {batch_size} is the global batch and must divide evenly among "
                        f"{world.size} processes; use a multiple of {world.size}")


def rank_order(order: torch.Tensor, batch_size: int, world: World) -> torch.Tensor:
    """This rank's indices: its strided share of every global batch of `order`, in sequence, so
    that consecutive local batches of batch_size / world.size line up with the global batches."""
    if not world.distributed:
        return order
    return torch.cat([order[s : s + batch_size][world.rank :: world.size] for s in range(0, len(order), batch_size)])


def all_sum(world: World, values: list[float]) -> list[float]:
    """Sum numbers over all ranks (float64, so counts stay exact)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(world: World, flags: list[bool]) -> list[bool]:
    """Each flag true on every rank when it is true on one (a Ctrl-C or a NaN seen by one process stops
    them all at the same step), in one collective."""
    if not world.distributed:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def from_main(world: World, obj):
    """Rank 0's value of `obj`, on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def share_buffers(world: World, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics). DDP only broadcasts them at the
    start of a forward pass, so after the last step each rank holds its own shard's update."""
    if world.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
