"""The device check's in-process sections (bench/device_check.py): the attention kernel of the
accelerator (flex_attention on CUDA, npu_fusion_attention on Ascend) and the fused linear
cross-entropy, each against the plain computation the project tests them with on CPU.

Inputs are made on the CPU from a seeded generator and moved, so every device sees the same
numbers. Errors are norm-relative (|a - b| / |b| over a whole tensor), judged by
device_report.within.
"""

from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F
from device_report import Outcome, within

from train.config.model import ModelConfig
from train.distributed.devices import Accelerator
from train.model.attention import dense_attention, flex_attention
from train.model.ops.fused_loss import LinearCrossEntropy
from train.model.ops.npu import npu_attention

HEADS, HEAD_DIM = 12, 64  # gpt_neo_125m's heads
WINDOW = 256  # GPT-Neo's local window
STRIDE = ModelConfig().sparse_stride
KINDS = ("global", "local", "strided")
# Random q and k with GPT-Neo's unscaled scores would make every softmax row one-hot, where a
# wrong weight hides; 1/sqrt(d) gives unit-variance scores, as in a trained model.
SCALE = HEAD_DIM**-0.5
# (length, dtype) of the cases, per accelerator. fp32 at 2048 only: its dense reference is the
# same at 8192 and the strict tolerance is what it checks. npu_fusion_attention takes fp16 and
# bf16 only (Ascend's documentation).
CASES = {
    "cuda": [(2048, torch.float32), (2048, torch.bfloat16), (8192, torch.bfloat16)],
    "npu": [(2048, torch.bfloat16), (8192, torch.bfloat16)],
}
KERNEL_NAME = {"cuda": "flex_attention", "npu": "npu_fusion_attention"}
TIMING_REPEATS = 5

# Fused loss: 2 x 2048 tokens of gpt_neo_125m's head (hidden 768, GPT-2 vocabulary).
LOSS_TOKENS, LOSS_HIDDEN, LOSS_VOCAB = 4096, 768, 50257


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def attention_plan(kind: str) -> dict:
    return {
        "kernel": KERNEL_NAME[kind],
        "reference": "dense_attention (fp32 scores, the masks' definition) on fp32 copies",
        "timed_against": "F.scaled_dot_product_attention(is_causal=True), low precision only",
        "cases": [f"{k} T={t} {_name(d)}" for t, d in CASES[kind] for k in KINDS],
        "heads": f"1 x {HEADS} x {HEAD_DIM}",
        "window": WINDOW,
        "stride": STRIDE,
        "scale": round(SCALE, 4),
    }


def fused_loss_plan() -> dict:
    return {
        "function": "LinearCrossEntropy (train/model/ops/fused_loss.py)",
        "reference": "F.cross_entropy(h @ W.T, reduction=sum) in fp32",
        "bf16_baseline": "the same in bf16",
        "shape": f"{LOSS_TOKENS} tokens x hidden {LOSS_HIDDEN} x vocab {LOSS_VOCAB}",
        "dtypes": ["fp32", "bf16"],
    }


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def _kernel(accelerator: str, kind: str):
    if accelerator == "npu":
        return lambda q, k, v: npu_attention(q, k, v, kind, WINDOW, STRIDE, SCALE, 0.0)
    return lambda q, k, v: flex_attention(q, k, v, kind, WINDOW, STRIDE, SCALE)


def _dense(kind: str):
    return lambda q, k, v: dense_attention(q, k, v, kind, WINDOW, STRIDE, SCALE)


def _sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)


