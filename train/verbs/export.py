"""`neo export`: any checkpoint (a neotrain checkpoint, a run directory, a DeepSpeed checkpoint)
-> a verified Hugging Face GPTNeoForCausalLM directory (or ONNX graphs with format=onnx).

    neo export                                  # the demo run (runs/demo) -> exports/demo
    neo export input=runs/my-run output=exports/my-model dtype=bfloat16
"""

from __future__ import annotations

import logging

import torch

from train.checkpoints.export import export_hf, export_onnx_dir
from train.checkpoints.load import require_checkpoint
from train.config.resolve import Resolved, resolve_plain
from train.config.shell import verify_command
from train.config.tools import ExportConfig
from train.model.sizes import count_parameters

log = logging.getLogger("neo.export")


def main(cfg: ExportConfig) -> None:
    run(resolve_plain(cfg))


def run(resolved: Resolved[ExportConfig]) -> None:
    cfg = resolved.cfg
    require_checkpoint(cfg.input, "input")
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    if cfg.format == "onnx":
        config = export_onnx_dir(
            cfg.input,
            cfg.output,
            overwrite=cfg.overwrite,
            dtype=dtype,
            with_past=cfg.with_past,
            opset=cfg.opset,
            tokenizer=cfg.tokenizer,
        )
    else:
        config = export_hf(
            cfg.input,
            cfg.output,
            overwrite=cfg.overwrite,
            dtype=dtype,
            tokenizer=cfg.tokenizer,
            eval_results=cfg.eval_results,
            max_shard_size=cfg.max_shard_size,
            usage=cfg.usage,
        )
    log.info(
        "exported %s (%s parameters) to %s, verified (its README.md says how to load it); check "
        "it again with %s",
        config.name,
        f"{count_parameters(config).total / 1e6:,.1f}M",
        cfg.output,
        verify_command(cfg.output),
    )
