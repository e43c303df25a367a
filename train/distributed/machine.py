"""What this machine computes natively, and how fast: the facts behind `precision=auto` and MFU.

- `describe(acc)`: the device (CPU model and instruction set, or GPU/NPU name), whether it has
  native bf16 matmuls, and the thread count; written into every run so that a number in a
  report can be traced to the machine that produced it.
- `resolve_precision(requested, acc)`: `auto` is bf16 where the device computes it natively,
  else fp32, with the reason in words.
- `matmul_peak(dtype, acc)`: the MFU denominator. Measured with square matmuls of growing size
  inside a fixed time budget (a fraction of a second even where bf16 is emulated), then cached
  per device, threads, torch version and dtype in ~/.cache/neotrain/matmul_peak.json
  ($NEOTRAIN_CACHE_DIR or $XDG_CACHE_HOME/neotrain where set). A measurement taken under load
  is neither cached nor used (see `measure_peak`).

Why native bf16 matters on CPU: without AVX512-BF16 or AMX (e.g. AVX2-only x86 CPUs) oneDNN has
no bf16 matmul kernel and PyTorch falls back to a reference loop, 10x to 70x slower than fp32
depending on the operands' layout (measured on a 2-core AMD EPYC with AVX2).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data_prep.files import atomic_write_text
from train.config.resolve import World
from train.distributed import devices
from train.distributed.devices import Accelerator
from train.distributed.ranks import Ranks, ranks_from_env

log = logging.getLogger("neo.train")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# CPU features that give oneDNN native bf16 matmul kernels (x86: AVX512-BF16 or AMX; arm64: the
# BF16 extension, e.g. Graviton3 / Neoverse V1).
NATIVE_BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
PEAK_BUDGET_S = 0.3
CACHE_FILE = "matmul_peak.json"


@dataclass(frozen=True)
class Machine:
    kind: str  # cpu | cuda | npu
    name: str  # "AMD EPYC", "NVIDIA H100 80GB HBM3", ...
    isa: str | None  # CPU only: torch's dispatch level (AVX2, AVX512, SVE256, DEFAULT, ...)
    native_bf16: bool
    bf16_reason: str  # why native_bf16 is what it is, in words
    threads: int  # torch intra-op threads of this process

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: `cpu AMD EPYC, AVX2, native bf16 no, 2 threads`."""
        isa = f", {self.isa}" if self.isa else ""
        native = "yes" if self.native_bf16 else "no"
        return f"{self.kind} {self.name}{isa}, native bf16 {native}, {self.threads} threads"


