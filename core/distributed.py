"""Process-group setup for DeepSpeed, torchrun and plain ``python`` launches."""
from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(preference: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def init_distributed(preference: str, timeout_minutes: float = 30.0, deepspeed: bool = True) -> DistInfo:
    """Join (or, under plain ``python``, create) the process group, through DeepSpeed when a
    DeepSpeed engine will train (``deepspeed``), else torch's own (evaluation: no DeepSpeed chatter).

    The DeepSpeed launcher and torchrun set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*;
    without them this is a one-process group on a free local port. Without CUDA,
    DeepSpeed's CPU accelerator and the gloo backend are used.
    """
    device = pick_device(preference)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    backend, timeout = ("nccl" if device.type == "cuda" else "gloo"), timedelta(minutes=timeout_minutes)
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend, timeout=timeout)
        if device.type == "cpu":
            _unlink_shm_buffer(dist.get_rank())
    else:
        dist.init_process_group(backend, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU backend maps a 66 MB shared-memory all-reduce buffer per rank when every
    rank is local, and never unlinks it: each multi-process CPU run would leave them in /dev/shm.
    Once every rank has mapped every buffer (the barrier: DeepSpeed maps them while joining), the
    names can go; the memory lives until the last process exits, however it ends."""
    dist.barrier()
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{rank}"
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another process of the job died or hung
    (that process's own log says why)."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(s in str(err) for s in ("closed by peer", "reset by peer")))  # gloo


T = TypeVar("T")


def sendable(err: Exception) -> Exception:
    """``err``, or a RuntimeError with its type and message where pickle cannot carry it to the
    other ranks (rank 0 would fail inside the broadcast and leave them waiting)."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def decided_by_rank0(decide: Callable[[], T], wait: timedelta | None = None) -> T:
    """``decide()`` run on rank 0 alone and its result, or the error it raised, given to every rank:
    one decision for the whole job where each rank's own view (of a network filesystem) could differ.

    The other ranks wait for it as long as any collective (the process group's timeout), or
    ``wait`` where ``decide`` is long work (a checkpoint conversion): then they wait in a gloo
    group of their own with that timeout."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decide()
    group = dist.new_group(backend="gloo", timeout=wait) if wait is not None else None
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = (decide(), None)
        except Exception as err:  # every rank raises it below
            outcome[0] = (None, sendable(err))
    try:
        dist.broadcast_object_list(outcome, src=0, group=group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)
    result, err = outcome[0]
    if err is not None:
        raise err
    return result


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, in rank order (no gradient)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every rank (a host sync): a step is skipped on all ranks or none."""
    finite = torch.isfinite(loss.detach()).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)
