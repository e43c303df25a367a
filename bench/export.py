"""Exporting a large model: peak memory and time of `neo export` against transformers'
`save_pretrained` of the same weights, side by side in one run.

    python bench/export.py [--source checkpoint|zero3] [--model gpt_neo_1.3b]
                           [--dtype bfloat16] [--dir /tmp/neo_export_bench]

A random-weight model of the size is saved (--source):
- checkpoint: as a neotrain checkpoint (fp32 model.safetensors, as training ends);
- zero3: as a DeepSpeed ZeRO-3 checkpoint of `neo train` (2 ranks under torchrun, gloo, bf16
  with fp32 master weights, the engine neo train builds, saved before any step). Adam's
  moments are created by the first step, so this checkpoint has none; in a trained one they
  sit beside the master weights in the same files, which both readers below map (mmap) and
  drop unread, so they change the files' size, not the memory measured.
Each measured step runs in its own process (peak RSS from the kernel's own count, ru_maxrss):
- neo export: read the checkpoint (ZeRO-3: each tensor gathered from the ranks' partitions as
  it is written), convert to --dtype, write model.safetensors (sharded above 5GB) tensor by
  tensor, and verify (transformers loads it again, the probe is recomputed);
- neo export without the verification;
- save_pretrained: the same fp32 weights (ZeRO-3: DeepSpeed's get_fp32_state_dict_from_zero_
  checkpoint, the documented way) into GPTNeoForCausalLM (--dtype), save_pretrained.
"""

from __future__ import annotations

import argparse
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
from train.config import compose
from train.checkpoints.model_format import save_checkpoint
from train.model.gpt import GPT
from data_prep.tokenizers import load_tokenizer
config = compose.to_schema(compose.compose("train", ["model={model}", "run_dir=x"])).model
with torch.device("meta"):
    model = GPT(config)
model.to_empty(device="cpu")
model.init_weights(torch.Generator().manual_seed(0))
save_checkpoint("{dir}/ckpt", config, model.state_dict(), load_tokenizer("gpt2"), overwrite=True)
"""

MAKE_ZERO3 = """
from data_prep.tokenizers import load_tokenizer
from train.config import compose
from train.config.resolve import resolve_train
from train.distributed.machine import host
from train.loop.run import build_or_resume, checkpoint_meta, start_run
from train.model.factory import ModelFactory
from train.verbs.train import run_identity
cfg = compose.to_schema(compose.compose("train", ["model={model}", "deepspeed=zero3",
    "precision=bf16", "run_dir={dir}/run", "micro_batch_size=1", "global_batch_size=2",
    "peak_flops=1"]))
where = host(cfg.accelerator)
resolved = resolve_train(cfg, where.world)
cfg = resolved.cfg
run = start_run(resolved, where)
identity = run_identity(cfg, {{}})
engine, state, _ = build_or_resume(cfg, run, identity, ModelFactory(cfg.model))
tokenizer = load_tokenizer("gpt2")
meta = checkpoint_meta(engine.spec.layout, identity, cfg.model, tokenizer)
run.checkpoints.save(engine, state, meta, tokenizer)
"""

OURS = """
import torch
from train.checkpoints.export import export_hf
export_hf("{source}", "{dir}/{out}", overwrite=True, dtype=torch.{dtype}, verify={verify})
"""

THEIRS = """
import json
import torch
from transformers import GPTNeoForCausalLM
from train.checkpoints.model_format import model_config_from_dict, read_checkpoint
from train.checkpoints.hf import config_to_hf
from data_prep.tokenizers import load_tokenizer
{read}
hf_config = config_to_hf(config, load_tokenizer("gpt2"), torch.{dtype})
with torch.device("meta"):
    model = GPTNeoForCausalLM(hf_config)
model.load_state_dict({{k: v.to(torch.{dtype}) for k, v in state.items()}}, assign=True)
del state
model.tie_weights()
model.save_pretrained("{dir}/theirs")
"""

READ = {
    "checkpoint": 'config, state = read_checkpoint("{dir}/ckpt")',
    "zero3": """
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
tag = open("{dir}/run/checkpoints/latest").read().strip()
saved = json.load(open(f"{dir}/run/checkpoints/{{tag}}/trainer_state.json"))
config = model_config_from_dict(saved["model"], "trainer_state.json")
state = get_fp32_state_dict_from_zero_checkpoint("{dir}/run/checkpoints", tag=tag)
""",
}

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


def run(code: str, directory: Path, name: str, ranks: int = 0) -> tuple[float, float, float]:
    """(seconds, peak RSS GiB, peak anonymous GiB) of `code` in a fresh process (`ranks`:
    that many under torchrun; the peaks are then not measured)."""
    script = directory / f"{name}.py"
    script.write_text(textwrap.dedent(code))
    start = time.perf_counter()
    if ranks:
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [str(torchrun), "--nproc_per_node", str(ranks), str(script)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        return time.perf_counter() - start, 0.0, 0.0
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(script)], cwd=ROOT, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    rss, anon = (int(x) for x in done.stdout.split("PEAK_KB")[-1].split())
    return seconds, rss / 2**20, anon / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", choices=["checkpoint", "zero3"], default="checkpoint")
    parser.add_argument("--model", default="gpt_neo_1.3b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dir", default="/tmp/neo_export_bench")
    args = parser.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    fields = {"dir": directory, "model": args.model, "dtype": args.dtype}
    if args.source == "checkpoint":
        made = run(MAKE.format(**fields), directory, "make")
        fields["source"] = directory / "ckpt"
        size = (directory / "ckpt" / "model.safetensors").stat().st_size / 2**30
        what = f"neotrain checkpoint {size:.2f} GiB fp32"
    else:
        made = run(MAKE_ZERO3.format(**fields), directory, "make", ranks=2)
        fields["source"] = directory / "run" / "checkpoints"
        files = list(fields["source"].glob("step_*/*.pt"))
        size = sum(f.stat().st_size for f in files) / 2**30
        what = f"ZeRO-3 checkpoint of 2 ranks, {len(files)} files, {size:.2f} GiB"
    fields["read"] = READ[args.source].format(**fields)
    print(f"{args.model}: {what} (made in {made[0]:.0f} s); export dtype {args.dtype}\n")
    rows = []
    for label, code, out in [
        ("neo export (verified)", OURS.format(**fields, out="ours", verify=True), "ours"),
        ("neo export, no verification", OURS.format(**fields, out="ours2", verify=False), "ours2"),
        (
            ("zero_to_fp32 + " if args.source == "zero3" else "") + "save_pretrained",
            THEIRS.format(**fields),
            "theirs",
        ),
    ]:
        seconds, peak, anon = run(code, directory, out)
        written = sum(p.stat().st_size for p in (directory / out).glob("*.safetensors")) / 2**30
        rows.append(
            [
                label,
                f"{seconds:.1f}",
                f"{peak:.2f}",
                f"{anon:.2f}",
                f"{anon / written:.2f}",
                f"{written:.2f}",
            ]
        )
    markdown(
        [
            "step",
            "seconds",
            "peak RSS GiB",
            "peak anonymous GiB",
            "anonymous / exported weights",
            "weights written GiB",
        ],
        rows,
    )
    shutil.rmtree(directory)


if __name__ == "__main__":
    main()
