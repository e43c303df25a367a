"""`neo export`: any checkpoint (train/load.py) -> a Hugging Face GPTNeoForCausalLM directory
(a task model: GPTNeoForSequenceClassification), with checksums.sha256 and probe.json, verified
(train/bundle.py) before it is renamed into place."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from data_prep.tokenizers import load_tokenizer
from train import bundle
from train.card import read_records
from train.config import ModelConfig
from train.hf import write_hf_dir
from train.load import read_any, read_head

log = logging.getLogger("neo.export")
GPT2_VOCAB = 50257


def export_hf(
    input_dir: str | Path,
    output_dir: str | Path,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
    verify: bool = True,
    eval_results: str | None = None,
) -> ModelConfig:
    """A checkpoint -> a directory GPTNeoForCausalLM and AutoTokenizer load offline.
    `tokenizer`: a tokenizer to export with it (default: the checkpoint's own; without one,
    GPT-2's where the vocabulary is GPT-2's size, else none, said so). The model card is
    written from the run's records (train/card.py), with `eval_results` (a neo eval
    results.json) or the one found in the run."""
    config, state, found = read_any(input_dir)
    head = read_head(input_dir)
    tok = load_tokenizer(tokenizer) if tokenizer else found
    if not tokenizer and tok is not None and tok.vocab_size > config.vocab_size:
        tok = None  # what the checkpoint offers cannot be its tokenizer (GPT-2's by default)
    if tok is None and config.vocab_size >= GPT2_VOCAB:
        log.info("%s has no tokenizer; exporting GPT-2's (vocab_size=%d)", input_dir,
                 config.vocab_size)  # fmt: skip
        tok = load_tokenizer("gpt2")
    elif tok is None:
        log.warning("%s has no tokenizer and none fits vocab_size=%d: the export has no "
                    "tokenizer files (pass tokenizer=PATH to include one)", input_dir,
                    config.vocab_size)  # fmt: skip

    def finish(tmp: Path, dtype: torch.dtype) -> None:
        bundle.write_probe(tmp, config, state, tok, head, dtype)
        bundle.write_checksums(tmp)
        if verify:
            for line in bundle.verify(tmp, usage=False):
                log.info("verified: %s", line)

    records = read_records(input_dir, eval_results)
    write_hf_dir(output_dir, config, state, tok, overwrite=overwrite, dtype=dtype,
                 source=str(input_dir), head=head, finish=finish, records=records)  # fmt: skip
    return config