def cpu_features() -> dict:
    """torch's view of the CPU (cpuinfo): {"avx2": True, "amx_bf16": False, "cpu_name": ...}."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:  # torch >= 2.13
        return dict(get())
    return {  # older torch: the two probes that decide bf16
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx_bf16": torch.cpu._is_amx_tile_supported(),
    }


def cpu_native_bf16(features: dict, isa: str) -> tuple[bool, str]:
    found = [f for f in NATIVE_BF16_CPU_FEATURES if features.get(f)]
    if found:
        return True, f"this CPU ({isa}, {'+'.join(found)}) has native bf16 matmuls"
    return False, f"this CPU ({isa}) has no native bf16 matmul (no AVX512-BF16 or AMX)"


def describe(acc: Accelerator) -> Machine:
    threads = torch.get_num_threads()
    if acc.kind == "cpu":
        features = cpu_features()
        isa = torch.backends.cpu.get_cpu_capability()
        native, reason = cpu_native_bf16(features, isa)
        name = str(features.get("cpu_name") or _proc_cpu_name() or "unknown CPU")
        return Machine("cpu", name, isa, native, reason, threads)
    module = acc.module()
    name = module.get_device_name()
    if acc.kind == "cuda":
        # Ampere (sm_80) and later compute bf16 in tensor cores; before that torch emulates it.
        native = bool(module.is_bf16_supported(including_emulation=False))
        major, minor = module.get_device_capability()
        reason = f"{name} (sm_{major}{minor}) " + (
            "computes bf16 natively" if native else "has no native bf16 (needs sm_80 or later)"
        )
    else:  # Ascend: torch_npu says whether the chip computes bf16 (910B does, 910A does not)
        native = bool(module.is_bf16_supported())
        reason = f"{name} " + ("computes bf16 natively" if native else "has no bf16 support")
    return Machine(acc.kind, name, None, native, reason, threads)


def _proc_cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def world(acc: Accelerator, machine: Machine, world_size: int) -> World:
    """What `resolve` needs to know of this machine and launch."""
    return World(world_size, acc.kind, machine.native_bf16, machine.bf16_reason)


@dataclass(frozen=True)
class Host:
    """Where this process runs: its rank, its accelerator and the machine."""

    ranks: Ranks
    acc: Accelerator
    machine: Machine

    @property
    def world(self) -> World:
        return world(self.acc, self.machine, self.ranks.world_size)


def host(accelerator: str) -> Host:
    """This process's rank (from the launcher), its accelerator and the machine's facts."""
    acc = devices.select(accelerator)
    return Host(ranks_from_env(), acc, describe(acc))


# --------------------------------------------------------------------------------------------
# matmul peak


LAYOUTS = ("a @ b", "a @ b.T", "a.T @ b")
# A product whose threads waited for a CPU more than LOADED of its time measured the other work
# on the machine, not the matmul: 2 threads on a busy 2-core machine measured 0.3 GFLOP/s where
# one thread alone reached 165 (each product waits for its slowest, preempted, thread).
# Measurements are repeated, each layout's best kept, until the products that set them ran
# with their CPUs, at most PEAK_ATTEMPTS times.
LOADED = 0.2
PEAK_ATTEMPTS = 3


def measure_matmuls(
    dtype: torch.dtype,
    acc: Accelerator,
    device: torch.device,
    budget_s: float = PEAK_BUDGET_S,
    max_size: int = 8192,
) -> dict:
    """FLOP/s of square matmuls of sizes 128, 256, ... in the three layouts training uses
    (a @ b; a @ b.T in Linear's forward; a.T @ b in its weight gradient: emulated bf16 kernels
    differ 10x between them): {"layouts": {layout: best FLOP/s over sizes}, "size": the largest
    size measured, "waited": the most, over layouts, of the share of its time the product that
    set the best waited for a CPU (CPU devices on Linux; else None)}. Each size and layout gets
    a warm-up and up to three timed products; the next size (8x the work) starts only if its
    warm-up and one product fit in what is left of `budget_s`."""
    torch.ones(8, 8, device=device).to(dtype) @ torch.ones(8, 8, device=device).to(dtype)
    acc.synchronize()  # library start-up (cuBLAS handles, oneDNN) stays out of the budget
    watch = acc.kind == "cpu" and _waited_s() is not None
    threads = torch.get_num_threads()
    deadline = time.perf_counter() + budget_s
    best = dict.fromkeys(LAYOUTS, 0.0)
    waited = dict.fromkeys(LAYOUTS, 0.0)
    n = 128
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        cost = 0.0  # one product in every layout, at this size
        for layout, (x, y) in zip(LAYOUTS, ((a, b), (a, b.T), (a.T, b)), strict=True):
            x @ y  # warm-up: kernel selection, packing buffers
            acc.synchronize()
            fastest, its_wait = math.inf, 0.0
            for _ in range(3):
                before = _waited_s() if watch else 0.0
                began = time.perf_counter()
                x @ y
                acc.synchronize()
                took = time.perf_counter() - began
                if took < fastest:
                    fastest = took
                    its_wait = (_waited_s() - before) / (took * threads) if watch else 0.0
                if time.perf_counter() + fastest > deadline:
                    break
            cost += fastest
            if 2 * n**3 / fastest > best[layout]:
                best[layout], waited[layout] = 2 * n**3 / fastest, its_wait
        del a, b
        if n >= max_size or time.perf_counter() + 2 * 8 * cost > deadline:
            break
        n *= 2
    return {"layouts": best, "size": n, "waited": max(waited.values()) if watch else None}


def _waited_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux's
    /proc/self/task/*/schedstat, second field); None where that is not available."""
    total = 0
    try:
        for task in Path("/proc/self/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
    except (OSError, IndexError, ValueError):
        return None
    return total / 1e9


def measure_peak(dtype: torch.dtype, acc: Accelerator, device: torch.device) -> dict:
    """`measure_matmuls` until its best products ran with their CPUs, at most PEAK_ATTEMPTS
    times, each layout's best kept: {"layouts", "size", "loaded"}; "loaded" is None for a
    quiet measurement, else the least share of their time those products waited for a CPU."""
    layouts, waits = dict.fromkeys(LAYOUTS, 0.0), []
    for _ in range(PEAK_ATTEMPTS):
        found = measure_matmuls(dtype, acc, device)
        layouts = {k: max(v, found["layouts"][k]) for k, v in layouts.items()}
        waited = found.get("waited")
        if waited is None or waited <= LOADED:
            return {"layouts": layouts, "size": found["size"], "loaded": None}
        waits.append(waited)
    return {"layouts": layouts, "size": found["size"], "loaded": min(waits)}


def cache_path() -> Path:
    """$NEOTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/neotrain, else ~/.cache/neotrain."""
    root = os.environ.get("NEOTRAIN_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neotrain"
    return Path(root) / CACHE_FILE


def _cache_key(machine: Machine, dtype: torch.dtype) -> str:
    isa = f" {machine.isa}" if machine.isa else ""
    return (
        f"{machine.kind} {machine.name}{isa} | {machine.threads} threads | "
        f"torch {torch.__version__} | {str(dtype).removeprefix('torch.')}"
    )


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path(), json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except OSError as e:  # a read-only home is no reason to stop
        log.debug("could not write the matmul cache %s: %s", cache_path(), e)


# Measured under load in this process: used for nothing, cached nowhere, measured once.
_UNCACHED: dict[str, dict] = {}


def measurement(
    dtype: torch.dtype, acc: Accelerator, machine: Machine, device: torch.device | None = None
) -> dict:
    """This device's matmul speeds in `dtype`, {"layouts": {layout: FLOP/s}, "size", "loaded",
    "measured"}: cached, or measured now (a second at most) and cached when the measurement had
    the CPUs to itself. One taken under load is said in one line and kept for this process only.
    """
    key = _cache_key(machine, dtype)
    if key in _UNCACHED:
        return _UNCACHED[key]
    entry = _read_cache().get(key)
    if entry is not None and "loaded" in entry:  # an entry without it predates the load check
        return entry
    entry = measure_peak(dtype, acc, device or acc.device(0))
    entry["measured"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if acc.kind != "cpu":
        acc.module().empty_cache()
    if entry["loaded"] is None:
        _write_cache({**_read_cache(), key: entry})  # re-read: another rank or run may write
    else:
        _UNCACHED[key] = entry
        log.warning(under_load(dtype, machine, entry))
    return entry


def under_load(dtype: torch.dtype, machine: Machine, entry: dict) -> str:
    """One line: the peak was measured under load, so it is not used; what to do instead."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"matmul peak, {str(dtype).removeprefix('torch.')}: measured under load (even the "
        f"fastest products' {machine.threads} thread(s) waited for a CPU {entry['loaded']:.0%} of "
        f"their time; load average {os.getloadavg()[0]:.1f} on {cores} cores), so its "
        f"{max(entry['layouts'].values()) / 1e9:,.1f} GFLOP/s cannot be trusted: not cached and "
        "no MFU from it; measure it again on a quiet machine (neo info) or set peak_flops=FLOP/s "
        "per device"
    )


def matmul_speeds(
    dtype: torch.dtype, acc: Accelerator, machine: Machine, device: torch.device | None = None
) -> dict[str, float]:
    """{layout: FLOP/s} of this device's matmuls in `dtype` (`measurement`)."""
    return measurement(dtype, acc, machine, device)["layouts"]


def matmul_peak(
    dtype: torch.dtype, acc: Accelerator, machine: Machine, device: torch.device | None = None
) -> float | None:
    """The MFU denominator: the fastest matmul FLOP/s this device reached in `dtype`; None when
    it could only be measured under load (no MFU rather than a wrong one)."""
    entry = measurement(dtype, acc, machine, device)
    return None if entry["loaded"] is not None else max(entry["layouts"].values())


def forget_matmul_peak(dtype: torch.dtype, machine: Machine) -> None:
    """Drop a cached measurement that proved wrong (an MFU above 100%): the next run measures."""
    key = _cache_key(machine, dtype)
    _UNCACHED.pop(key, None)
    cache = _read_cache()
    if cache.pop(key, None) is not None:
        _write_cache(cache)


def bf16_slowdown_warning(
    acc: Accelerator, machine: Machine, device: torch.device | None = None
) -> str | None:
    """For an explicit precision=bf16 where bf16 is not native: one line saying how much slower
    it is here, from the measured matmuls."""
    if machine.native_bf16:
        return None
    fp32 = max(matmul_speeds(torch.float32, acc, machine, device).values())
    bf16 = matmul_speeds(torch.bfloat16, acc, machine, device).values()
    slow, fast = min(bf16), max(bf16)
    return (
        f"precision=bf16 on a device without native bf16: {machine.bf16_reason}. bf16 matmuls "
        f"ran at {slow / 1e9:,.1f} to {fast / 1e9:,.1f} GFLOP/s here (by operand layout) "
        f"against {fp32 / 1e9:,.1f} in fp32, {fp32 / fast:,.0f}x to {fp32 / slow:,.0f}x slower; "
        "precision=auto would use fp32"
    )
