"""What the machine computes natively (precision=auto), the measured matmul peak behind MFU,
and the throughput meter: warm-up kept out of rates and ETA, no MFU above 100%."""

import logging
import time
import warnings
from pathlib import Path

import pytest
import torch

from train.config.resolve import resolve_train
from train.config.train import TrainConfig
from train.distributed import devices as accel
from train.distributed import machine as hw
from train.errors import ConfigError
from train.loop import metrics

CPU = accel.ACCELERATORS["cpu"]


def machine(native: bool, kind: str = "cpu") -> hw.Machine:
    reason = "native" if native else "no native bf16 here"
    return hw.Machine(kind, "test device", "AVX2" if kind == "cpu" else None, native, reason, 2)


def resolve_precision(requested: str, acc: accel.Accelerator, m: hw.Machine) -> tuple[str, str]:
    """What `resolve` makes of `precision` on this accelerator and machine."""
    resolved = resolve_train(TrainConfig(precision=requested), hw.world(acc, m, world_size=1))
    return resolved.cfg.precision, resolved.precision_reason


# --------------------------------------------------------------------------------------------
# native bf16 and precision=auto


@pytest.mark.parametrize(
    ("features", "native"),
    [
        ({"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),
        ({"avx2": True}, False),
        ({"avx512_f": True, "avx512_bf16": True}, True),
        ({"amx_tile": True, "amx_bf16": True}, True),
        ({"architecture": "arm64", "bf16": True}, True),
    ],
    ids=["avx512-without-bf16", "avx2", "avx512-bf16", "amx", "arm64-bf16"],
)
def test_native_bf16_follows_the_cpu_features(features, native):
    found, reason = hw.cpu_native_bf16(features, "AVX512")
    assert found is native
    assert ("has native bf16" in reason) is native and "AVX512" in reason


def test_this_cpu_is_described_as_torch_sees_it():
    m = hw.describe(CPU)
    features = torch.cpu.get_capabilities()
    assert m.kind == "cpu" and m.isa == torch.backends.cpu.get_cpu_capability()
    assert m.native_bf16 == bool(features.get("avx512_bf16") or features.get("amx_bf16"))
    assert m.threads == torch.get_num_threads() and m.name


@pytest.mark.parametrize(
    ("kind", "native", "expected"),
    [("cpu", False, "fp32"), ("cpu", True, "bf16"), ("cuda", False, "fp32"), ("npu", True, "bf16")],
)
def test_auto_is_bf16_only_where_it_is_native(kind, native, expected):
    precision, reason = resolve_precision("auto", accel.ACCELERATORS[kind], machine(native))
    assert precision == expected and reason == machine(native).bf16_reason


def test_explicit_precision_is_kept_where_it_runs():
    assert resolve_precision("bf16", CPU, machine(False)) == ("bf16", "as asked")
    assert resolve_precision("fp32", CPU, machine(True))[0] == "fp32"
    assert resolve_precision("fp16", accel.ACCELERATORS["cuda"], machine(True))[0] == "fp16"


@pytest.mark.parametrize(
    ("precision", "kind", "message"),
    [
        ("fp8", "cpu", "precision='fp8' is not one of auto, bf16, fp16, fp32"),
        ("fp16", "cpu", "precision=fp16 needs a CUDA or Ascend device"),
        ("bf16", "npu", "precision=bf16, but no native bf16 here"),
    ],
)
def test_impossible_precision_is_a_config_error(precision, kind, message):
    with pytest.raises(ConfigError, match=message):
        resolve_precision(precision, accel.ACCELERATORS[kind], machine(False, kind))


def test_bf16_warning_says_how_much_slower(monkeypatch):
    speeds = {
        torch.float32: {"a @ b": 130e9, "a @ b.T": 128e9, "a.T @ b": 129e9},
        torch.bfloat16: {"a @ b": 1.3e9, "a @ b.T": 5e9, "a.T @ b": 13e9},
    }
    monkeypatch.setattr(hw, "matmul_speeds", lambda dtype, *args: speeds[dtype])
    text = hw.bf16_slowdown_warning(CPU, machine(False))
    assert "1.3 to 13.0 GFLOP/s" in text and "130.0 in fp32" in text
    assert "10x to 100x slower" in text and "precision=auto would use fp32" in text
    assert hw.bf16_slowdown_warning(CPU, machine(True)) is None


# --------------------------------------------------------------------------------------------
# matmul peak: bounded in time, cached


def test_measurement_stays_within_its_budget():
    # No budget: the smallest size only. A generous one: sizes grow up to max_size.
    first = hw.measure_matmuls(torch.float32, CPU, torch.device("cpu"), budget_s=0.0)
    assert first["size"] == 128 and all(v > 0 for v in first["layouts"].values())
    grown = hw.measure_matmuls(torch.float32, CPU, torch.device("cpu"), budget_s=5.0, max_size=256)
    assert grown["size"] == 256 and set(grown["layouts"]) == set(hw.LAYOUTS)


def test_bf16_measurement_is_cheap_even_where_bf16_is_emulated():
    """The default budget holds for bf16 too: the 8x dearer next size is never started when it
    would not fit (emulated bf16 stops at 256 or below, where fp32 reaches 1024 or more)."""
    result = hw.measure_matmuls(torch.bfloat16, CPU, torch.device("cpu"))
    assert result["size"] <= 8192 and min(result["layouts"].values()) > 0


def test_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOTRAIN_CACHE_DIR", str(tmp_path))
    calls = []

    def fake(dtype, acc, device, budget_s=hw.PEAK_BUDGET_S, max_size=8192):
        calls.append(dtype)
        return {"layouts": {"a @ b": 1e9, "a @ b.T": 3e9, "a.T @ b": 2e9}, "size": 256}

    monkeypatch.setattr(hw, "measure_matmuls", fake)
    m = machine(False)
    assert hw.matmul_peak(torch.float32, CPU, m) == 3e9
    assert hw.matmul_peak(torch.float32, CPU, m) == 3e9
    assert calls == [torch.float32]
    hw.matmul_peak(torch.bfloat16, CPU, m)
    assert calls == [torch.float32, torch.bfloat16]  # per dtype
    assert (tmp_path / hw.CACHE_FILE).is_file()
    hw.forget_matmul_peak(torch.float32, m)  # a peak that proved wrong is measured again
    hw.matmul_peak(torch.float32, CPU, m)
    assert calls == [torch.float32, torch.bfloat16, torch.float32]


def fake_measurements(monkeypatch, tmp_path, waits):
    """measure_matmuls replaced by measurements whose threads waited `waits[i]` of the time (the
    i-th one 10x slower when it waited); returns the list of calls."""
    monkeypatch.setenv("NEOTRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hw, "_UNCACHED", {})
    calls = []

    def fake(dtype, acc, device, budget_s=hw.PEAK_BUDGET_S, max_size=8192):
        waited = waits[len(calls)]
        calls.append(waited)
        speed = 1e9 if waited > hw.LOADED else 10e9
        return {"layouts": dict.fromkeys(hw.LAYOUTS, speed), "size": 256, "waited": waited}

    monkeypatch.setattr(hw, "measure_matmuls", fake)
    return calls


def test_a_peak_measured_under_load_is_neither_cached_nor_used(monkeypatch, tmp_path, caplog):
    """Every attempt under load: no MFU from it (None), nothing cached, one warning line saying
    how to measure again or set peak_flops; the process does not measure it twice."""
    calls = fake_measurements(monkeypatch, tmp_path, [0.8, 0.6, 0.7])
    with caplog.at_level(logging.WARNING, logger="neo.train"):
        assert hw.matmul_peak(torch.float32, CPU, machine(False)) is None
        assert hw.matmul_peak(torch.float32, CPU, machine(False)) is None
    assert calls == [0.8, 0.6, 0.7]  # best of PEAK_ATTEMPTS, once per process
    assert not (tmp_path / hw.CACHE_FILE).exists()
    [line] = caplog.messages
    assert "matmul peak, float32: measured under load" in line and "waited for a CPU 60%" in line
    assert "its 1.0 GFLOP/s cannot be trusted: not cached and no MFU from it" in line
    assert "neo info" in line and "peak_flops=" in line and "\n" not in line


def test_the_first_quiet_attempt_is_kept_and_cached(monkeypatch, tmp_path):
    calls = fake_measurements(monkeypatch, tmp_path, [0.8, 0.05, 0.0])
    assert hw.matmul_peak(torch.float32, CPU, machine(False)) == 10e9
    assert calls == [0.8, 0.05]
    assert (tmp_path / hw.CACHE_FILE).is_file()
    assert hw.matmul_peak(torch.float32, CPU, machine(False)) == 10e9 and len(calls) == 2


def test_a_peak_cached_before_the_load_check_is_measured_again(monkeypatch, tmp_path):
    """An entry written before measurements were checked for load may be one taken under it
    (0.3 GFLOP/s for a 165 GFLOP/s CPU): it is measured again."""
    import json

    calls = fake_measurements(monkeypatch, tmp_path, [0.0])
    key = hw._cache_key(machine(False), torch.float32)
    old = {"layouts": dict.fromkeys(hw.LAYOUTS, 0.3e9), "size": 128, "measured": "2026-12-01"}
    (tmp_path / hw.CACHE_FILE).write_text(json.dumps({key: old}))
    assert hw.matmul_peak(torch.float32, CPU, machine(False)) == 10e9 and calls == [0.0]


@pytest.mark.slow
def test_a_measurement_on_a_busy_machine_is_right_or_said_to_be_under_load():
    """For real: with as many busy processes as this process has CPUs, a measurement either
    comes out near the quiet peak (its fastest products ran anyway) or says that its products
    waited for a CPU; never a peak far too low taken as right."""
    import os
    import subprocess
    import sys

    if not Path("/proc/self/task").is_dir():
        pytest.skip("the wait for a CPU is read from Linux's /proc/self/task/*/schedstat")
    quiet = hw.measure_peak(torch.float32, CPU, torch.device("cpu"))
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(len(os.sched_getaffinity(0)))
    ]
    try:
        time.sleep(0.5)
        found = [hw.measure_matmuls(torch.float32, CPU, torch.device("cpu")) for _ in range(3)]
    finally:
        for process in busy:
            process.kill()
            process.wait()
    peak = max(quiet["layouts"].values())
    for one in found:
        assert one["waited"] > hw.LOADED or max(one["layouts"].values()) > peak / 2, (one, peak)


# --------------------------------------------------------------------------------------------
# throughput: warm-up, ETA, impossible MFU


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_warm_up_stays_out_of_rate_and_eta(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    meter = metrics.Throughput(
        first_step=0,
        first_tokens=0,
        max_steps=12,
        flops_per_token=1.0,
        peak_flops_total=1e6,
    )
    clock.now += 30.0  # step 1: kernel builds, first buckets
    first = meter.measure(1, 1000)
    assert first["tokens_per_s"] is None and first["warmup_s"] == 30.0 and "eta_s" not in first
    clock.now += 2.0  # steps 2 and 3: 1 s each, 1000 tokens each
    second = meter.measure(3, 3000)
    assert second["tokens_per_s"] == 1000.0
    assert second["eta_s"] == pytest.approx(9.0)  # 9 steps left at 1 s, the 30 s not counted
    assert second["mfu"] == pytest.approx(1e-3)


def test_mfu_above_one_is_never_reported_and_said_once(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    said = []
    meter = metrics.Throughput(0, 0, 10, 2000.0, 1e6, on_impossible_mfu=said.append)
    meter.measure(1, 1000)
    clock.now += 1.0
    assert meter.measure(2, 2000)["mfu"] is None  # 2000 x 1000 / 1e6 = 2.0
    clock.now += 100.0
    assert meter.measure(3, 3000)["mfu"] is None  # 0.02 now, but the peak is known to be wrong
    assert said == [2.0]


def test_progress_line_shows_warm_up_then_rate_and_eta(tmp_path, caplog):
    from train.config.train import TrainConfig

    cfg = TrainConfig(max_steps=10)
    cfg.logger.wandb.mode = "disabled"
    logger = metrics.MetricsLogger(tmp_path, cfg, enabled=True)
    with caplog.at_level(logging.INFO, logger="neo.train"):
        common = dict(loss=5.0, lr=1e-3, grad_norm=1.0)
        logger.train(1, tokens_per_s=None, mfu=None, warmup_s=12.3, **common)
        logger.train(2, tokens_per_s=2048.0, mfu=0.25, eta_s=80.0, **common)
    logger.close()
    warm, steady = caplog.messages[-2:]
    assert "warm-up 12.3s" in warm and "tok/s" not in warm and "ETA" not in warm
    assert "2,048 tok/s | MFU 25.0% | ETA 1m20s" in steady


def test_live_tensor_bytes_touches_no_deprecated_attribute():
    import torch.distributed  # noqa: F401  (its deprecated reduce_op object is then alive)

    keep = torch.zeros(1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.live_tensor_bytes() >= keep.numel() * 4
