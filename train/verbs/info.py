"""`neo info`: parameters, FLOPs per token and model-state memory of a model size, and what
this machine computes natively.

Everything about the model is computed from the config and a model built on the meta device
(train/model/sizes.py), so no weights are allocated and a 175B plan prints in seconds.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from train.config.resolve import Resolved, resolve_plain, resolve_precision
from train.config.tools import InfoConfig
from train.distributed import devices, machine
from train.model.sizes import (
    GIB,
    GRAD_BYTES,
    OPTIMIZER_BYTES,
    WEIGHT_BYTES,
    count_parameters,
    describe_attention,
    flops_per_token,
    zero_memory_bytes,
)


def main(cfg: InfoConfig) -> None:
    run(resolve_plain(cfg))


def run(resolved: Resolved[InfoConfig]) -> None:
    cfg = resolved.cfg
    config = cfg.model
    seq_len = cfg.seq_len or config.max_position_embeddings
    params = count_parameters(config)
    flops = flops_per_token(config, seq_len)

    console = Console()
    size = Table(title=f"model {config.name}", show_header=False)
    size.add_column(style="bold")
    size.add_column(justify="right")
    shape = f"{config.num_layers} / {config.hidden_size} / {config.num_heads} / {config.head_dim}"
    for label, value in [
        ("layers / hidden / heads / head dim", shape),
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


def machine_table() -> Table:
    """This machine, as `neo train` sees it: device, native bf16, what precision=auto picks,
    and the measured matmul peaks behind MFU."""
    acc = devices.select("auto")
    m = machine.describe(acc)
    table = Table(title="this machine", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("device", m.summary())
    table.add_row("native bf16", f"{'yes' if m.native_bf16 else 'no'}: {m.bf16_reason}")
    precision, _ = resolve_precision("auto", machine.world(acc, m, world_size=1))
    table.add_row("precision=auto", precision)
    loaded = False
    for name in ("fp32", "bf16"):
        found = machine.measurement(machine.DTYPES[name], acc, m)
        peak = f"{max(found['layouts'].values()) / 1e9:,.1f} GFLOP/s"
        if found["loaded"] is not None:
            loaded, peak = True, f"{peak}, measured under load: not cached, not used for MFU"
        table.add_row(f"matmul peak, {name}", peak)
    table.add_row(
        "", f"measured, cached in {machine.cache_path()}" + (" when quiet" if loaded else "")
    )
    return table
