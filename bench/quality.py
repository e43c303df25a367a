"""Model quality per compute: `neo train` against karpathy/nanoGPT's `train.py`, side by side on
the same tokens, both scored by one evaluator.

    python bench/quality.py --nanogpt PATH [--steps 200] [--every 50] [--variants ...]
        [--speed-rounds 3 [--speed-steps 30]] [--speed-only] [--shape small|125m]
        [--precision fp32|bf16] [--json FILE]

PATH is a checkout of https://github.com/karpathy/nanoGPT (its code is run there, not copied
here). Shape (--shape small): 6 layers x 384, 6 heads, context 256, batch 8 x 256 tokens (or
--shape 125m: `model=gpt_neo_125m` against nanoGPT's GPT-2 124M, context 1024, batch 4 x 1024,
the recipe's second shape; slow on a CPU: use --steps 50 --every 25), the bundled corpus
as prepared by `neo prep` (data/pile_sample, prepared on first use); warmup 10 steps, cosine
decay to a tenth of the peak over the run; AdamW betas (0.9, 0.95), weight decay 0.1, clipping
1.0; nanoGPT at learning rate 1e-3, neo at its default rates (configs/train.yaml: Muon 0.01,
AdamW part 3e-3; the AdamW variants at nanoGPT's 1e-3);
fp32 (or --precision bf16: neo's `precision=bf16`, DeepSpeed's bf16, against nanoGPT's forward
under CPU autocast, as its train.py runs on a GPU; only where the CPU computes bf16 natively),
one process each (each trainer has both cores to itself: they run one after the other).

- nanoGPT reads the prepared shards' token files directly (MMIDIDX .bin files are raw uint16
  tokens; its train.bin and val.bin are links to them), samples random windows of the training
  split, and saves a checkpoint every --every steps (eval_iters=1: its own estimate is skipped);
  its architecture: GPT-2's (biases on, global attention, 1/sqrt(d) scaled), vocabulary padded
  to 50,304.
- neo trains its default recipe and each variant (--variants), saving every --every steps, with
  no validation of its own during training; model: GPT-Neo's layout (at --shape small with every
  layer global).

Every checkpoint of both is then scored by `validation_loss` on the whole validation split cut
into disjoint windows of the context length (every position once; the mean cross entropy over
the full softmax each model defines). Time is training time: the sum of the step times each trainer
logs, where a step that saved a checkpoint, and the one after, count as the median step (the
two save different amounts, and nanoGPT's save step also evaluates). Loss at equal time is
interpolated linearly between checkpoints (at step 0: ln(vocabulary), the uniform guess).

A shared machine's speed drifts by more than the difference being measured (the same trainer
ran 600 and 828 tokens/s on one machine on one day), so tokens/s is best taken from
--speed-rounds R: R rounds, each trainer --speed-steps steps in turn, the order rotated each
round; a round's ratios compare trainers that ran minutes apart. With the quality runs, its
table also gives the loss at equal time with each trainer's step time from the rounds'
medians (the losses by step do not depend on the machine's speed: both trainers are seeded).
--speed-only skips the quality runs.

Goals (issue 24): at equal training time (when the first of the two finished), neo's default
recipe >= 0.10 nats below nanoGPT, in fp32 and bf16; tokens/s >= 1.05x nanoGPT's in fp32 and
>= 1.2x in bf16.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from data_prep.manifest import open_prepared
from train.checkpoints.load import load_model
from train.distributed import devices as accel
from train.distributed import machine as hw

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DATA = ROOT / "data" / "pile_sample"
LR, MIN_LR, WARMUP = 1e-3, 1e-4, 10
SPEED_GOAL = {"fp32": 1.05, "bf16": 1.2}  # issue 24: neo's tokens/s over nanoGPT's


@dataclass(frozen=True)
class Shape:
    """The model and batch both trainers train; `neo_model`: the overrides that make neo's."""

    layers: int
    hidden: int
    heads: int
    seq: int
    batch: int
    neo_model: tuple[str, ...]

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def summary(self) -> str:
        return (
            f"{self.layers} x {self.hidden} model, {self.heads} heads, context {self.seq}, "
            f"batch {self.batch} x {self.seq}"
        )


