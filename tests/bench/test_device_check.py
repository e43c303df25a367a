"""bench/device_check.py, the accelerator check: its dry run (what CI can run: the plan, the
arguments, the JSON, the table), the rules it judges a device by, and the in-process sections'
logic on the CPU with kernels that are right and kernels that are wrong."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import each other by name

import device_check  # noqa: E402
import device_kernels  # noqa: E402
import device_report as report  # noqa: E402

from train.distributed.devices import ACCELERATORS  # noqa: E402
from train.model.attention import attend  # noqa: E402

SECTIONS = ["fused_loss", "attention", "golden", "train_125m", "train_1.3b", "generate", "eval"]
SECTION_KEYS = {"name", "checks", "budget_s", "status", "seconds", "summary", "details"}
TOP_KEYS = {
    "schema",
    "mode",
    "accelerator",
    "reason",
    "environment",
    "budget_s",
    "status",
    "first_failure",
    "sections",
}


def check_dry_run_document(doc: dict, accelerator: str, names: list[str]) -> None:
    assert set(doc) == TOP_KEYS
    assert doc["schema"] == report.SCHEMA_VERSION
    assert (doc["mode"], doc["status"], doc["accelerator"]) == ("dry-run", "planned", accelerator)
    assert doc["first_failure"] is None and doc["reason"]
    assert doc["environment"]["torch"] == torch.__version__
    assert [s["name"] for s in doc["sections"]] == names
    for s in doc["sections"]:
        assert set(s) == SECTION_KEYS, s["name"]
        assert s["status"] == "planned" and s["seconds"] is None, s["name"]
        assert isinstance(s["budget_s"], int) and s["budget_s"] > 0, s["name"]
        assert s["checks"] and s["details"], s["name"]
    assert doc["budget_s"] == sum(s["budget_s"] for s in doc["sections"])


@pytest.mark.slow
def test_dry_run_without_a_gpu_prints_the_plan_and_writes_the_json(tmp_path):
    """What `make device-check` does on a machine without CUDA: exit 0, the plan, the JSON."""
    out = tmp_path / "out" / "check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "device_check.py"), "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "DRY RUN (no CUDA or Ascend device on this machine): the cuda plan" in proc.stdout
    assert proc.stdout.index("torch: ") < proc.stdout.index("DRY RUN")  # versions come first
    assert "| section | status | time / budget | result |" in proc.stdout
    for name in SECTIONS:
        assert f"\n- {name} (" in proc.stdout and f"| {name} | planned |" in proc.stdout
    doc = json.loads(out.read_text())
    check_dry_run_document(doc, "cuda", SECTIONS)
    assert doc["budget_s"] <= 8 * 60  # the check must fit in about eight minutes
    sections = {s["name"]: s for s in doc["sections"]}
    assert sections["attention"]["details"]["kernel"] == "flex_attention"
    assert len(sections["attention"]["details"]["cases"]) == 9  # 3 kinds x (2048 fp32, 2048
    # bf16, 8192 bf16)
    big = " ".join(sections["train_1.3b"]["details"]["commands"])
    for override in ("model=gpt_neo_1.3b", "deepspeed.activation_checkpointing=true", "cuda"):
        assert override in big
    golden = " ".join(sections["golden"]["details"]["commands"])
    assert "accelerator=cuda" in golden and "precision=fp32" in golden


def test_the_npu_plan_uses_the_ascend_kernel_and_accelerator(tmp_path, capsys):
    out = tmp_path / "npu.json"
    assert device_check.main(["--accelerator", "npu", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    check_dry_run_document(doc, "npu", SECTIONS)
    assert "torch_npu is not installed" in doc["reason"]
    attention = doc["sections"][1]["details"]
    assert attention["kernel"] == "npu_fusion_attention"
    assert all(case.endswith("bf16") for case in attention["cases"])  # the kernel has no fp32
    for s in doc["sections"][2:]:
        commands = " ".join(s["details"]["commands"])
        assert "accelerator=npu" in commands and "accelerator=cuda" not in commands
    assert "npu plan" in capsys.readouterr().out


def test_only_runs_the_named_sections_and_refuses_unknown_ones(tmp_path, capsys):
    out = tmp_path / "some.json"
    assert device_check.main(["--dry-run", "--only", "eval", "golden", "--json", str(out)]) == 0
    check_dry_run_document(json.loads(out.read_text()), "cuda", ["golden", "eval"])
    assert device_check.main(["--dry-run", "--only", "flash", "--json", str(out)]) == 2
    assert "unknown section(s) flash; known: fused_loss, attention" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the rules


def test_tolerances_fp32_fixed_bf16_relative_to_the_plain_computation():
    assert report.within(9e-5, low_precision=False)
    assert not report.within(2e-4, low_precision=False)
    assert not report.within(math.nan, low_precision=False)
    # bf16: twice the plain bf16 path's error plus the floor
    assert report.within(2 * 4e-3 + 1e-3, low_precision=True, baseline=4e-3)
    assert not report.within(2 * 4e-3 + 2e-3, low_precision=True, baseline=4e-3)
    assert not report.within(math.inf, low_precision=True, baseline=4e-3)
    with pytest.raises(ValueError, match="needs the plain computation's error"):
        report.within(1e-3, low_precision=True)


def test_curves_metrics_and_tokens_compare_as_stated():
    assert report.curve_agrees([10.0, 9.0], [10.005, 9.0], rtol=1e-3)[0]
    ok, worst = report.curve_agrees([10.0, 9.1], [10.0, 9.0], rtol=1e-3)
    assert not ok and worst == pytest.approx(0.1 / 9)
    assert report.curve_agrees([10.0], [10.0, 9.0], rtol=1)[0] is False
    assert report.curve_agrees([math.nan, 9.0], [10.0, 9.0], rtol=1)[0] is False
    cpu = {"acc": 0.25, "perplexity": 812.5, "alias": "lambada"}
    assert report.metrics_disagree({"acc": 0.25, "perplexity": 812.55}, cpu, 1e-4) == {}
    assert report.metrics_disagree({"acc": 0.26, "perplexity": 812.5}, cpu, 1e-4) == {
        "acc": (0.26, 0.25)
    }
    assert report.metrics_disagree({"acc": 0.25}, cpu, 1e-4) == {"perplexity": (None, 812.5)}
    cpu_items = [
        {"index": 0, "logprobs": [-15.25], "greedy": [False]},
        {"index": 1, "logprobs": [-2.0], "greedy": [True]},
    ]
    same = [{**cpu_items[1], "logprobs": [-2.00005]}, {**cpu_items[0], "logprobs": [-15.2505]}]
    assert report.items_disagree(same, cpu_items, 1e-4) == []
    flipped = [cpu_items[0], {**cpu_items[1], "greedy": [False]}]
    assert report.items_disagree(flipped, cpu_items, 1e-4) == [1]
    assert report.items_disagree([{**cpu_items[0], "logprobs": [-15.27]}], cpu_items, 1e-4) == [
        0,
        1,  # missing
    ]
    assert report.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert report.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert report.first_difference([1, 2], [1, 2, 50256]) == 2


def test_datasheet_peaks_by_device_name():
    assert report.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert report.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert report.datasheet_peak("NVIDIA H100 NVL") == 835e12
    assert report.datasheet_peak("NVIDIA H200") == 989e12
    assert report.datasheet_peak("Ascend910B2") is None


def section(name: str, status: str) -> report.Section:
    s = report.Section(name, "checks", 10, {}, lambda: None)
    s.record(report.Outcome(status, f"{name} said so"), 12.0)
    return s


def test_the_exit_names_the_first_failure():
    ran = [
        section("a", "pass"),
        section("b", "fail"),
        section("c", "skipped"),
        section("d", "fail"),
    ]
    assert report.exit_line(ran) == (1, "device check FAILED: first failure: b: b said so")
    assert ran[0].details == {"over_budget_s": 2.0}
    doc = report.document(ran, mode="run", accelerator="cuda", reason="", environment={})
    assert doc["status"] == "fail" and doc["first_failure"] == {"name": "b", "summary": "b said so"}
    fine = [section("a", "pass"), section("c", "skipped")]
    assert report.exit_line(fine) == (0, "device check passed: 1 section(s); skipped: c")
    doc = report.document(fine, mode="run", accelerator="cuda", reason="", environment={})
    assert doc["status"] == "pass" and doc["first_failure"] is None
    assert report.table_rows(fine)[0] == ["a", "pass", "12 / 10 s", "a said so"]


def test_throughput_is_the_median_after_warm_up_over_each_peak():
    records = [
        {"step": 0, "event": "start", "peak_flops": 1e12},
        {"step": 1, "loss": 11.0, "tokens_per_s": None, "mfu": None},
        *({"step": s, "loss": 10.0, "tokens_per_s": 1e9, "mfu": 0.3} for s in (2, 3)),  # warm-up
        *({"step": s, "loss": 9.0, "tokens_per_s": r, "mfu": 0.5} for s, r in [(4, 100), (5, 300)]),
        {"step": 6, "loss": 8.0, "tokens_per_s": 200, "mfu": 0.5},
    ]
    got = report.throughput(records, flops=1e9, datasheet=4e12)
    assert got["tokens_per_s"] == 200 and got["steps_timed"] == 3
    assert got["mfu_measured_peak"] == pytest.approx(0.2)
    assert got["mfu_datasheet"] == pytest.approx(0.05)
    assert got["losses"] == {1: 11.0, 2: 10.0, 3: 10.0, 4: 9.0, 5: 9.0, 6: 8.0}
    assert report.throughput(records, 1e9, None)["mfu_datasheet"] is None


# --------------------------------------------------------------------------------------------
# the in-process sections, on the CPU with small sizes


@pytest.fixture
def small_attention(monkeypatch):
    monkeypatch.setattr(device_kernels, "WINDOW", 16)
    monkeypatch.setattr(device_kernels, "STRIDE", 8)
    monkeypatch.setattr(device_kernels, "TIMING_REPEATS", 1)
    cases = [(96, torch.float32), (32, torch.bfloat16)]
    monkeypatch.setattr(device_kernels, "CASES", {"cpu": cases})
    monkeypatch.setitem(device_kernels.KERNEL_NAME, "cpu", "blockwise")


def blockwise(pretend: str | None = None):
    """The CPU's attention backend as the kernel under test; `pretend`: every layer computed
    as that kind instead (a wrong mask)."""

    def kernel(accelerator, kind):
        return lambda q, k, v: attend(
            q,
            k,
            v,
            kind=pretend or kind,
            window=device_kernels.WINDOW,
            stride=device_kernels.STRIDE,
            scale=device_kernels.SCALE,
            backend="blockwise",
        )

    return kernel


def test_attention_section_passes_a_right_kernel(small_attention, monkeypatch):
    monkeypatch.setattr(device_kernels, "_kernel", blockwise())
    outcome = device_kernels.attention_check(ACCELERATORS["cpu"], deadline=math.inf)
    assert outcome.status == "pass", outcome.details["failed"]
    cases = outcome.details["cases"]
    assert [(c["kind"], c["T"], c["dtype"]) for c in cases] == [
        (k, T, d) for T, d in [(96, "fp32"), (32, "bf16")] for k in device_kernels.KINDS
    ]
    assert max(max(c["errors"].values()) for c in cases if c["dtype"] == "fp32") < 1e-5
    assert all(c["kernel_ms"] > 0 and c["speedup"] > 0 for c in cases if c["dtype"] == "bf16")


def test_attention_section_fails_a_wrong_mask_and_runs_out_of_time(small_attention, monkeypatch):
    monkeypatch.setattr(device_kernels, "_kernel", blockwise(pretend="local"))
    outcome = device_kernels.attention_check(ACCELERATORS["cpu"], deadline=math.inf)
    assert outcome.status == "fail"
    failed = outcome.details["failed"]
    assert [f.split(":")[0] for f in failed] == ["global T=96 fp32", "strided T=96 fp32"] + [
        "global T=32 bf16",
        "strided T=32 bf16",
    ]
    late = device_kernels.attention_check(ACCELERATORS["cpu"], deadline=0.0)
    assert late.status == "fail" and "not run (out of time)" in late.summary


def test_fused_loss_section_passes_the_real_op_and_fails_a_wrong_one(monkeypatch):
    monkeypatch.setattr(device_kernels, "LOSS_TOKENS", 96)
    monkeypatch.setattr(device_kernels, "LOSS_HIDDEN", 32)
    monkeypatch.setattr(device_kernels, "LOSS_VOCAB", 500)
    outcome = device_kernels.fused_loss_check(ACCELERATORS["cpu"])
    assert outcome.status == "pass", outcome.details
    assert outcome.details["results"]["fp32"]["count"] == 96 - 5  # every 20th ignored

    real = device_kernels.LinearCrossEntropy

    class Slightly(torch.autograd.Function):  # right gradients of a loss 0.1% off
        @staticmethod
        def forward(ctx, h, w, targets):
            total, count = real.forward(ctx, h, w, targets)
            return total * 1.001, count

        backward = staticmethod(real.backward)

    monkeypatch.setattr(device_kernels, "LinearCrossEntropy", Slightly)
    outcome = device_kernels.fused_loss_check(ACCELERATORS["cpu"])
    assert outcome.status == "fail"
    assert not outcome.details["results"]["fp32"]["passed"]


def test_a_real_run_records_each_section_and_exits_naming_the_first_failure(
    tmp_path, monkeypatch, capsys
):
    """main() as on a GPU machine, with sections that pass, fail, raise and run out of time
    (the device replaced by the CPU, the sections by stand-ins)."""

    def boom():
        raise ValueError("boom\nsecond line")

    def slow():
        time.sleep(5.5)
        return report.Outcome("pass", "slow but fine")

    stand_ins = [
        report.Section("first", "passes", 1, {}, lambda: report.Outcome("pass", "ok 1.0")),
        report.Section("second", "raises", 1, {}, boom),
        report.Section("third", "fails", 1, {}, lambda: report.Outcome("fail", "off by 2")),
        report.Section("fourth", "slow", 1, {}, slow),
        report.Section("fifth", "never starts", 1, {}, lambda: report.Outcome("pass", "?")),
    ]
    saved = []
    real_save = device_check.atomic_write_text
    monkeypatch.setattr(device_check, "choose", lambda args: ("cuda", False, ""))
    monkeypatch.setattr(device_check.devices, "select", lambda kind: ACCELERATORS["cpu"])
    monkeypatch.setattr(device_check, "environment", lambda kind, acc: {"device": "stand-in"})
    monkeypatch.setattr(device_check, "sections", lambda runs, acc, name: stand_ins)
    monkeypatch.setattr(
        device_check,
        "atomic_write_text",
        lambda path, text: (saved.append(json.loads(text)), real_save(path, text)),
    )
    # 8 s for the whole check, 3 s needed to start a section: the first three (each followed by
    # a save and a gc.collect, which took over 2 s in a loaded CI worker) have 5 s to finish
    # before the fourth must start; after the fourth's 5.5 s the fifth is not run
    monkeypatch.setattr(device_check, "MIN_START_S", 3.0)
    out = tmp_path / "run.json"
    args = ["--json", str(out), "--time-limit", "8", "--scratch", str(tmp_path)]
    assert device_check.main(args) == 1
    doc = json.loads(out.read_text())
    assert (doc["mode"], doc["status"]) == ("run", "fail")
    assert [s["status"] for s in doc["sections"]] == ["pass", "fail", "fail", "pass", "fail"]
    assert doc["first_failure"] == {"name": "second", "summary": "ValueError: boom"}
    assert "boom" in doc["sections"][1]["details"]["error"]  # the traceback is kept
    assert doc["sections"][4]["summary"].startswith("not run: the check's")
    assert all(s["seconds"] is not None for s in doc["sections"])
    # saved when it starts (all pending), after each section, and at the end
    assert [s["status"] for s in saved[0]["sections"]] == ["pending"] * 5
    assert [s["status"] for s in saved[1]["sections"]][:2] == ["pass", "pending"]
    assert saved[1]["status"] == "pending" and len(saved) == 1 + 5 + 1
    captured = capsys.readouterr()
    assert "| second | fail |" in captured.out
    assert f"scratch directory (logs of every command): {tmp_path}/neotrain_device_check_" in (
        captured.out
    )
    assert "device check FAILED: first failure: second: ValueError: boom" in captured.err
