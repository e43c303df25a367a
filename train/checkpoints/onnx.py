"""`neo export format=onnx`: our GPT as ONNX graphs for ONNX Runtime (and runtimes that read
ONNX: MIGraphX, Ascend's ATC), exported with torch's own exporter (torch.onnx.export, dynamo).

    model.onnx                   input_ids, attention_mask, position_ids -> logits
                                 (with_past: and present.{i}.key / present.{i}.value)
    decoder_with_past.onnx       the same inputs for the new tokens, attention_mask covering
    (with_past=true)             past + new tokens, and past_key_values.{i}.key / .value
                                 (batch, heads, past, head_dim) -> logits, present.*

The layout of ONNX Runtime's and optimum's GPT-Neo decoders. Attention is written out densely:
a key is visible when its token is real (attention_mask), not after the query, and within the
layer's window, positions counted over real tokens only (the cumulative sum of the mask), so
left- and right-padded batches and rows of different lengths give each row its own result.
Batch and sequence axes are dynamic. Over 2 GB the weights go to external data.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from train.model.gpt import GPT
from train.model.masks import visible

OPSET = 20
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class OnnxDecoder(nn.Module):
    """The GPT's modules, run with explicit masks and key/value inputs and outputs."""

    def __init__(self, model: GPT, with_past: bool, past_in: bool):
        super().__init__()
        self.model, self.with_past, self.past_in = model, with_past, past_in
        self.config = model.config

    def forward(self, input_ids, attention_mask, position_ids, *past):
        t = self.model.transformer
        c = self.config
        x = t.wte(input_ids) + t.wpe(position_ids)
        # Key positions over real tokens: the first real token is 0 wherever padding sits.
        key_pos = torch.cumsum(attention_mask, dim=-1) - 1  # (B, S)
        real = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        q_pos = position_ids[:, None, :, None]  # (B, 1, T, 1)
        k_pos = key_pos[:, None, None, :]
        presents = []
        for i, block in enumerate(t.h):
            attn = block.attn.attention
            h = block.ln_1(x)
            B, T, C = h.shape
            q, k, v = (
                p(h).view(B, T, c.num_heads, -1).transpose(1, 2)
                for p in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            if self.past_in:
                k = torch.cat([past[2 * i], k], dim=2)
                v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            allowed = visible(attn.kind, q_pos, k_pos, attn.window, attn.stride) & real
            scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
            scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
            y = (F.softmax(scores, dim=-1).to(v.dtype) @ v).transpose(1, 2).reshape(B, T, C)
            x = x + attn.out_proj(y)
            x = x + block.mlp(block.ln_2(x))
        logits = self.model.lm_head(t.ln_f(x))
        return (logits, *presents) if self.with_past else logits


NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnx_ir", "onnxscript")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's notes no user acts on: optional torchvision ops it skips registering,
    constants its optimizer merges, and axis names it merges (every input's batch axis is one
    dimension)."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(
    model: GPT, directory: Path, with_past: bool, dtype: torch.dtype, opset: int = OPSET
) -> list[str]:
    """Write model.onnx (and decoder_with_past.onnx) into `directory`; the files written."""
    c = model.config
    model = model.to(dtype).eval()
    heads, head_dim = c.num_heads, c.hidden_size // c.num_heads
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("sequence"), None
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.ones_like(ids)
    pos = torch.arange(3).expand(2, 3).contiguous()
    names_in = ["input_ids", "attention_mask", "position_ids"]
    names_out = ["logits"] + [
        f"present.{i}.{kv}" for i in range(c.num_layers) for kv in ("key", "value")
    ] * with_past
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 2**31 - 2**26
    written = []
    jobs = [("model.onnx", False)] + ([("decoder_with_past.onnx", True)] if with_past else [])
    for name, past_in in jobs:
        module = OnnxDecoder(model, with_past, past_in).eval()
        args: tuple = (ids, mask, pos)
        shapes: list = [{0: batch, 1: seq}] * 3
        inputs = list(names_in)
        if past_in:
            past = torch.export.Dim("past")
            total = torch.ones(2, 5, dtype=torch.int64)  # 2 past + 3 new
            args = (ids, total, pos + 2)
            shapes = [
                {0: batch, 1: seq},
                {0: batch, 1: torch.export.Dim("total")},
                {0: batch, 1: seq},
            ]
            # Distinct tensors: the exporter would take one object passed twice for one input.
            cache = [torch.randn(2, heads, 2, head_dim).to(dtype) for _ in range(2 * c.num_layers)]
            args = (*args, *cache)
            shapes.append(tuple([{0: batch, 2: past}] * (2 * c.num_layers)))  # *past: one entry
            inputs += [
                f"past_key_values.{i}.{kv}" for i in range(c.num_layers) for kv in ("key", "value")
            ]
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                args,
                dynamic_shapes=tuple(shapes),
                input_names=inputs,
                output_names=names_out,
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        program.save(str(directory / name), external_data=large)
        written.append(name)
    return written
