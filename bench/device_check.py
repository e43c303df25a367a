"""The accelerator check: one command that runs, on a machine with a GPU (or an Ascend NPU), the
code paths that only run there, in about eight minutes (issue 26).

    python bench/device_check.py [--accelerator auto|cuda|npu] [--dry-run] [--json PATH]
                                 [--only SECTION ...] [--lambada FILE] [--time-limit S]
    make device-check

Sections, in order (each with its time budget; twice the budget is its hard limit):

    fused_loss   the fused linear cross-entropy against logits then cross-entropy, fp32 and bf16
    attention    flex_attention (Ascend: npu_fusion_attention) forward and backward against the
                 dense reference for global, local (window 256) and strided layers, T = 2048 and
                 8192, fp32 and bf16; timed against causal SDPA
    golden       the tiny model's pinned loss curve (tests/assets/golden_losses.json), fp32, on
                 the device
    train_125m   neo train gpt_neo_125m, context 2048, bf16, ZeRO-2, 30 steps: tokens/s, MFU
                 against the measured matmul peak and the datasheet's, peak memory
    train_1.3b   neo train gpt_neo_1.3b with activation checkpointing, 6 steps: the same numbers
    generate     neo generate, greedy, equal to transformers' generate on the same weights
                 (tokens, and their log-probabilities within 1e-4)
    eval         neo eval on 300 LAMBADA items equal to neo eval on the CPU (metrics and every
                 item's log-likelihood within 1e-4)

It prints the device, driver, torch and CUDA versions first, one table at the end, writes
device_check.json (every number, rewritten after each section so that a run cut short keeps
what it measured), and exits 1 naming the first failure. Where the accelerator is not present
(or with --dry-run) it prints the plan, writes the same JSON with every status "planned" and
exits 0: CI runs it that way (tests/bench/test_device_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import device_report as report
import torch
from device_kernels import (
    attention_check,
    attention_plan,
    free,
    fused_loss_check,
    fused_loss_plan,
)
from device_runs import (
    LAMBADA_ITEMS,
    TRAIN_1_3B,
    TRAIN_125M,
    Runs,
    model_flops,
    shown,
)
from markdown_table import markdown

from data_prep.files import atomic_write_text
from train.distributed import devices
from train.distributed import machine as hw
from train.errors import SetupError

ROOT = Path(__file__).resolve().parents[1]
# Where the real LAMBADA file is on the project's machines (../shared/eval, or shared/eval in
# a copy of the checkout): tests/conftest.py's SHARED_EVAL.
LAMBADA = [ROOT.parent / "shared" / "eval", ROOT / "shared" / "eval"]
BUDGETS = {  # seconds, about eight minutes in all on one H100
    "fused_loss": 15,
    "attention": 120,
    "golden": 45,
    "train_125m": 90,
    "train_1.3b": 110,
    "generate": 50,
    "eval": 40,
}
HARD_LIMIT = 2  # x budget
MIN_START_S = 5  # a section is not started with less of the check's time left


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", choices=["auto", "cuda", "npu"], default="auto")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--json", type=Path, default=Path("device_check.json"))
    parser.add_argument("--only", nargs="+", metavar="SECTION", help="run these sections only")
    parser.add_argument("--lambada", type=Path, default=None, help="lambada_openai_test.jsonl")
    parser.add_argument(
        "--time-limit", type=float, default=570, help="seconds for the whole check (default 570)"
    )
    parser.add_argument(
        "--scratch", type=Path, default=None, help="where the runs go (~20 GB; default: $TMPDIR)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser.parse_args(argv)


def choose(args: argparse.Namespace) -> tuple[str, bool, str]:
    """(accelerator the plan is for, dry run?, why it is a dry run)."""
    if args.accelerator == "auto":
        kind = devices.select("auto").kind
        if kind == "cpu":
            return "cuda", True, "no CUDA or Ascend device on this machine"
    else:
        kind = args.accelerator
        try:
            devices.select(kind)
        except SetupError as e:
            return kind, True, str(e)
    if args.dry_run:
        return kind, True, "--dry-run"
    return kind, False, ""


def lambada_file(given: Path | None) -> Path | None:
    if given is not None:
        return given
    found = [d / "lambada_openai_test.jsonl" for d in LAMBADA]
    return next((f for f in found if f.is_file()), None)


def sections(runs: Runs, acc: devices.Accelerator | None, device_name: str) -> list[report.Section]:
    """The check, in order; `acc` is None in a dry run (nothing is run then)."""
    S = report.Section
    flops = {m: f"{model_flops(m) / 1e9:.3f} GFLOP/token" for m in ("gpt_neo_125m", "gpt_neo_1.3b")}

    def plan(*commands: list[str], **extra) -> dict:
        return {**extra, "commands": [shown(c) for c in commands]}

    def train(name: str, overrides: list[str], model: str, what: str, learns: bool) -> S:
        return S(
            name,
            f"neo train {model}, {what}: tokens/s, MFU (measured, datasheet peak), peak memory",
            BUDGETS[name],
            plan(runs.train_command(name, overrides), flops_per_token=flops[model]),
            lambda: runs.training(name, overrides, model, device_name, learns),
        )

    lambada = f"{LAMBADA_ITEMS} items of {runs.lambada}" if runs.lambada else "not found"
    return [
        S(
            "fused_loss",
            "fused linear cross-entropy vs logits + cross-entropy: loss and gradients",
            BUDGETS["fused_loss"],
            fused_loss_plan(),
            lambda: fused_loss_check(acc),
        ),
        S(
            "attention",
            "attention kernel vs dense: output and q/k/v gradients; time vs causal SDPA",
            BUDGETS["attention"],
            attention_plan(runs.kind),
            lambda: attention_check(acc, runs.deadline),
        ),
        S(
            "golden",
            "the tiny model's pinned fp32 loss curve on the device (rtol 1e-3)",
            BUDGETS["golden"],
            plan(runs.golden_command()),
            runs.golden,
        ),
        train("train_125m", TRAIN_125M, "gpt_neo_125m", "bf16, ZeRO-2, 30 steps", learns=True),
        train(
            "train_1.3b",
            TRAIN_1_3B,
            "gpt_neo_1.3b",
            "bf16, ZeRO-2, activation checkpointing, 6 steps",
            learns=False,
        ),
        S(
            "generate",
            "neo generate greedy equal to transformers' generate: tokens, log-probs (1e-4)",
            BUDGETS["generate"],
            plan(runs.tiny_command(), runs.generate_command()),
            lambda: runs.generate(acc.device(0)),
        ),
        S(
            "eval",
            f"neo eval on {LAMBADA_ITEMS} LAMBADA items equal to the CPU's (1e-4)",
            BUDGETS["eval"],
            plan(runs.eval_command(runs.kind), runs.eval_command("cpu"), lambada=lambada),
            runs.eval,
        ),
    ]


def environment(kind: str, acc: devices.Accelerator | None) -> dict:
    """What produced the numbers: device, driver, torch, CUDA and the libraries in the path."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
    }
    for package in ("deepspeed", "transformers", "triton", "torch-npu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[package] = importlib.metadata.version(package)
    if acc is None:
        return {"device": f"none ({kind} plan only)", **env}
    machine = hw.describe(acc)
    env = {"device": machine.name, **env}
    if kind == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["capability"] = f"sm_{props.major}{props.minor}"
        env["cudnn"] = torch.backends.cudnn.version()
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"]
        env["driver"] = _output(query)
    return env


def _output(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_all(checks: list, runs: Runs, acc: devices.Accelerator, limit: float, save) -> None:
    """Every section in turn, each until its hard limit or the check's end; a section that
    raises fails with its error; the JSON is saved after each."""
    end = time.monotonic() + limit
    for section in checks:
        start = time.monotonic()
        print(f"\n== {section.name} (budget {section.budget_s}s): {section.checks}", flush=True)
        if end - start < MIN_START_S:
            outcome = report.Outcome("fail", f"not run: the check's {limit:.0f}s were spent")
        else:
            runs.deadline = start + min(HARD_LIMIT * section.budget_s, end - start)
            try:
                outcome = section.run()
            except Exception as e:  # a failure of the thing checked: recorded, the check goes on
                first = (str(e).strip().splitlines() or [""])[0][:300]
                error = traceback.format_exc()[-4000:]
                outcome = report.Outcome("fail", f"{type(e).__name__}: {first}", {"error": error})
        section.record(outcome, time.monotonic() - start)
        print(f"   {section.status}: {section.summary} ({section.seconds:.0f}s)", flush=True)
        save()
        free(acc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kind, dry, reason = choose(args)
    acc = None if dry else devices.select(kind)
    env = environment(kind, acc)
    for key in ("device", "driver", "torch", "cuda", "cudnn", "torch-npu", "commit"):
        if env.get(key) is not None:
            print(f"{key}: {env[key]}")
    scratch = None if dry else tempfile.mkdtemp(prefix="neotrain_device_check_", dir=args.scratch)
    work = Path(scratch or "<scratch>")
    runs = Runs(kind, work, lambada_file(args.lambada))
    try:
        checks = report.select(sections(runs, acc, env["device"]), args.only)
    except ValueError as e:
        print(f"device_check: {e}", file=sys.stderr)
        return 2
    mode = "dry-run" if dry else "run"

    def save() -> None:
        doc = report.document(checks, mode=mode, accelerator=kind, reason=reason, environment=env)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(doc, indent=1, default=str) + "\n")

    total = sum(s.budget_s for s in checks)
    if dry:
        print(f"\nDRY RUN ({reason}): the {kind} plan, {len(checks)} sections, {total}s budget")
        for s in checks:
            print(f"\n- {s.name} ({s.budget_s}s): {s.checks}")
            for key, value in s.plan.items():
                for line in value if isinstance(value, list) else [value]:
                    print(f"    {key}: {line}")
    else:
        for s in checks:
            s.status = "pending"
        save()
        run_all(checks, runs, acc, args.time_limit, save)
    save()
    print()
    markdown(["section", "status", "time / budget", "result"], report.table_rows(checks))
    print(f"\nwrote {args.json}")
    if dry:
        return 0
    status, line = report.exit_line(checks)
    if status == 0 and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"scratch directory (logs of every command): {work}")
    print(line, file=sys.stderr if status else sys.stdout)
    return status


if __name__ == "__main__":
    sys.exit(main())
