"""Exporting a large model: peak memory and time of `neo export` against transformers'
`save_pretrained` of the same weights, side by side in one run.

    python bench/export.py [--model gpt_neo_1.3b] [--dtype bfloat16] [--dir /tmp/neo_export_bench]

A random-weight model of the size is saved as a neotrain checkpoint (fp32, as training ends).
Each measured step runs in its own process (peak RSS from the kernel's own count, ru_maxrss):
- neo export: read the checkpoint, convert to --dtype, write model.safetensors (sharded above
  5GB) tensor by tensor, and verify (transformers loads it again, the probe is recomputed);
- neo export without the verification;
- save_pretrained: the same fp32 weights into GPTNeoForCausalLM (--dtype), save_pretrained.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from markdown_table import markdown

ROOT = Path(__file__).resolve().parents[1]

MAKE = """
import torch, hydra
from omegaconf import OmegaConf
from hydra import compose, initialize_config_module
from train.config import ModelConfig, register_configs
from train.checkpoint import save_checkpoint
from train.model import GPT
from data_prep.tokenizers import load_tokenizer
register_configs()
with initialize_config_module("configs", version_base="1.3"):
    cfg = compose("train", overrides=["model={model}"])
config = OmegaConf.to_object(cfg.model)
with torch.device("meta"):
    model = GPT(config)
model.to_empty(device="cpu")
model.init_weights(torch.Generator().manual_seed(0))
save_checkpoint("{dir}/ckpt", config, model.state_dict(), load_tokenizer("gpt2"), overwrite=True)
"""

OURS = """
import torch
from train.export import export_hf
export_hf("{dir}/ckpt", "{dir}/{out}", overwrite=True, dtype=torch.{dtype}, verify={verify})
"""

THEIRS = """
import torch
from transformers import GPTNeoForCausalLM
from train.checkpoint import read_checkpoint
from train.hf import config_to_hf
from data_prep.tokenizers import load_tokenizer
config, state = read_checkpoint("{dir}/ckpt")
hf_config = config_to_hf(config, load_tokenizer("gpt2"), torch.{dtype})
with torch.device("meta"):
    model = GPTNeoForCausalLM(hf_config)
model.load_state_dict({{k: v.to(torch.{dtype}) for k, v in state.items()}}, assign=True)
del state
model.tie_weights()
model.save_pretrained("{dir}/theirs")
"""

# Peak RSS (the kernel's ru_maxrss) and, sampled every 5 ms, peak anonymous memory (RssAnon):
# RSS also counts the pages of memory-mapped files (safetensors maps the checkpoint), which
# the kernel can drop and read again; anonymous memory is what the process itself holds.
PEAK = """
import re, resource, runpy, sys, threading, time
anon = [0]
def sample():
    while True:
        text = open("/proc/self/status").read()
        anon[0] = max(anon[0], int(re.search(r"RssAnon:\\s+(\\d+)", text).group(1)))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
runpy.run_path(sys.argv[1], run_name="__main__")
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, anon[0])
"""


def run(code: str, directory: Path, name: str) -> tuple[float, float, float]:
    """(seconds, peak RSS GiB, peak anonymous GiB) of `code` in a fresh process."""
    script = directory / f"{name}.py"
    script.write_text(textwrap.dedent(code))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, str(script)], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    rss, anon = (int(x) for x in done.stdout.split("PEAK_KB")[-1].split())
    return seconds, rss / 2**20, anon / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt_neo_1.3b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dir", default="/tmp/neo_export_bench")
    args = parser.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    fields = {"dir": directory, "model": args.model, "dtype": args.dtype}
    made = run(MAKE.format(**fields), directory, "make")
    meta = json.loads((directory / "ckpt" / "neotrain.json").read_text())
    size = (directory / "ckpt" / "model.safetensors").stat().st_size / 2**30
    print(f"{args.model}: {meta['model']['num_layers']} layers, checkpoint {size:.2f} GiB fp32 "
          f"(made in {made[0]:.0f} s); export dtype {args.dtype}\n")  # fmt: skip
    rows = []
    for label, code, out in [
        ("neo export (verified)", OURS.format(**fields, out="ours", verify=True), "ours"),
        ("neo export, no verification", OURS.format(**fields, out="ours2", verify=False), "ours2"),
        ("save_pretrained", THEIRS.format(**fields), "theirs"),
    ]:
        seconds, peak, anon = run(code, directory, out)
        written = sum(p.stat().st_size for p in (directory / out).glob("*.safetensors")) / 2**30
        rows.append([label, f"{seconds:.1f}", f"{peak:.2f}", f"{anon:.2f}",
                     f"{anon / written:.2f}", f"{written:.2f}"])  # fmt: skip
    markdown(["step", "seconds", "peak RSS GiB", "peak anonymous GiB",
              "anonymous / exported weights", "weights written GiB"], rows)  # fmt: skip
    shutil.rmtree(directory)


if __name__ == "__main__":
    main()
