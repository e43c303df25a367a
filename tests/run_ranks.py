"""Run a function on several ranks in-process: forked workers joined by a gloo process group
(as OLMo-core's run_distributed_test), for unit-level distributed tests that need no launcher
and no DeepSpeed. Where the launcher itself is under test, tests start torchrun instead."""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args) -> list[Any]:
    """fn(*args) on each of `world_size` ranks, with torch.distributed initialised (gloo);
    returns every rank's (picklable) result in rank order; a failure on any rank fails here
    with that rank's traceback."""
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(fn, rank, world_size, store, results, args))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        out = dict(results.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    errors = [value for value in out.values() if isinstance(value, _Failure)]
    if errors:
        raise AssertionError("\n".join(e.text for e in errors))
    return [out[rank] for rank in range(world_size)]


class _Failure:
    def __init__(self, text: str):
        self.text = text


def _worker(fn, rank: int, world_size: int, store: Path, results, args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size
        )
        try:
            results.put((rank, fn(*args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, _Failure(f"rank {rank}:\n{traceback.format_exc()}")))
