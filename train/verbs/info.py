"""`neo info`: parameters, FLOPs per token and model-state memory of a model size.

Everything is computed from the config and a model built on the meta device, so no weights are
allocated and a 175B plan prints in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from train.config import ConfigError, InfoConfig, ModelConfig
from train.distributed import devices as accel
from train.distributed import machine as hw
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


def run(cfg: InfoConfig) -> None:
    config = cfg.model.validate()
    if cfg.world_size < 1:
        raise ConfigError(f"world_size={cfg.world_size} must be >= 1")
    seq_len = cfg.seq_len or config.max_position_embeddings
    config.check_sequence_length(seq_len)
    params = count_parameters(config)
    flops = flops_per_token(config, seq_len)

    console = Console()
    size = Table(title=f"model {config.name}", show_header=False)
    size.add_column(style="bold")
    size.add_column(justify="right")
    for label, value in [
        (
            "layers / hidden / heads / head dim",
            f"{config.num_layers} / {config.hidden_size} / {config.num_heads} / {config.head_dim}",
        ),
        ("MLP width", f"{config.ffn_size:,}"),
        ("context / vocabulary", f"{config.max_position_embeddings:,} / {config.vocab_size:,}"),
        ("attention", describe_attention(config)),
        ("parameters (lm_head tied)", f"{params.total:,}"),
        ("  of which embeddings", f"{params.embedding:,}"),
        (f"training FLOPs per token (seq {seq_len})", f"{flops:,.4g}"),
        ("training FLOPs for 1B tokens", f"{flops * 1e9:,.4g}"),
    ]:
        size.add_row(label, value)
    console.print(size)

    memory = Table(
        title=f"model-state memory per device, {cfg.world_size} device(s), mixed-precision Adam "
        f"({WEIGHT_BYTES}+{GRAD_BYTES}+{OPTIMIZER_BYTES} bytes/parameter; activations not included)"
    )
    for column in ("ZeRO stage", "weights GiB", "grads GiB", "optimizer GiB", "total GiB"):
        memory.add_column(column, justify="right")
    for stage in range(4):
        m = zero_memory_bytes(params.total, stage, cfg.world_size)
        memory.add_row(
            str(stage), *(f"{m[k] / GIB:,.2f}" for k in ("weights", "grads", "optimizer", "total"))
        )
    console.print(memory)
    console.print(machine_table())


def machine_table():
    """This machine, as `neo train` sees it: device, native bf16, what precision=auto picks,
    and the measured matmul peaks behind MFU."""
    acc = accel.select("auto")
    m = hw.describe(acc)
    precision, _ = hw.resolve_precision("auto", acc, m)
    table = Table(title="this machine", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("device", m.summary())
    table.add_row("native bf16", f"{'yes' if m.native_bf16 else 'no'}: {m.bf16_reason}")
    table.add_row("precision=auto", precision)
    for name in ("fp32", "bf16"):
        peak = hw.matmul_peak(hw.DTYPES[name], acc, m)
        table.add_row(f"matmul peak, {name}", f"{peak / 1e9:,.1f} GFLOP/s")
    table.add_row("", f"measured, cached in {hw.cache_path()}")
    return table
