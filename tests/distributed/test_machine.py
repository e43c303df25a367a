"""What the machine computes natively (precision=auto), the measured matmul peak behind MFU,
and the throughput meter: warm-up kept out of rates and ETA, no MFU above 100%."""

import logging
import warnings

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
