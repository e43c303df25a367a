"""Run a `neo` verb in this process and write the accelerator's peak memory when it ends:

    python bench/peak_memory.py OUT.json cuda|npu train key=value ...

The device check (bench/device_check.py) runs `neo train` through this: `train.cli.main` is the
function behind the `neo` command, so the training measured is the users' own; neo train logs
model-state memory (every live tensor) but not the allocator's peak, activations included,
which is what decides whether a size fits.
"""

from __future__ import annotations

import atexit
import json
import sys
from pathlib import Path

import torch

from train.cli import main


def write_peak(path: str, kind: str) -> None:
    """{"peak_memory_bytes": the allocator's high-water mark on this process's device}."""
    # torch.npu exists once torch_npu is imported; the CPU has no allocator counter.
    read = getattr(getattr(torch, kind, None), "max_memory_allocated", None)
    peak = int(read()) if read is not None else None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"peak_memory_bytes": peak}))


if __name__ == "__main__":
    out, kind = sys.argv[1], sys.argv[2]
    sys.argv = [sys.argv[0], *sys.argv[3:]]  # what main() reads: the verb and its overrides
    atexit.register(write_peak, out, kind)
    main()
