"""`neo train` against a plain PyTorch training loop of the same model, side by side, in fp32
and bf16, and what `precision=auto` picks on this machine.

    python bench/training.py [--steps 24] [--rounds 2] [--slow-steps 3] [--skip-memory]

Model: GPT-Neo layout, 6 layers, hidden 384, 6 heads, global/local alternating (window 64),
GPT-2 vocabulary; sequence 256, batch 8 (2,048 tokens a step), one process, all cores.

- plain loop: the model, AdamW (foreach), gradient clipping, random tokens already in memory;
  bf16 through torch.autocast (the usual way to train bf16 without a framework);
- neo train: the real command on the bundled sample (data/pile_sample, prepared on first
  use), ZeRO-0 and ZeRO-1, fp32 and bf16 (DeepSpeed's bf16: bf16 weights, fp32 master copy).

Tokens/s is the median over the steps after the first few; MFU is model FLOPs per token
(train/info.flops_per_token) x tokens/s over this machine's matmul peak in that precision
(train/distributed/machine.py, measured and cached). A precision the CPU does not compute
natively (bf16
without AVX512-BF16 or AMX: 10-70x slower) runs `--slow-steps` steps in one round, the first
being warm-up, and skips the memory table. Memory: model-state bytes per rank (every live
tensor after the backward pass of step 2, when weights, gradients and optimizer state all
exist) of ZeRO-3 and ZeRO-0 on 2 ranks.

Goals (issue 4): neo train >= 1.0x the plain loop in each precision; ZeRO-3 per-rank model
state <= 60% of ZeRO-0's. Issue 8: the table says what `auto` chose and how fp32 and bf16
compare here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from train.config.model import ModelConfig
from train.config.resolve import resolve_precision
from train.distributed import devices as accel
from train.distributed import machine as hw
from train.model.gpt import GPT, next_token_loss
from train.model.sizes import flops_per_token

BIN = Path(sys.executable).parent
MODEL = dict(
    num_layers=6,
    hidden_size=384,
    num_heads=6,
    attention_types=[[["global", "local"], 3]],
    window_size=64,
    max_position_embeddings=256,
)
SEQ, BATCH, WARMUP = 256, 8, 4
OVERRIDES = [
    "model.num_layers=6",
    "model.hidden_size=384",
    "model.num_heads=6",
    "model.attention_types=[[[global,local],3]]",
    "model.window_size=64",
    "model.max_position_embeddings=256",
    "data.seq_len=256",
    "micro_batch_size=8",
    "eval_every=100000",
    "save_every=100000",
    "export_hf=false",
    "logger.log_every=1",
    "logger.wandb.mode=disabled",
]


def plain_loop(precision: str, steps: int, warmup: int) -> list[float]:
    """Tokens/s of each step of a minimal training loop, after warm-up."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**MODEL)).init_weights(torch.Generator().manual_seed(0)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.randint(0, 50257, (steps, BATCH, SEQ + 1))
    times = []
    for step in range(steps):
        start = time.perf_counter()
        x, y = data[step, :, :-1], data[step, :, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = next_token_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return [BATCH * SEQ / t for t in times[warmup:]]


def neo_train(run_dir: Path, precision: str, stage: int, steps: int, ranks: int = 1) -> list[dict]:
    args = [
        f"run_dir={run_dir}",
        f"precision={precision}",
        f"deepspeed=zero{stage}",
        f"max_steps={steps}",
        *OVERRIDES,
        f"global_batch_size={BATCH * ranks}",
    ]
    if ranks == 1:
        command = [str(BIN / "neo"), "train", *args]
    else:
        command = [
            str(BIN / "torchrun"),
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "train.cli",
            "train",
            *args,
        ]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
    if proc.returncode:
        raise RuntimeError(
            f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_tokens_per_s(records: list[dict], warmup: int) -> list[float]:
    return [r["tokens_per_s"] for r in records if r.get("tokens_per_s") and r["step"] > warmup]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--slow-steps", type=int, default=3, help="steps of a non-native bf16")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    flops = flops_per_token(ModelConfig(**MODEL), SEQ)
    acc = accel.select("cpu")
    machine = hw.describe(acc)
    auto, reason = resolve_precision("auto", hw.world(acc, machine, world_size=1))
    slow = {p for p in args.precisions if p == "bf16" and not machine.native_bf16}
    plan = {  # precision -> (steps, warm-up steps, rounds)
        p: (args.slow_steps, 1, 1) if p in slow else (args.steps, WARMUP, args.rounds)
        for p in args.precisions
    }
    # Rounds interleave the trainers, so slow phases of a noisy machine hit all of them.
    samples: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for precision in args.precisions:
                steps, warmup, rounds = plan[precision]
                if r >= rounds:
                    continue
                samples.setdefault((precision, "plain PyTorch loop"), []).extend(
                    plain_loop(precision, steps, warmup)
                )
                for stage in (0, 1):
                    records = neo_train(
                        Path(tmp) / f"{precision}{stage}-{r}", precision, stage, steps
                    )
                    samples.setdefault((precision, f"neo train, ZeRO-{stage}"), []).extend(
                        step_tokens_per_s(records, warmup)
                    )
        memory = {}
        if not args.skip_memory:
            for precision in [p for p in args.precisions if p not in slow]:
                for stage in (0, 3):
                    records = neo_train(
                        Path(tmp) / f"mem{precision}{stage}", precision, stage, 3, ranks=2
                    )
                    memory[precision, stage] = next(
                        r["tensor_bytes"] for r in records if "tensor_bytes" in r
                    )
    median = {key: statistics.median(values) for key, values in samples.items()}

    console = Console(width=120)
    console.print(f"machine: {machine.summary()}\nprecision=auto -> {auto}: {reason}")
    table = Table(
        title=f"training throughput, 6 x 384 model, seq {SEQ} x batch {BATCH}, median tokens/s "
        + ", ".join(
            f"{p}: steps {plan[p][1] + 1}-{plan[p][0]} over {plan[p][2]} round(s)"
            for p in args.precisions
        )
    )
    columns = ("precision", "trainer", "tokens/s", "vs plain loop", "vs fp32", "MFU", "peak")
    for column in columns:
        table.add_column(column, justify="right")
    for (precision, name), tok_s in median.items():
        peak = hw.matmul_peak(hw.DTYPES[precision], acc, machine)
        fp32 = median.get(("fp32", name))
        table.add_row(
            precision + (" (auto)" if precision == auto else ""),
            name,
            f"{tok_s:,.0f}",
            f"{tok_s / median[precision, 'plain PyTorch loop']:.2f}x",
            f"{tok_s / fp32:.2f}x" if fp32 else "-",
            f"{100 * flops * tok_s / peak:.1f}%",
            f"{peak / 1e9:,.1f} GFLOP/s",
        )
    console.print(table)
    if memory:
        mem = Table(
            title="model-state memory per rank, 2 ranks: every live tensor after the "
            "backward pass of step 2 (weights, gradients, optimizer state)"
        )
        for column in ("precision", "ZeRO stage", "MiB per rank", "vs ZeRO-0"):
            mem.add_column(column, justify="right")
        for (precision, stage), value in memory.items():
            mem.add_row(
                precision,
                str(stage),
                f"{value / 2**20:,.1f}",
                f"{value / memory[precision, 0]:.0%}",
            )
        console.print(mem)


if __name__ == "__main__":
    main()
