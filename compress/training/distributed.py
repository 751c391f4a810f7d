"""torch.distributed set-up for runs under torchrun (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import atexit
import os
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when torchrun started us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # left joined, gloo's threads are still running when the interpreter exits, and a rank can
        # abort there ("terminate called without an active exception") after its work is done
        atexit.register(_leave)
    return (dist.get_rank() if dist.is_initialized() else 0), world, device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (so all ranks stop together)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return t.item() > 0


def from_main(value: T) -> T:
    """`value` as the main rank has it, on every rank (what only the main rank measured)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


def broadcast_state(model: torch.nn.Module, source: int = 0) -> None:
    """Every rank takes `source`'s weights and buffers (after work only that rank did)."""
    if dist.is_initialized():
        for tensor in model.state_dict().values():
            dense = tensor.contiguous()  # a channels_last weight is not, and gloo sends dense tensors only
            dist.broadcast(dense, source)
            tensor.copy_(dense)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