SHAPES = {
    # every layer global, as nanoGPT's
    "small": Shape(
        6,
        384,
        6,
        256,
        8,
        (
            "model.num_layers=6",
            "model.hidden_size=384",
            "model.num_heads=6",
            "model.attention_types=[[[global],6]]",
            "model.max_position_embeddings=256",
        ),
    ),
    # GPT-Neo 125M as configs/model/gpt_neo_125m.yaml has it (global and local layers in turn)
    # against nanoGPT's GPT-2 124M
    "125m": Shape(12, 768, 12, 1024, 4, ("model=gpt_neo_125m",)),
}


def neo_overrides(shape: Shape, precision: str) -> list[str]:
    return [
        *shape.neo_model,
        f"data.seq_len={shape.seq}",
        f"micro_batch_size={shape.batch}",
        f"global_batch_size={shape.batch}",
        f"precision={precision}",
        "deepspeed=zero0",
        f"optim.warmup={WARMUP}",
        f"optim.min_lr_ratio={MIN_LR / LR}",
        "logger.log_every=1",
        "logger.wandb.mode=disabled",
        "export_hf=false",
        "keep_last=1000",
    ]


# name -> the overrides that make it (each recipe change alone; `muon` is neo train's default)
VARIANTS = {
    # AdamW at nanoGPT's learning rate
    "adamw": ["optim.name=adamw", f"optim.lr={LR}"],
    "adamw-wsd": ["optim.name=adamw", f"optim.lr={LR}", "optim.schedule=wsd"],
    "muon": ["optim.name=muon"],
    "muon-wsd": ["optim.name=muon", "optim.schedule=wsd"],
    "muon-zero": ["optim.name=muon", "model.residual_init=zero"],
    # Newton-Schulz in bf16 (optim.ns_precision=auto is fp32 in an fp32 run on a CPU, bf16 in
    # a bf16 run where the CPU computes it natively) and in fp32
    "muon-ns_bf16": ["optim.name=muon", "optim.ns_precision=bf16"],
    "muon-ns_fp32": ["optim.name=muon", "optim.ns_precision=fp32"],
    # the previous default rates: AdamW part (embeddings, positions, norms, biases) at
    # nanoGPT's 1e-3 and Muon at 0.02; then each alone, and a higher AdamW rate
    "muon-lr1e-3-muon_lr0.02": ["optim.name=muon", "optim.lr=1e-3", "optim.muon_lr=0.02"],
    "muon-lr1e-3": ["optim.name=muon", "optim.lr=1e-3"],
    "muon-muon_lr0.02": ["optim.name=muon", "optim.muon_lr=0.02"],
    "muon-lr1e-2": ["optim.name=muon", "optim.lr=1e-2"],
}


# ---------------------------------------------------------------------------------------------
# the trainers


def nanogpt_data(out: Path) -> Path:
    """train.bin and val.bin for nanoGPT: links to (or, for several shards, concatenations of)
    the prepared shards' token files."""
    manifest, shards = open_prepared(DATA)
    if manifest.tokenizer.vocab_size > 65536:
        raise SystemExit("nanoGPT reads uint16 tokens: the prepared vocabulary must fit")
    out.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train.bin"), ("validation", "val.bin")):
        files = [s.bin_path for s in shards[split]]
        if len(files) == 1:
            (out / name).symlink_to(files[0])
        else:
            with open(out / name, "wb") as f:
                for file in files:
                    f.write(Path(file).read_bytes())
    return out


