"""Reading PyTorch's pickled files without running code from them.

A `.pt`/`.bin` file is a pickle, and a pickle may name any callable (`os.system` included) for
the reader to call. Every one neotrain reads, DeepSpeed's own reads included, goes through
torch's weights-only unpickler, which builds tensors, containers and the types on an explicit
allow-list, and refuses anything else before calling it."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from train.errors import CheckpointError

# Read by torch.load on every call: weights_only=True whatever the caller asked for. DeepSpeed
# asks for weights_only=False in its checkpoint readers; this is how they are made safe too.
FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def refusal(where: str | Path, error: Exception) -> CheckpointError:
    """One line for a pickle the weights-only unpickler refused (it names what the file asked
    for; torch's own text would suggest weights_only=False, which is the unsafe way), or for a
    file that cannot be read at all."""
    if isinstance(error, pickle.UnpicklingError):
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = named.group(1) if named else "a Python callable"
        return CheckpointError(
            f"{where}: refused: it asks to call {what}, which is not a tensor or a type on "
            "neotrain's allow-list; loading it would run code from the file"
        )
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return CheckpointError(
        f"{where}: cannot be read, truncated or corrupt ({type(error).__name__}: {first})"
    )


def read_tensors(file: Path, allowed: list | None = None, mmap: bool = True) -> dict:
    """A pickled state dict (pytorch_model.bin, a DeepSpeed model state), weights only."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # pickle, zip and size errors alike
        raise refusal(file, e) from None


@contextmanager
def weights_only(allowed: list, where: str | Path) -> Iterator[None]:
    """Inside, every torch.load in this process (a library's too) reads weights only, with
    `allowed` the types besides tensors it may build; a refused pickle is one line naming
    `where`."""
    saved = {name: os.environ.get(name) for name in (FORCE, FORCE_NOT)}
    os.environ[FORCE] = "1"
    os.environ.pop(FORCE_NOT, None)
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as e:
        raise refusal(where, e) from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
