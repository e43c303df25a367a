"""`neo export`: any checkpoint (train/load.py) -> a Hugging Face GPTNeoForCausalLM directory."""

from __future__ import annotations

from pathlib import Path

import torch

from data_prep.tokenizers import load_tokenizer
from train.config import ModelConfig
from train.hf import write_hf_dir
from train.load import read_any, read_head


def export_hf(
    input_dir: str | Path,
    output_dir: str | Path,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> ModelConfig:
    """A checkpoint -> a directory GPTNeoForCausalLM (a task model:
    GPTNeoForSequenceClassification) and AutoTokenizer load offline."""
    config, state, tokenizer = read_any(input_dir)
    head = read_head(input_dir)
    write_hf_dir(
        output_dir,
        config,
        state,
        tokenizer or load_tokenizer("gpt2"),
        overwrite=overwrite,
        dtype=dtype,
        source=str(input_dir),
        head=head,
    )
    return config
