"""The few collectives the loop and the evaluators need, as plain values."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_max(value: int, device) -> int:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_sum(values: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(values)
    return values


def any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def merged(part: dict) -> dict:
    """Every rank's dict merged into one, on every rank (the keys of the parts are disjoint)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return part
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    out: dict = {}
    for p in parts:
        out.update(p)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
