"""Local (sliding-window) attention, forward + backward, fp32 on CPU, side by side in one run.

    python bench/attention.py [--lengths 1024 2048 4096 8192] [--blocks 64 128] [--repeats 3]

Columns: dense causal SDPA (the O(T^2) baseline), SDPA with the explicit band mask (same
O(T^2) work: a mask alone saves nothing), and our blockwise backend at each query block size;
then the ratios. Goals (issue 2): blockwise >= 10x faster than dense causal at T=8192, and
blockwise time growing at most 2.1x per doubling of T.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from train.model.attention import attend
from train.model.masks import attention_mask
from train.model.ops import blockwise as blockwise_ops

HEADS, HEAD_DIM, WINDOW = 12, 64, 256


def time_fwd_bwd(methods: dict, T: int, repeats: int) -> dict[str, float]:
    """Best of `repeats` wall times of forward + backward for each method, after a warm-up.
    The methods take turns within every repeat, so a slow phase of a noisy machine hits them
    all rather than one."""
    g = torch.Generator().manual_seed(0)
    # (B, T, H, D) memory seen as (B, H, T, D): the layout the model's projections produce.
    q, k, v = (
        torch.randn(1, T, HEADS, HEAD_DIM, generator=g).transpose(1, 2).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(1, HEADS, T, HEAD_DIM, generator=g)
    best = dict.fromkeys(methods, float("inf"))
    for i in range(repeats + 1):
        for name, fn in methods.items():
            start = time.perf_counter()
            torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
            if i:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def dense_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)


def dense_band(q, k, v):
    mask = attention_mask("local", q.shape[2], WINDOW, 0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def blockwise(block: int):
    def fn(q, k, v):
        blockwise_ops.BAND_BLOCK = block
        return attend(
            q, k, v, kind="local", window=WINDOW, stride=0, scale=1.0, backend="blockwise"
        )

    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--blocks", type=int, nargs="+", default=[blockwise_ops.BAND_BLOCK])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    default_block = blockwise_ops.BAND_BLOCK

    results: dict[int, dict[str, float]] = {}
    for T in args.lengths:
        methods = {"causal": dense_causal, "band": dense_band}
        methods.update({f"b{block}": blockwise(block) for block in args.blocks})
        results[T] = time_fwd_bwd(methods, T, args.repeats)
    blockwise_ops.BAND_BLOCK = default_block

    table = Table(
        title=f"local attention fwd+bwd, fp32, {torch.get_num_threads()} threads, "
        f"heads {HEADS}x{HEAD_DIM}, window {WINDOW}, batch 1 (best of {args.repeats})"
    )
    for column in (
        "T",
        "method",
        "seconds",
        "speed-up vs dense causal",
        "vs band mask",
        "growth per 2x T",
    ):
        table.add_column(column, justify="right")
    previous: dict[str, float] = {}
    for T, row in results.items():
        for method, t in row.items():
            name = {"causal": "dense causal SDPA", "band": "SDPA + band mask"}.get(
                method, f"blockwise, block {method[1:]}"
            )
            growth = f"{t / previous[method]:.2f}x" if method in previous else "-"
            previous[method] = t
            table.add_row(
                str(T),
                name,
                f"{t:.3f}",
                f"{row['causal'] / t:.1f}x",
                f"{row['band'] / t:.1f}x",
                growth,
            )
        table.add_section()
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
