"""SFT packing against padding on the bundled instruction set, side by side in one run: the
share of the computed tokens that is padding, and training tokens/s.

    python bench/sft.py [--quick] [--seq-lens 256 [512 1024]] [--tokens 8192] [--repeats 2]
                        [--no-naive] [--micro-batch 4] [--global-batch 8] [--neo-sft STEPS]

Data: every record of data_prep/sample/sft_instructions.jsonl (Alpaca format, GPT-2
tokenizer, loss on the responses), read as `neo sft` reads it (train.data.sft.read_examples,
max_tokens = seq_len); `neo sft` itself holds 5% back for validation, this benchmark does not.
Model: configs/model/tiny.yaml (hidden 128, 4 layers, 4 heads, global/local, window 64, GPT-2
vocabulary) with max_position_embeddings raised to the sequence length where that is longer,
random weights (seeded), fp32, all cores.

Three ways to make micro-batches of `--micro-batch` rows, in the order `neo sft` trains
(train.data.packing.RowStream, seed 1234):
- packed: `pack` (several examples per seq_len row, train.data.packing.pack_bins: first-fit
  decreasing, improved by a cutting-stock LP where that is far from the bound; positions restart
  and attention is blocked at each example: `documents`), what sft.packing=true does;
- padded: one example per row (`padded_rows`), each micro-batch padded to its longest row by
  `collate`, what sft.packing=false does;
- padded to seq_len: one example per row, every row padded to seq_len (the naive baseline;
  the same examples in the same micro-batches as padded; `--no-naive` counts it, untimed).
All three use the same `--micro-batch` and `--global-batch` in rows, as flipping sft.packing
does, so a packed micro-batch holds several times the examples of a padded one (its bigger
matmuls, and fewer optimizer steps per epoch, are part of what packing gains).
The first table counts the whole epoch: tokens computed (rows x length, every micro-batch),
real tokens (not padding), padding share, trained tokens (targets != -100: each response and
its end-of-text).
Three more layouts are counted there, not timed: packed by first-fit decreasing alone (what
`pack_bins` starts from), padded in file order (what `neo sft` logs as the padding of padded
rows) and padded after sorting by length (bucketing, a common alternative to packing); and the
rows a perfect packing would need, ceil(real / seq_len).

The second table times training: forward, backward (the loss weighted by the micro-batch's
share of the step's targets, as train/loop/fit.py does), gradient clipping at 1.0 and an AdamW
step every global/micro micro-batches, a plain PyTorch loop on micro-batches collated in
advance. Each layout trains on the shortest prefix of its epoch, in whole optimizer steps,
holding at least `--tokens` real tokens (0: the whole epoch), so every layout trains on about
the same real tokens; the sample's own padding share is shown. The layouts take turns within
every repeat (after one warm-up optimizer step of each), so a busy phase of the machine hits
them all; the time is the best of `--repeats`, the median in brackets. Real tokens/s is what
counts: the examples trained per second, whatever the padding; computed tokens/s shows the
cost of the work itself (packed rows pay for the document mask in attention).

`--neo-sft STEPS` also runs the real command, `neo sft` (DeepSpeed ZeRO-0, fp32, fresh tiny
weights) for STEPS steps with sft.packing=true and =false, and reads each step's time from
its metrics.jsonl (tokens_per_s is cfg.tokens_per_step = global batch x seq_len over the
step's seconds, so seconds = that / tokens_per_s; the rate itself counts padded rows as
seq_len tokens and is not used); an epoch's time is the mean step time after the first two
steps x ceil(rows / global batch), rows as `neo sft` logs them. Both cover the same examples,
so the ratio of epoch times is the ratio of real tokens/s. Only the default seq_len.

Goals (issue): packing under 5% padding, at equal or better (real) tokens/s than padded
batches. Runtime on 2 cores: the default about a minute on an otherwise quiet machine, `--quick`
about 25 seconds with a test suite running beside it (which slowed training 3-5x); a longer
seq_len costs more mainly through padding to seq_len (seq_len / 256 times the work of 256's:
`--no-naive`), and `--neo-sft` adds two `neo sft` start-ups besides its steps. The machine's
other work shows in the numbers: on a small, shared CPU run it alone and more than once before
trusting a ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from markdown_table import markdown

from data_prep.tokenizers import load_tokenizer
from train.config.model import ModelConfig
from train.data.packing import (
    RowStream,
    build_row,
    collate,
    first_fit_decreasing,
    pack,
    pack_bins,
    padded_rows,
)
from train.data.sft import IGNORE, Example, read_examples
from train.loop.metrics import read_metrics
from train.model.gpt import GPT

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data_prep" / "sample" / "sft_instructions.jsonl"
TINY = ROOT / "configs" / "model" / "tiny.yaml"
NEO = str(Path(sys.executable).with_name("neo"))
SEED = 1234  # sft.seed's default: the order of the rows
TIMED = ("packed", "padded", "padded to seq_len")


@dataclass
class Layout:
    """An epoch of collated micro-batches, in training order, and their token counts."""

    name: str
    rows: int
    batches: list[dict[str, np.ndarray]]
    real: list[int]  # real (not padding) tokens of each micro-batch
    computed: list[int] = field(init=False)  # rows x length of each micro-batch
    trained: list[int] = field(init=False)  # targets != -100 of each micro-batch

    def __post_init__(self) -> None:
        self.computed = [b["input_ids"].size for b in self.batches]
        self.trained = [int((b["targets"] != IGNORE).sum()) for b in self.batches]

    def padding(self, n: int | None = None) -> float:
        """The share of the computed tokens of the first n micro-batches that is padding."""
        return 1 - sum(self.real[:n]) / sum(self.computed[:n])


def layout(
    name: str, rows: list[dict], real: list[int], micro: int, pad_id: int, order: list[int]
) -> Layout:
    rows, real = [rows[i] for i in order], [real[i] for i in order]
    batches, counts = [], []
    for i in range(0, len(rows), micro):
        batches.append(collate(rows[i : i + micro], pad_id))
        counts.append(sum(real[i : i + micro]))
    return Layout(name, len(rows), batches, counts)


def stream_order(n: int) -> list[int]:
    """The order `neo sft` visits n rows in its first epoch."""
    stream = RowStream([{"targets": np.zeros(1)}] * n, SEED)
    return [stream.index(k) for k in range(n)]


def layouts(examples: list[Example], seq_len: int, micro: int, pad_id: int) -> list[Layout]:
    packed = pack(examples, seq_len, pad_id)
    ffd = pack(examples, seq_len, pad_id, first_fit_decreasing([len(e) for e in examples], seq_len))
    padded = padded_rows(examples)
    to_seq_len = []
    for e in examples:
        row = build_row([e], seq_len, pad_id)
        del row["documents"]  # as padded_rows: causal attention keeps the padding out of view
        to_seq_len.append(row)
    lengths = [len(e) for e in examples]
    n = len(examples)
    return [
        layout(
            "packed",
            packed,
            [int((r["documents"] >= 0).sum()) for r in packed],
            micro,
            pad_id,
            stream_order(len(packed)),
        ),
        layout(
            "packed, first-fit decreasing only",
            ffd,
            [int((r["documents"] >= 0).sum()) for r in ffd],
            micro,
            pad_id,
            stream_order(len(ffd)),
        ),
        layout("padded", padded, lengths, micro, pad_id, stream_order(n)),
        layout("padded to seq_len", to_seq_len, lengths, micro, pad_id, stream_order(n)),
        layout("padded, file order", padded, lengths, micro, pad_id, list(range(n))),
        layout(
            "padded, sorted by length",
            padded,
            lengths,
            micro,
            pad_id,
            sorted(range(n), key=lambda i: (lengths[i], i)),
        ),
    ]


def sample_size(lay: Layout, tokens: int, accumulation: int) -> int:
    """Micro-batches in the shortest prefix of whole optimizer steps with >= tokens real
    tokens (the whole epoch if tokens is 0 or more than it holds)."""
    total = 0
    for i, real in enumerate(lay.real):
        total += real
        if tokens and total >= tokens and (i + 1) % accumulation == 0:
            return i + 1
    return len(lay.real)


class Trainer:
    """The model and AdamW; `steps` trains on micro-batches, an optimizer step every
    `accumulation` of them."""

    def __init__(self, config: ModelConfig, accumulation: int):
        self.model = GPT(config).init_weights(torch.Generator().manual_seed(0)).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-5, weight_decay=0.0)
        self.accumulation = accumulation

    def steps(self, batches: list[dict[str, np.ndarray]]) -> float:
        """Seconds to train on `batches` (whole optimizer steps)."""
        a = self.accumulation
        start = time.perf_counter()
        for first in range(0, len(batches), a):
            group = batches[first : first + a]
            in_step = sum(int((b["targets"] != IGNORE).sum()) for b in group)
            for arrays in group:
                batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
                loss = self.model(**batch)  # summed over this micro-batch's targets
                (loss.total / in_step).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def model_config(seq_len: int) -> ModelConfig:
    values = yaml.safe_load(TINY.read_text())
    values["max_position_embeddings"] = max(values["max_position_embeddings"], seq_len)
    return ModelConfig(**values)


def bench_seq_len(seq_len: int, tokenizer, args) -> tuple[float, float]:
    """Both tables for one sequence length; (packed padding share, packed / padded real
    tokens/s)."""
    read = read_examples(str(DATA), "alpaca", tokenizer, seq_len)
    examples = read.examples
    accumulation = args.global_batch // args.micro_batch
    lays = layouts(examples, seq_len, args.micro_batch, tokenizer.eod_id)
    real = sum(len(e) for e in examples)
    perfect = math.ceil(real / seq_len)
    start = time.perf_counter()
    pack_bins([len(e) for e in examples], seq_len)
    packing_seconds = time.perf_counter() - start
    config = model_config(seq_len)
    names = TIMED[:2] if args.no_naive else TIMED

    print(
        f"\n### seq_len {seq_len}: {len(examples)} examples ({read.truncated} truncated, "
        f"{read.skipped.count} skipped), {real:,} tokens; micro-batch {args.micro_batch} rows, "
        f"optimizer step {args.global_batch} rows\n"
    )
    header = [
        "layout",
        "rows",
        "micro-batches",
        "optimizer steps",
        "tokens computed",
        "real tokens",
        "padding",
        "trained tokens",
        "computed / trained",
    ]
    rows = []
    for lay in lays:
        computed, trained = sum(lay.computed), sum(lay.trained)
        rows.append(
            [
                lay.name + ("" if lay.name in names else " (not timed)"),
                f"{lay.rows:,}",
                f"{len(lay.batches):,}",
                f"{math.ceil(lay.rows / args.global_batch):,}",
                f"{computed:,}",
                f"{sum(lay.real):,}",
                f"{lay.padding():.1%}",
                f"{trained:,}",
                f"{computed / trained:.2f}",
            ]
        )
    markdown(header, rows)
    print(
        f"\nOne epoch. A perfect packing needs ceil({real:,} / {seq_len}) = {perfect} rows "
        f"({1 - real / (perfect * seq_len):.1%} padding); `pack_bins` made {lays[0].rows} "
        f"(in {packing_seconds:.2f} s), first-fit decreasing alone {lays[1].rows}. "
        "Trained tokens: the targets (each response and its end-of-text); "
        f"the examples hold {sum(e.trained_tokens for e in examples):,}."
    )

    timed = [lay for lay in lays if lay.name in names]
    samples = {lay.name: sample_size(lay, args.tokens, accumulation) for lay in timed}
    trainers = {lay.name: Trainer(config, accumulation) for lay in timed}
    for lay in timed:  # warm-up: one optimizer step of each
        trainers[lay.name].steps(lay.batches[:accumulation])
    seconds: dict[str, list[float]] = {lay.name: [] for lay in timed}
    for _ in range(args.repeats):
        for lay in timed:
            n = samples[lay.name]
            seconds[lay.name].append(trainers[lay.name].steps(lay.batches[:n]))

    threads = torch.get_num_threads()
    print(
        f"\n### Training tokens/s, seq_len {seq_len}, tiny model ({describe(trainers['packed'])}"
        f"), fp32, {threads} threads: best of {args.repeats} (median), after one warm-up step\n"
    )
    header = [
        "layout",
        "micro-batches (steps)",
        "real tokens",
        "padding in sample",
        "seconds",
        "computed tokens/s",
        "real tokens/s",
        "trained tokens/s",
        "real tokens/s vs padded",
    ]
    rows = []
    rate = {lay.name: sum(lay.real[: samples[lay.name]]) / min(seconds[lay.name]) for lay in timed}
    for lay in timed:
        n = samples[lay.name]
        best, median = min(seconds[lay.name]), statistics.median(seconds[lay.name])
        rows.append(
            [
                lay.name,
                f"{n} ({math.ceil(n / accumulation)})",
                f"{sum(lay.real[:n]):,}",
                f"{lay.padding(n):.1%}",
                f"{best:.2f} ({median:.2f})",
                f"{sum(lay.computed[:n]) / best:,.0f}",
                f"{rate[lay.name]:,.0f}",
                f"{sum(lay.trained[:n]) / best:,.0f}",
                f"{rate[lay.name] / rate['padded']:.2f}x",
            ]
        )
    markdown(header, rows)
    share, speedup = lays[0].padding(), rate["packed"] / rate["padded"]
    print(
        f"\nGoals at seq_len {seq_len}: packing's padding {share:.1%} "
        f"({'met' if share < 0.05 else 'NOT met'}: < 5%); packed / padded real tokens/s "
        f"{speedup:.2f}x ({'met' if speedup >= 1 else 'NOT met'}: >= 1.00x)."
    )
    return share, speedup


def neo_sft(run_dir: Path, packing: bool, steps: int, args) -> tuple[int, list[float], str]:
    """(rows, seconds of each step, the rows line) of `neo sft` run for `steps` steps."""
    command = [
        NEO,
        "sft",
        f"run_dir={run_dir}",
        f"sft.packing={str(packing).lower()}",
        "epochs=null",
        f"max_steps={steps}",
        f"micro_batch_size={args.micro_batch}",
        f"global_batch_size={args.global_batch}",
        "precision=fp32",
        "deepspeed=zero0",
        "eval_every=100000",
        "save_every=100000",
        "samples=0",
        "export_hf=false",
        "logger.log_every=1",
        "logger.wandb.mode=disabled",
    ]
    # A scratch working directory: no runs/demo there, so a fresh tiny model (as said above).
    proc = subprocess.run(command, capture_output=True, text=True, cwd=run_dir.parent)
    out = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out[-3000:]}")
    found = re.search(r"\d+ training examples in (\d+) rows \([^)]*\)", out)
    if not found:
        raise RuntimeError(f"no 'N training examples in R rows' line in the output:\n{out[-3000:]}")
    per_step = args.global_batch * model_config(0).max_position_embeddings
    times = [
        per_step / r["tokens_per_s"]
        for r in read_metrics(run_dir)
        if r.get("tokens_per_s") and r["step"] > 2
    ]
    return int(found.group(1)), times, found.group(0)


def neo_sft_table(args) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for packing in (True, False):
            run_dir = Path(tmp) / f"packing-{packing}"
            results[packing] = neo_sft(run_dir, packing, args.neo_sft, args)
    print(
        f"\n### `neo sft` itself, {args.neo_sft} steps each way (ZeRO-0, fp32, micro-batch "
        f"{args.micro_batch}, global batch {args.global_batch}): mean step time after step 2\n"
    )
    header = [
        "sft.packing",
        "its log line",
        "steps timed",
        "s/step",
        "steps/epoch",
        "s/epoch (estimated)",
        "padded / packed epoch time",
    ]
    epoch = {}
    for packing, (rows, times, _) in results.items():
        epoch[packing] = statistics.mean(times) * math.ceil(rows / args.global_batch)
    table = []
    for packing, (rows, times, line) in results.items():
        steps = math.ceil(rows / args.global_batch)
        table.append(
            [
                str(packing).lower(),
                line,
                str(len(times)),
                f"{statistics.mean(times):.3f}",
                str(steps),
                f"{epoch[packing]:.1f}",
                f"{epoch[False] / epoch[packing]:.2f}x",
            ]
        )
    markdown(header, table)
    print(
        "\nThe epoch-time ratio is packed / padded real tokens/s (both epochs hold the same "
        "examples). `neo sft` trains on 95% of the records (5% validation)."
    )


def describe(trainer: Trainer) -> str:
    c = trainer.model.config
    return (
        f"hidden {c.hidden_size}, {c.num_layers} layers, window {c.window_size}, "
        f"{trainer.model.num_parameters() / 1e6:.1f}M parameters"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: seq_len 256, 1,024 real tokens, 1 repeat"
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256])
    parser.add_argument(
        "--tokens", type=int, default=8192, help="real tokens per layout and repeat; 0: an epoch"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--no-naive", action="store_true", help="count padding to seq_len, do not time it"
    )
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--global-batch", type=int, default=8, help="rows per optimizer step")
    parser.add_argument(
        "--neo-sft",
        type=int,
        default=0,
        metavar="STEPS",
        help="also run `neo sft` both ways for STEPS (> 2) steps",
    )
    args = parser.parse_args()
    if args.quick:
        args.seq_lens, args.tokens, args.repeats = [256], 1024, 1
    if args.global_batch % args.micro_batch:
        parser.error("--global-batch must be a multiple of --micro-batch")
    if args.neo_sft and args.neo_sft < 3:
        parser.error("--neo-sft needs at least 3 steps (the first two are not timed)")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"torch {torch.__version__}, CPU fp32, {DATA.relative_to(ROOT)}")
    tokenizer = load_tokenizer("gpt2")
    summary = [bench_seq_len(seq_len, tokenizer, args) for seq_len in args.seq_lens]
    if len(summary) > 1:
        print("\n### Summary\n")
        markdown(
            ["seq_len", "packed padding", "packed / padded real tokens/s"],
            [
                [str(s), f"{share:.1%}", f"{speedup:.2f}x"]
                for s, (share, speedup) in zip(args.seq_lens, summary, strict=True)
            ],
        )
    if args.neo_sft:
        neo_sft_table(args)


if __name__ == "__main__":
    main()
