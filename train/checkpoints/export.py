"""Exporting any checkpoint (train/checkpoints/load.py) -> a Hugging Face GPTNeoForCausalLM
directory (a task model: GPTNeoForSequenceClassification), with checksums.sha256 and
probe.json, verified (train/checkpoints/verify.py) before it is renamed into place."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from data_prep.files import (
    OutputKind,
    atomic_dir,
    check_apart,
    check_output_free,
    marked_by,
    when_full,
)
from data_prep.tokenizers import load_tokenizer, save_hf_tokenizer
from train.checkpoints import verify as bundle
from train.checkpoints.card import onnx_card
from train.checkpoints.checksums import write_checksums
from train.checkpoints.hf import EXPORT_KIND, read_hf_dir, write_hf_dir
from train.checkpoints.load import model_from_state, read_any, read_head
from train.checkpoints.run_records import read_records
from train.config.model import ModelConfig
from train.errors import CheckpointError, ConfigError
from train.model.sizes import count_parameters

log = logging.getLogger("neo.export")
GPT2_VOCAB = 50257
ONNX_KIND = OutputKind(
    "a `neo export format=onnx` directory (onnx_config.json)", marked_by("onnx_config.json")
)


def export_hf(
    input_dir: str | Path,
    output_dir: str | Path,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
    verify: bool = True,
    eval_results: str | None = None,
    max_shard_size: str | int = "5GB",
    usage: bool = True,
) -> ModelConfig:
    """A checkpoint -> a directory GPTNeoForCausalLM and AutoTokenizer load offline.
    `tokenizer`: a tokenizer to export with it (default: the checkpoint's own; without one,
    GPT-2's where the vocabulary is GPT-2's size, else none, said so). The model card is
    written from the run's records (train/checkpoints/card.py), with `eval_results` (a neo eval
    results.json) or the one found in the run. `verify`: `neo verify` on the directory before
    it is renamed into place (`usage`: the card's pipeline usage too)."""
    check_apart(output_dir, [input_dir])  # before any work; write_hf_dir checks again
    check_output_free(Path(output_dir), overwrite, EXPORT_KIND)
    config, state, found = read_any(input_dir, lazy=True)  # tensors read as they are written
    head = read_head(input_dir)
    tok = export_tokenizer(input_dir, config, found, tokenizer)

    def finish(tmp: Path, dtype: torch.dtype) -> None:
        # Our model on the weights as written (the source tensors are gone by now: one copy
        # of the model in memory at a time), in GPT-Neo's terms (any attention scale folded).
        written, weights = read_hf_dir(tmp)
        bundle.write_probe(tmp, bundle.probe(written, weights, tok, head, dtype))
        del weights
        write_checksums(tmp)
        if verify:
            for line in bundle.verify(tmp, usage=usage):
                log.info("verified: %s", line)

    records = read_records(input_dir, eval_results)
    write_hf_dir(
        output_dir,
        config,
        state,
        tok,
        overwrite=overwrite,
        dtype=dtype,
        source=str(input_dir),
        head=head,
        finish=finish,
        records=records,
        max_shard_size=max_shard_size,
        inputs=(input_dir,),
    )
    return config


def export_tokenizer(input_dir, config: ModelConfig, found, tokenizer: str | None):
    """`tokenizer=` if given, else the checkpoint's own; without one that fits, GPT-2's where
    the vocabulary is GPT-2's size, else none (said so: the export has no tokenizer files)."""
    tok = load_tokenizer(tokenizer) if tokenizer else found
    if tokenizer and tok.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{input_dir}: no tokenizer fits vocab_size={config.vocab_size} "
            f"({tok.name} has {tok.vocab_size} tokens); pass tokenizer=PATH"
        )
    if not tokenizer and tok is not None and tok.vocab_size > config.vocab_size:
        tok = None  # what the checkpoint offers cannot be its tokenizer (GPT-2's by default)
    if tok is None and config.vocab_size >= GPT2_VOCAB:
        log.info(
            "%s has no tokenizer; exporting GPT-2's (vocab_size=%d)", input_dir, config.vocab_size
        )
        tok = load_tokenizer("gpt2")
    elif tok is None:
        log.warning(
            "%s has no tokenizer and none fits vocab_size=%d: the export has no "
            "tokenizer files (pass tokenizer=PATH to include one)",
            input_dir,
            config.vocab_size,
        )
    return tok


def export_onnx_dir(
    input_dir: str | Path,
    output_dir: str | Path,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    with_past: bool = True,
    opset: int = 20,
    tokenizer: str | None = None,
    verify: bool = True,
) -> ModelConfig:
    """A checkpoint -> an ONNX directory (train/checkpoints/onnx.py): model.onnx (and
    decoder_with_past.onnx), the tokenizer, onnx_config.json (names and shapes), a card on
    running it, probe.json and checksums.sha256, verified in ONNX Runtime before it is renamed
    into place."""
    from train.checkpoints.onnx import export_onnx  # torch.onnx, imported when asked for

    dtype = dtype or torch.float32
    check_apart(output_dir, [input_dir])
    check_output_free(Path(output_dir), overwrite, ONNX_KIND)
    config, state, found = read_any(input_dir)
    if read_head(input_dir) is not None:
        raise ConfigError(f"{input_dir} is a task model; ONNX export covers causal LMs")
    tok = export_tokenizer(input_dir, config, found, tokenizer)
    model = model_from_state(config, {k: v.float() for k, v in state.items()})
    needed = count_parameters(config).total * dtype.itemsize
    with (
        when_full(output_dir, lambda: needed),
        atomic_dir(output_dir, overwrite, kind=ONNX_KIND, inputs=(input_dir,)) as tmp,
    ):
        files = export_onnx(model, tmp, with_past, dtype, opset)
        d = config.hidden_size // config.num_heads
        description = {
            "format": "neotrain-onnx",
            "opset": opset,
            "dtype": str(dtype).removeprefix("torch."),
            "files": files,
            "num_layers": config.num_layers,
            "num_heads": config.num_heads,
            "head_dim": d,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings,
            "eos_token_id": tok.eod_id if tok is not None else None,
            "inputs": ["input_ids", "attention_mask", "position_ids"],
            "past_inputs": "past_key_values.{i}.key / .value: (batch, heads, past, head_dim)",
            "outputs": ["logits"] + (["present.{i}.key", "present.{i}.value"] if with_past else []),
        }
        (tmp / "onnx_config.json").write_text(json.dumps(description, indent=1) + "\n")
        if tok is not None:
            save_hf_tokenizer(tok, tmp, model_max_length=config.max_position_embeddings)
        (tmp / "README.md").write_text(
            onnx_card(config, dtype, description, read_records(input_dir))
        )
        bundle.write_probe(tmp, bundle.probe(config, state, tok, None, dtype, kind="onnx"))
        write_checksums(tmp)
        if verify:
            for line in bundle.verify(tmp, usage=False):
                log.info("verified: %s", line)
    return config
