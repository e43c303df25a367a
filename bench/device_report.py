"""What the device check (bench/device_check.py) records and decides, apart from running
anything: its sections, their outcomes, the tolerance rules, the datasheet peaks, the JSON
document and the exit. torch-free, so that it is tested on any machine."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("planned", "pending", "pass", "fail", "skipped")

# Norm-relative error allowed in fp32 (|a - b| / |b| over a whole tensor). A wrong mask or a
# wrong gradient is off by 1e-1 or more; differences in summation order stay near 1e-6.
FP32_LIMIT = 1e-4
# Low precision: no worse than twice the error of the plain computation in the same dtype
# (dense attention, logits then cross-entropy) against the fp32 reference, plus this floor.
# The same rule as tests/model/test_model.py's bf16 fused-loss test.
LOW_PRECISION_FLOOR = 1e-3

WARMUP_STEPS = 3  # steps whose rate is left out of the median (allocation, compilation)
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (half the "with sparsity" figure), per
# GPU, matched on the name torch reports; the first entry whose key is in the name wins.
DATASHEET_BF16_FLOPS = (
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),  # H200 SXM
    ("A100", 312e12),
)


@dataclass
class Outcome:
    """What one section found: pass, fail or skipped (an input is missing), a line with the
    measured numbers, and every number in `details`."""

    status: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Section:
    name: str
    checks: str  # what it checks, one sentence
    budget_s: int  # its share of the ~8 minutes; twice this is its hard limit
    plan: dict[str, Any]  # what it runs (sizes, commands): the dry run's details
    run: Callable[[], Outcome]
    status: str = "planned"
    seconds: float | None = None
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def record(self, outcome: Outcome, seconds: float) -> None:
        self.status, self.summary, self.seconds = outcome.status, outcome.summary, seconds
        self.details = outcome.details
        if seconds > self.budget_s:
            self.details["over_budget_s"] = round(seconds - self.budget_s, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checks": self.checks,
            "budget_s": self.budget_s,
            "status": self.status,
            "seconds": None if self.seconds is None else round(self.seconds, 1),
            "summary": self.summary,
            "details": self.details if self.status != "planned" else self.plan,
        }


def within(error: float, low_precision: bool, baseline: float | None = None) -> bool:
    """Whether a measured error passes: under FP32_LIMIT in fp32; in bf16 (low_precision), at
    most twice the plain bf16 computation's error (`baseline`) plus LOW_PRECISION_FLOOR."""
    if not math.isfinite(error):
        return False
    if not low_precision:
        return error <= FP32_LIMIT
    if baseline is None or not math.isfinite(baseline):
        raise ValueError("a low-precision comparison needs the plain computation's error")
    return error <= 2 * baseline + LOW_PRECISION_FLOOR


def curve_agrees(curve: list[float], expected: list[float], rtol: float) -> tuple[bool, float]:
    """Whether a loss curve equals the pinned one step by step within `rtol`, and the largest
    relative difference (inf where the lengths differ or a loss is not finite)."""
    if len(curve) != len(expected) or not all(math.isfinite(x) for x in curve):
        return False, math.inf
    worst = max(abs(a - b) / abs(b) for a, b in zip(curve, expected, strict=True))
    return worst <= rtol, worst


