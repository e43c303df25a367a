"""`make demo`: what neotrain does so far, end to end on the embedded defaults.

1. the size plan of GPT-Neo 1.3B (`neo info`),
2. a tiny model saved as a neotrain checkpoint,
3. `neo export` to a Hugging Face directory, loaded by transformers: same logits, and a sample
   from `generate` (random weights: the text is noise until `neo train` exists),
4. `neo import` back, and the logits once more.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

RUN_DIR = Path("runs/demo")


def neo(*args: str) -> None:
    print(f"\n$ neo {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "train.cli", *args], check=True)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.tokenizers import load_tokenizer
    from train.checkpoint import save_checkpoint
    from train.config import ModelConfig
    from train.model import GPT

    neo("info", "model=gpt_neo_1.3b", "world_size=8")

    config = ModelConfig()  # the tiny size: configs/model/tiny.yaml holds the same values
    model = GPT(config).init_weights(torch.Generator().manual_seed(0)).eval()
    ckpt = save_checkpoint(
        RUN_DIR / "checkpoint", config, model.state_dict(), load_tokenizer("gpt2"), overwrite=True
    )
    print(f"\nsaved a randomly initialised '{config.name}' model to {ckpt}")

    neo("export", f"input={ckpt}", f"output={RUN_DIR / 'hf'}", "overwrite=true")
    hf = AutoModelForCausalLM.from_pretrained(RUN_DIR / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(RUN_DIR / "hf")
    ids = tokenizer("It is a truth universally acknowledged, that", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
        sample = hf.generate(ids, max_new_tokens=12, do_sample=True, top_k=50)
    print(f"transformers loaded {RUN_DIR / 'hf'}: max |logit difference| = {diff:.2e}")
    print(f"sample (untrained weights): {tokenizer.decode(sample[0])!r}")

    neo("import", f"input={RUN_DIR / 'hf'}", f"output={RUN_DIR / 'imported'}", "overwrite=true")
    again = GPT.from_pretrained(RUN_DIR / "imported").eval()
    with torch.no_grad():
        diff = (again(ids) - model(ids)).abs().max().item()
    print(f"imported back: max |logit difference| = {diff:.2e}")
    print(f"\neverything is under {RUN_DIR}/: checkpoint/, hf/ (GPTNeoForCausalLM), imported/")


if __name__ == "__main__":
    main()