def run_nanogpt(
    checkout: Path, data: Path, out: Path, shape: Shape, steps: int, every: int, precision: str
) -> list[float]:
    """nanoGPT's train.py for `steps` steps; returns each step's seconds, and leaves its
    checkpoints as out/ckpt_STEP.pt. bf16: its forward under CPU autocast
    (bench/nanogpt_autocast.py), as its train.py does on a GPU."""
    args = {
        "dataset": str(data),  # an absolute path: os.path.join('data', it) is it
        "out_dir": str(out),
        "device": "cpu",
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[precision],
        "compile": False,
        "n_layer": shape.layers,
        "n_head": shape.heads,
        "n_embd": shape.hidden,
        "block_size": shape.seq,
        "batch_size": shape.batch,
        "gradient_accumulation_steps": 1,
        "bias": True,
        "dropout": 0.0,
        "learning_rate": LR,
        "min_lr": MIN_LR,
        "warmup_iters": WARMUP,
        "lr_decay_iters": steps,
        "max_iters": steps,
        "eval_interval": every,
        "eval_iters": 1,
        "always_save_checkpoint": True,
        "log_interval": 1,
    }
    script = (
        "train.py" if precision == "fp32" else str(Path(__file__).with_name("nanogpt_autocast.py"))
    )
    command = [sys.executable, script, *(f"--{k}={v}" for k, v in args.items())]
    proc = subprocess.Popen(
        command, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    times, saved, lines = [], None, []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("saving checkpoint"):
            saved = int(re.search(r"step (\d+):", lines[-2]).group(1))
        elif m := re.match(r"iter (\d+): loss \S+, time ([\d.]+)ms", line):
            if saved is not None:  # its save has finished: keep it under its step
                os.replace(out / "ckpt.pt", out / f"ckpt_{saved}.pt")
                saved = None
            if int(m.group(1)) < steps:
                times.append(float(m.group(2)) / 1000)
    if proc.wait() != 0:
        raise RuntimeError("nanoGPT's train.py failed:\n" + "".join(lines[-30:]))
    return times


def run_neo(
    run_dir: Path, shape: Shape, overrides: list[str], steps: int, every: int, precision: str
) -> list[float]:
    """`neo train` for `steps` steps; returns each step's seconds."""
    command = [
        str(BIN / "neo"),
        "train",
        f"run_dir={run_dir}",
        f"data.path={DATA}",
        *neo_overrides(shape, precision),
        f"max_steps={steps}",
        f"save_every={every}",
        f"eval_every={steps * 10}",
        *overrides,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = {}
    for r in records:
        if "loss" in r:
            rate = r.get("tokens_per_s")
            times[r["step"]] = shape.tokens / rate if rate else r["warmup_s"]
    return [times[s] for s in sorted(times)]


# ---------------------------------------------------------------------------------------------
# one evaluator


def validation_windows(seq: int) -> torch.Tensor:
    """The validation split as (N, seq + 1) windows overlapping by one token: every position is
    a target once (the split's last partial window is left out)."""
    _, shards = open_prepared(DATA)
    tokens = np.concatenate(
        [np.asarray(s.get(i)) for s in shards["validation"] for i in range(len(s))]
    )
    n = (len(tokens) - 1) // seq
    idx = np.arange(n)[:, None] * seq + np.arange(seq + 1)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


@torch.no_grad()
def validation_loss(logits_of, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross entropy over every position of every window; `logits_of` maps
    (B, T) ids to (B, T, V) logits."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = logits_of(w[:, :-1]).float()
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += w[:, 1:].numel()
    return total / count


def nanogpt_model(checkout: Path, file: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = torch.load(file, map_location="cpu", weights_only=True)
    model = module.GPT(module.GPTConfig(**saved["model_args"]))
    model.load_state_dict(saved["model"])
    model.eval()
    # with targets, nanoGPT's forward returns the logits of every position
    return lambda ids: model(ids, torch.zeros_like(ids))[0]


def neo_model(directory: Path):
    model = load_model(directory).eval()
    return lambda ids: model(ids)


# ---------------------------------------------------------------------------------------------
# the tables


def clock(times: list[float], saved: set[int]) -> list[float]:
    """Cumulative training seconds after each step (1-based), save steps and the ones after them
    counted as the median step."""
    median = statistics.median(times)
    fixed = [median if (s in saved or s - 1 in saved) else t for s, t in enumerate(times, 1)]
    return list(np.cumsum(fixed))


def loss_at(curve: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation of (x, loss) points sorted by x; nan beyond the last."""
    xs, ys = zip(*curve, strict=True)
    return float(np.interp(x, xs, ys)) if x <= xs[-1] else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a karpathy/nanoGPT checkout")
    parser.add_argument("--shape", default="small", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: neo's precision=bf16 (DeepSpeed bf16) against nanoGPT under CPU autocast",
    )
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--windows", type=int, help="score the first N windows only (a smoke test)")
    parser.add_argument(
        "--speed-rounds",
        type=int,
        default=0,
        help="then R interleaved speed rounds: each trainer for --speed-steps steps, in turn",
    )
    parser.add_argument("--speed-steps", type=int, default=30)
    parser.add_argument("--speed-only", action="store_true", help="the speed rounds only")
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        raise SystemExit(f"--nanogpt {args.nanogpt}: no train.py there")
    if args.steps % args.every:
        raise SystemExit("--steps must be a multiple of --every")
    if args.speed_only and not args.speed_rounds:
        raise SystemExit("--speed-only needs --speed-rounds R (R >= 1)")
    if args.speed_rounds and args.speed_steps <= 2 * WARMUP:
        raise SystemExit(
            f"--speed-steps must be over {2 * WARMUP} (the schedule warms up for {WARMUP})"
        )
    if not DATA.exists():
        subprocess.run([str(BIN / "neo"), "prep"], check=True, cwd=ROOT)
    acc = accel.select("cpu")
    machine = hw.describe(acc)
    if args.precision == "bf16" and not machine.native_bf16:
        raise SystemExit(
            f"--precision bf16: {machine.bf16_reason}; its timings would be emulation's"
        )
    checkpoints = list(range(args.every, args.steps + 1, args.every))
    shape = args.shape = SHAPES[args.shape]
    windows = validation_windows(shape.seq)[: args.windows] if not args.speed_only else None
    results = {}  # name -> {"clock": [...], "losses": {step: loss}}
    speeds = {}  # name -> tokens/s in each speed round
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = nanogpt_data(tmp / "data")
        if not args.speed_only:
            results = quality_runs(args, data, tmp, checkpoints, windows)
        if args.speed_rounds:
            speeds = speed_rounds(args, data, tmp)
    summary = {"machine": machine.summary(), "shape": shape.summary(), "steps": args.steps}
    if results:
        summary["results"] = report(results, args, machine, 50304, len(windows))
    if speeds:
        print(f"machine: {machine.summary()}; {shape.summary()}, {args.precision}")
        summary["speed_rounds"] = report_speeds(speeds, results, args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


def quality_runs(args, data: Path, tmp: Path, checkpoints: list[int], windows) -> dict:
    """nanoGPT, then each neo variant, for --steps steps, every checkpoint scored."""
    results = {}
    started = time.time()
    times = run_nanogpt(
        args.nanogpt, data, tmp / "nano", args.shape, args.steps, args.every, args.precision
    )
    print(f"nanoGPT: {args.steps} steps in {time.time() - started:.0f}s", flush=True)
    losses = {
        s: validation_loss(nanogpt_model(args.nanogpt, tmp / "nano" / f"ckpt_{s}.pt"), windows)
        for s in checkpoints
    }
    # nanoGPT's checkpoint at step s is written before step s + 1 runs: the save step is s + 1
    results["nanoGPT"] = {"clock": clock(times, {s + 1 for s in checkpoints}), "losses": losses}
    for name in args.variants:
        run = tmp / name
        started = time.time()
        times = run_neo(run, args.shape, VARIANTS[name], args.steps, args.every, args.precision)
        print(f"neo {name}: {args.steps} steps in {time.time() - started:.0f}s", flush=True)
        losses = {
            s: validation_loss(neo_model(run / "checkpoints" / f"step_{s:08d}"), windows)
            for s in checkpoints
        }
        results[f"neo {name}"] = {"clock": clock(times, set(checkpoints)), "losses": losses}
    return results


def speed_rounds(args, data: Path, tmp: Path) -> dict[str, list[float]]:
    """Tokens/s of each trainer in each of --speed-rounds rounds: in a round every trainer runs
    --speed-steps steps (no checkpoint on the way), one after the other, the order rotated
    each round, so that a slow spell of a shared machine falls on every trainer alike and the
    ratio within a round compares like with like. Each rate is the median step after five."""
    names = ["nanoGPT", *(f"neo {v}" for v in args.variants)]
    rates = {name: [] for name in names}
    steps = args.speed_steps
    for r in range(args.speed_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out = tmp / f"speed-{r}-{name.replace(' ', '-')}"
            if name == "nanoGPT":
                times = run_nanogpt(
                    args.nanogpt, data, out, args.shape, steps, steps * 10, args.precision
                )
            else:
                variant = VARIANTS[name.removeprefix("neo ")]
                times = run_neo(out, args.shape, variant, steps, steps * 10, args.precision)
            rates[name].append(args.shape.tokens / statistics.median(times[5 : steps - 1]))
            shutil.rmtree(out, ignore_errors=True)
            print(f"speed round {r + 1}: {name} {rates[name][-1]:,.0f} tokens/s", flush=True)
    return rates


def report(results: dict, args, machine, vocab: int, windows: int) -> dict:
    tokens = args.shape.tokens
    rows = {}
    for name, r in results.items():
        curve = [(0.0, math.log(vocab))] + [
            (r["clock"][s - 1], loss) for s, loss in r["losses"].items()
        ]
        step_times = np.diff([0.0, *r["clock"]])[5:]  # after the first five
        rows[name] = {"curve": curve, "tok_s": tokens / float(np.median(step_times)), **r}
    nano = rows["nanoGPT"]
    console = Console(width=140)
    console.print(
        f"machine: {machine.summary()}\n"
        f"{args.shape.summary()}, {args.precision}, {args.steps} steps; "
        f"validation: {windows} windows of {args.shape.seq} (every position); time = "
        "training time (see the module docstring); equal time = when the first of the two "
        "finished"
    )
    table = Table(title="validation loss (nats) and speed, neo vs nanoGPT")
    half = args.steps // 2 // args.every * args.every or args.every
    columns = [
        "trainer",
        f"loss @ step {half}",
        f"loss @ step {args.steps}",
        "train time",
        "equal time",
        "loss there",
        "nanoGPT's there",
        "difference (goal <= -0.10)",
        "tokens/s (median)",
        f"vs nanoGPT (goal >= {SPEED_GOAL[args.precision]}x)",
    ]
    for c in columns:
        table.add_column(c, justify="right")
    out = {}
    for name, row in rows.items():
        t_equal = min(row["clock"][-1], nano["clock"][-1])
        mine, theirs = loss_at(row["curve"], t_equal), loss_at(nano["curve"], t_equal)
        table.add_row(
            name,
            f"{row['losses'][half]:.3f}",
            f"{row['losses'][args.steps]:.3f}",
            f"{row['clock'][-1]:.0f}s",
            f"{t_equal:.0f}s",
            f"{mine:.3f}",
            f"{theirs:.3f}",
            "-" if name == "nanoGPT" else f"{mine - theirs:+.3f}",
            f"{row['tok_s']:,.0f}",
            "-" if name == "nanoGPT" else f"{row['tok_s'] / nano['tok_s']:.2f}x",
        )
        out[name] = {
            "losses": row["losses"],
            "clock_s": {s: row["clock"][s - 1] for s in row["losses"]},
            "tokens_per_s": row["tok_s"],
            "equal_time_s": t_equal,
            "loss_at_equal_time": mine,
            "nanogpt_loss_at_equal_time": theirs,
        }
    console.print(table)
    return out


def report_speeds(speeds: dict[str, list[float]], results: dict, args) -> dict:
    """The interleaved rounds' tokens/s, each round's ratio to nanoGPT's in the same round,
    and (with the quality runs) the loss at equal time with each trainer's step time taken
    from the rounds' medians instead of its own long run's."""
    nano = speeds["nanoGPT"]
    table = Table(
        title=f"tokens/s, {args.speed_rounds} interleaved rounds of {args.speed_steps} steps"
    )
    goal = f"median ratio (goal >= {SPEED_GOAL[args.precision]}x)"
    columns = ["trainer", "each round", "median", "vs nanoGPT, each round", goal]
    columns += ["loss at equal time", "nanoGPT's there", "difference"] if results else []
    for c in columns:
        table.add_column(c, justify="right")
    nano_step = args.shape.tokens / statistics.median(nano)
    out = {}
    for name, rates in speeds.items():
        ratios = [a / b for a, b in zip(rates, nano, strict=True)]
        row = [
            name,
            " ".join(f"{x:,.0f}" for x in rates),
            f"{statistics.median(rates):,.0f}",
            "-" if name == "nanoGPT" else " ".join(f"{x:.2f}" for x in ratios),
            "-" if name == "nanoGPT" else f"{statistics.median(ratios):.2f}x",
        ]
        if results:
            step = args.shape.tokens / statistics.median(rates)
            t_equal = args.steps * min(step, nano_step)  # when the first one finished
            mine = loss_by_step(results[name]["losses"], t_equal / step)
            theirs = loss_by_step(results["nanoGPT"]["losses"], t_equal / nano_step)
            row += [
                f"{mine:.3f}",
                f"{theirs:.3f}",
                "-" if name == "nanoGPT" else f"{mine - theirs:+.3f}",
            ]
        table.add_row(*row)
        out[name] = {"tokens_per_s": rates, "vs_nanogpt": ratios, "row": row}
    Console(width=140).print(table)
    return out


def loss_by_step(losses: dict[int, float], step: float) -> float:
    """A run's validation loss interpolated at a (fractional) step, from ln(50304) at step 0."""
    return loss_at([(0.0, math.log(50304)), *((float(s), v) for s, v in losses.items())], step)


if __name__ == "__main__":
    main()
