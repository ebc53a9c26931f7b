"""torchrun support: process group from the environment, rank queries. No home-made cluster code."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/MASTER_ADDR); False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if device.type == "cuda":  # NCCL's object collectives and himalaya's "cuda" use the current device
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # CPU tensors (the Ctrl-C flag, object collectives) go over gloo even beside NCCL. The
        # timeout covers a rank that waits while another solves a larger share (fit-ridge's
        # subjects take minutes each at the NSD size); torchrun stops every rank when one dies.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=6))
    return True


def local_world_size() -> int:
    """How many torchrun processes share this machine (and its memory): 1 alone."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)


def all_agree(flag: bool) -> bool:
    """True on every rank when `flag` is true on every rank: one decision for ranks that must
    take the same path (alone: `flag`)."""
    if not dist.is_initialized():
        return flag
    return all(gather_objects(bool(flag)))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def my_share(items: list) -> list:
    """This rank's items of a list shared round-robin over the ranks (all of them alone)."""
    return items[rank() :: world_size()]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a one-item list alone)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