def first_difference(a: list, b: list) -> int | None:
    """The first index where two token lists differ (the shorter one's length when one is
    the other's beginning); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def metrics_disagree(got: dict, expected: dict, rtol: float) -> dict[str, tuple]:
    """The metrics of `expected` whose value in `got` is missing or off by more than
    rtol * max(1, |expected|): {name: (got, expected)}; empty when they agree."""
    off = {}
    for name, want in expected.items():
        have = got.get(name)
        if not isinstance(want, int | float):
            continue
        if not isinstance(have, int | float) or not abs(have - want) <= rtol * max(1, abs(want)):
            off[name] = (have, want)
    return off


def items_disagree(got: list[dict], expected: list[dict], rtol: float) -> list[int]:
    """The indices of neo eval's samples.jsonl items whose log-likelihoods differ by more than
    rtol * max(1, |expected|) or whose greedy flags differ (an item missing counts too)."""
    have = {item["index"]: item for item in got}
    off = []
    for want in expected:
        item = have.get(want["index"])
        if item is None or item["greedy"] != want["greedy"]:
            off.append(want["index"])
            continue
        pairs = zip(item["logprobs"], want["logprobs"], strict=True)
        if not all(abs(a - b) <= rtol * max(1, abs(b)) for a, b in pairs):
            off.append(want["index"])
    return off


def throughput(records: list[dict], flops: float, datasheet: float | None) -> dict:
    """From a run's metrics.jsonl: the median tokens/s of the steps after WARMUP_STEPS, MFU
    against the peak the run measured (its start record) and the datasheet's, the losses."""
    start = next((r for r in records if r.get("event") == "start"), {})
    steps = [r for r in records if r.get("tokens_per_s") and r["step"] > WARMUP_STEPS]
    rate = statistics.median(r["tokens_per_s"] for r in steps) if steps else 0.0
    measured = start.get("peak_flops")
    logged = [r["mfu"] for r in steps if r.get("mfu") is not None]
    return {
        "tokens_per_s": rate,
        "steps_timed": len(steps),
        "flops_per_token": flops,
        "measured_peak_flops": measured,
        "datasheet_peak_flops": datasheet,
        "mfu_measured_peak": flops * rate / measured if measured else None,
        "mfu_datasheet": flops * rate / datasheet if datasheet else None,
        "mfu_logged_median": statistics.median(logged) if logged else None,
        "losses": {r["step"]: r["loss"] for r in records if r.get("loss") is not None},
    }


def percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def datasheet_peak(device_name: str) -> float | None:
    """The datasheet dense bf16 FLOP/s of a GPU by its name; None for one not listed."""
    for key, flops in DATASHEET_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def first_failure(sections: list[Section]) -> Section | None:
    return next((s for s in sections if s.status == "fail"), None)


def exit_line(sections: list[Section]) -> tuple[int, str]:
    """The exit status and the last line: 1 naming the first failure, else 0."""
    failed = first_failure(sections)
    if failed is not None:
        return 1, f"device check FAILED: first failure: {failed.name}: {failed.summary}"
    skipped = [s.name for s in sections if s.status == "skipped"]
    passed = sum(s.status == "pass" for s in sections)
    line = f"device check passed: {passed} section(s)"
    return 0, line + (f"; skipped: {', '.join(skipped)}" if skipped else "")


def select(sections: list[Section], only: list[str] | None) -> list[Section]:
    """The sections named in `only` (all when None), in the check's order."""
    if not only:
        return sections
    known = [s.name for s in sections]
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [s for s in sections if s.name in only]


def document(
    sections: list[Section], *, mode: str, accelerator: str, reason: str, environment: dict
) -> dict[str, Any]:
    """device_check.json: the same schema for a dry run (every status "planned") and a run."""
    statuses = {s.status for s in sections}
    if mode == "dry-run":
        status = "planned"
    elif "fail" in statuses:
        status = "fail"
    else:
        status = "pending" if statuses & {"pending", "planned"} else "pass"
    failed = first_failure(sections)
    return {
        "schema": SCHEMA_VERSION,
        "mode": mode,
        "accelerator": accelerator,
        "reason": reason,
        "environment": environment,
        "budget_s": sum(s.budget_s for s in sections),
        "status": status,
        "first_failure": None
        if failed is None
        else {"name": failed.name, "summary": failed.summary},
        "sections": [s.as_dict() for s in sections],
    }


def table_rows(sections: list[Section]) -> list[list[str]]:
    """One row per section for bench/markdown_table.py: name, status, time, result."""
    rows = []
    for s in sections:
        took = "-" if s.seconds is None else f"{s.seconds:.0f}"
        result = s.summary or s.checks
        rows.append([s.name, s.status, f"{took} / {s.budget_s} s", result.replace("|", "/")])
    return rows
