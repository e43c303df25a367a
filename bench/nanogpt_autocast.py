"""Runs karpathy/nanoGPT's `train.py` (the working directory: a nanoGPT checkout) with its
forward pass under `torch.autocast("cpu", dtype=torch.bfloat16)`, for bench/quality.py's bf16
rows.

nanoGPT's train.py builds its autocast context as `nullcontext() if device_type == 'cpu' else
torch.amp.autocast(...)`: on a CPU it trains in fp32 whatever `--dtype` says. Its code is not
copied or edited here: `contextlib.nullcontext`, which train.py imports by name, answers a call
made from train.py itself with the autocast context that train.py builds on a GPU (bf16: no
gradient scaler), and every other caller with the real `nullcontext`.

    cd NANOGPT && python PATH/bench/nanogpt_autocast.py --device=cpu --dtype=bfloat16 ...
"""

import contextlib
import runpy
import sys
from pathlib import Path

import torch


class _NullOrAutocast(contextlib.nullcontext):
    """`nullcontext` for every caller but train.py, which gets bf16 autocast. A class, not a
    function: torch subclasses `contextlib.nullcontext` in modules it imports later."""

    def __new__(cls, *args):
        if cls is _NullOrAutocast and Path(sys._getframe(1).f_code.co_filename).name == "train.py":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return super().__new__(cls)


if __name__ == "__main__":
    contextlib.nullcontext = _NullOrAutocast
    sys.argv = ["train.py", *sys.argv[1:]]
    sys.path[0] = str(Path.cwd())  # as `python train.py` there: its `import model` finds model.py
    runpy.run_path("train.py", run_name="__main__")
