"""What a model size costs, from its config alone: parameters (counted on the meta device, so
nothing is allocated), training FLOPs per token (what each attention kind really computes), and
model-state memory per device under ZeRO 0-3."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.config.model import ModelConfig
from train.model.gpt import GPT

GIB = 1024**3

# Bytes per parameter of model state with mixed-precision Adam (ZeRO paper, Rajbhandari et al.
# 2020): 16-bit weights and gradients, fp32 master weights + momentum + variance.
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12


@dataclass
class ParameterCount:
    total: int  # distinct parameters (tied lm_head once)
    embedding: int  # wte + wpe


def count_parameters(config: ModelConfig) -> ParameterCount:
    with torch.device("meta"):
        model = GPT(config)
    embedding = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return ParameterCount(total=model.num_parameters(), embedding=embedding)


def mean_visible_keys(kind: str, seq_len: int, window: int, stride: int) -> float:
    """Average number of keys a query attends to over positions 0..seq_len-1."""
    total = 0
    for i in range(seq_len):
        if kind == "global":
            total += i + 1
        elif kind == "local":
            total += min(i + 1, window)
        else:  # strided: the band of `stride` keys plus distances stride, 2*stride, ... <= i
            total += min(i + 1, stride) + i // stride
    return total / seq_len


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 3x the forward pass (backward costs two forwards), forward
    2 FLOPs per multiply-add of every matmul: q/k/v/out projections, MLP, the logits, and the
    attention scores and weighted sums over the keys each query actually sees (so local and
    strided layers count what they compute, not T^2). Embedding lookups, norms and softmax are
    left out, as is customary."""
    T = seq_len or config.max_position_embeddings
    d, ff = config.hidden_size, config.ffn_size
    macs = config.vocab_size * d  # logits
    for kind in config.layer_kinds():
        keys = mean_visible_keys(kind, T, config.window_size, config.sparse_stride)
        macs += 4 * d * d + 2 * d * ff + 2 * d * keys
    return 3 * 2 * macs


def zero_memory_bytes(n_params: int, stage: int, world_size: int) -> dict[str, float]:
    """Model-state bytes per device for ZeRO stage 0-3 (activations and buffers not included)."""
    shard = {
        0: (1, 1, 1),
        1: (1, 1, world_size),
        2: (1, world_size, world_size),
        3: (world_size, world_size, world_size),
    }[stage]
    weights = WEIGHT_BYTES * n_params / shard[0]
    grads = GRAD_BYTES * n_params / shard[1]
    optimizer = OPTIMIZER_BYTES * n_params / shard[2]
    return {
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer,
        "total": weights + grads + optimizer,
    }


def describe_attention(config: ModelConfig) -> str:
    kinds = config.layer_kinds()
    parts = []
    for kind in ("global", "local", "strided"):
        n = kinds.count(kind)
        if n:
            extra = {
                "local": f" (window {config.window_size})",
                "strided": f" (stride {config.sparse_stride})",
            }.get(kind, "")
            parts.append(f"{n} {kind}{extra}")
    scaling = "scaled 1/sqrt(d)" if config.scale_attn_weights else "unscaled (GPT-Neo)"
    return ", ".join(parts) + f"; scores {scaling}"