def _forward_backward(fn, q, k, v, grad) -> list[torch.Tensor]:
    """[output, dq, dk, dv] of fn on leaf copies of q, k, v."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]


def _best_seconds(fn, inputs, synchronize) -> float:
    """Fastest of TIMING_REPEATS forward + backward passes, after one untimed."""
    best = float("inf")
    for i in range(TIMING_REPEATS + 1):
        synchronize()
        start = time.perf_counter()
        _forward_backward(fn, *inputs)
        synchronize()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def free(acc: Accelerator) -> None:
    """Give the memory of dropped tensors back to the device (nothing to do on a CPU)."""
    gc.collect()
    if acc.kind != "cpu":
        acc.module().empty_cache()


def allow_recompiles() -> None:
    """flex_attention is compiled once per mask pattern, length and dtype: this check makes
    nine, above dynamo's default limit of 8, past which it would fall back to the slow eager
    flex_attention without an error."""
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(64, getattr(dynamo, name)))


def attention_check(acc: Accelerator, deadline: float) -> Outcome:
    """Every (kind, length, dtype) case: output and q/k/v gradients of the kernel against dense
    attention on fp32 copies of the same inputs; in bf16 the bound is twice dense attention's
    own bf16 error (plus a floor), and the kernel is timed against causal SDPA. Cases stop at
    `deadline` (time.monotonic), the ones left counting as failures."""
    allow_recompiles()
    cases, failed = [], []
    for T, dtype in CASES[acc.kind]:
        for kind in KINDS:
            if time.monotonic() > deadline:
                failed.append(f"{kind} T={T} {_name(dtype)}: not run (out of time)")
                continue
            case = _attention_case(acc, kind, T, dtype)
            cases.append(case)
            if not case["passed"]:
                failed.append(f"{kind} T={T} {_name(dtype)}: errors {case['errors']}")
            free(acc)  # the T=8192 dense references hold ~20 GB
    worst = {
        n: max((max(c["errors"].values()) for c in cases if c["dtype"] == n), default=None)
        for n in ("fp32", "bf16")
    }
    timed = [c for c in cases if "speedup" in c]  # the low-precision cases
    longest = max((c["T"] for c in timed), default=None)
    timed = {f"{c['kind']} {c['T']}": c["speedup"] for c in timed if c["T"] == longest}
    summary = (
        f"{len(cases)} cases; largest error fp32 {worst['fp32']}, bf16 {worst['bf16']}; "
        f"speed-up of {KERNEL_NAME[acc.kind]} over causal SDPA, bf16: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in timed.items())
    )
    details = {**attention_plan(acc.kind), "cases": cases, "failed": failed}
    if failed:
        return Outcome("fail", f"{len(failed)} case(s) off: {failed[0]}", details)
    return Outcome("pass", summary, details)


def _attention_case(acc: Accelerator, kind: str, T: int, dtype: torch.dtype) -> dict:
    device = acc.device(0)
    generator = torch.Generator().manual_seed(T)
    # (B, T, H, D) memory seen as (B, H, T, D): the layout the model's projections produce.
    q, k, v = (
        torch.randn(1, T, HEADS, HEAD_DIM, generator=generator).to(device, dtype).transpose(1, 2)
        for _ in range(3)
    )
    grad = torch.randn(1, HEADS, T, HEAD_DIM, generator=generator).to(device, dtype)
    kernel = _kernel(acc.kind, kind)
    got = _forward_backward(kernel, q, k, v, grad)
    reference = _forward_backward(_dense(kind), q.float(), k.float(), v.float(), grad.float())
    names = ("out", "dq", "dk", "dv")
    errors = {n: relative_error(a, b) for n, a, b in zip(names, got, reference, strict=True)}
    case = {"kind": kind, "T": T, "dtype": _name(dtype)}
    low = dtype != torch.float32
    if low:
        plain = _forward_backward(_dense(kind), q, k, v, grad)
        baseline = {
            n: relative_error(a, b) for n, a, b in zip(names, plain, reference, strict=True)
        }
        case["dense_bf16_errors"] = {n: float(f"{e:.2e}") for n, e in baseline.items()}
        passed = all(within(errors[n], True, baseline[n]) for n in names)
        kernel_s = _best_seconds(kernel, (q, k, v, grad), acc.synchronize)
        sdpa_s = _best_seconds(_sdpa_causal, (q, k, v, grad), acc.synchronize)
        case |= {"kernel_ms": round(1e3 * kernel_s, 3), "sdpa_causal_ms": round(1e3 * sdpa_s, 3)}
        case["speedup"] = round(sdpa_s / kernel_s, 3)
    else:
        passed = all(within(e, False) for e in errors.values())
    del got, reference
    case["errors"] = {n: float(f"{e:.2e}") for n, e in errors.items()}
    case["passed"] = passed
    return case


def _loss_and_grads(fn, h, w) -> list[torch.Tensor]:
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    total = fn(h, w)
    return [total.detach(), *torch.autograd.grad(total, (h, w))]


def fused_loss_check(acc: Accelerator) -> Outcome:
    """LinearCrossEntropy's summed loss and its gradients w.r.t. h and W against logits then
    cross-entropy: fp32 against fp32; bf16 against the fp32 reference, bounded by the plain
    bf16 path's own error."""
    device = acc.device(0)
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(LOSS_TOKENS, LOSS_HIDDEN, generator=generator).to(device)
    w = (0.02 * torch.randn(LOSS_VOCAB, LOSS_HIDDEN, generator=generator)).to(device)
    targets = torch.randint(0, LOSS_VOCAB, (LOSS_TOKENS,), generator=generator)
    targets[::20] = -100  # ignored positions, as padding and masked prompts are
    targets = targets.to(device)
    counts = []

    def fused(h, w):
        total, count = LinearCrossEntropy.apply(h, w, targets)
        counts.append(int(count))
        return total

    def plain(h, w):
        return F.cross_entropy((h @ w.T).float(), targets, ignore_index=-100, reduction="sum")

    names = ("loss", "grad_h", "grad_w")
    reference = _loss_and_grads(plain, h, w)
    results, passed = {}, True
    for dtype in (torch.float32, torch.bfloat16):
        got = _loss_and_grads(fused, h.to(dtype), w.to(dtype))
        errors = {n: relative_error(a, b) for n, a, b in zip(names, got, reference, strict=True)}
        entry = {"errors": {n: float(f"{e:.2e}") for n, e in errors.items()}}
        if dtype == torch.float32:
            ok = all(within(e, False) for e in errors.values())
        else:
            base = _loss_and_grads(plain, h.to(dtype), w.to(dtype))
            baseline = {
                n: relative_error(a, b) for n, a, b in zip(names, base, reference, strict=True)
            }
            entry["plain_bf16_errors"] = {n: float(f"{e:.2e}") for n, e in baseline.items()}
            ok = all(within(errors[n], True, baseline[n]) for n in names)
        entry["count"] = counts[-1]
        ok &= counts[-1] == int((targets != -100).sum())
        entry["passed"] = ok
        passed &= ok
        results[_name(dtype)] = entry
    summary = ", ".join(
        f"{d}: loss {r['errors']['loss']:.1e}, grad_w {r['errors']['grad_w']:.1e}"
        for d, r in results.items()
    )
    details = {"results": results, **fused_loss_plan()}
    return Outcome("pass" if passed else "fail", "relative errors " + summary, details)
