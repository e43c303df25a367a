"""The backends that compute attention, all behind `attend`. What each layer kind (global,
local, strided) lets a query see, packed examples included, is `visible` in
train/model/masks.py, the only definition of the patterns; every backend is tested against the
dense mask built from it.

Backends, all behind `attend`:

    dense      materialised (T, T) mask, fp32 scores as Hugging Face computes them; the reference
    blockwise  O(T * window) time and memory, forward and backward, plain PyTorch: queries in
               blocks attend only to the keys they can see; the default on CPU, any device
    flex       torch flex_attention with a block mask cached per length; the default on CUDA
    npu        torch_npu.npu_fusion_attention (band / causal / explicit mask; packed rows in its
               variable-length TND layout); default on Ascend
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from train.config.model import ATTENTION_BACKENDS
from train.model.masks import attention_mask, visible
from train.model.ops.blockwise import blockwise_attention
from train.model.ops.npu import npu_attention

log = logging.getLogger(__name__)


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` picks by device: flex on CUDA, npu on Ascend, blockwise elsewhere."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention backend {name!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
        )
    if name != "auto":
        return name
    if device.type == "cuda" and _has_flex():
        return "flex"
    if device.type == "npu":
        return "npu"
    return "blockwise"


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kind: str,
    window: int,
    stride: int,
    scale: float,
    dropout_p: float = 0.0,
    backend: str = "auto",
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one layer. q, k, v: (B, H, T, D) -> (B, H, T, D). `documents`
    (B, T): packed examples, each seeing only itself."""
    backend = resolve_backend(backend, q.device)
    if backend == "dense":
        return dense_attention(q, k, v, kind, window, stride, scale, dropout_p, documents)
    if backend == "npu":
        return npu_attention(q, k, v, kind, window, stride, scale, dropout_p, documents)
    if kind == "local" and window >= q.shape[2]:
        kind = "global"  # a window at least as long as the sequence is plain causal attention
    if kind == "global" and documents is None:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale
        )
    if dropout_p > 0.0 or (kind == "global" and backend != "flex"):
        if dropout_p > 0.0 and kind != "global":
            _warn_dropout_fallback(backend)
        mask = attention_mask(kind, q.shape[2], window, stride, q.device, documents)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
    if backend == "flex":
        return flex_attention(q, k, v, kind, window, stride, scale, documents)
    return blockwise_attention(q, k, v, kind, window, stride, scale, documents)


# --------------------------------------------------------------------------------------------
# dense: the reference


def dense_attention(q, k, v, kind, window, stride, scale, dropout_p=0.0, documents=None):
    """Exactly Hugging Face GPT-Neo's computation: fp32 scores, masked with the dtype minimum."""
    T = q.shape[2]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))  # (B, H, T, T)
    if scale != 1.0:
        scores = scores * scale
    mask = attention_mask(kind, T, window, stride, q.device, documents)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    probs = F.dropout(probs, dropout_p) if dropout_p > 0.0 else probs
    return torch.matmul(probs, v)


# --------------------------------------------------------------------------------------------
# flex: CUDA (forward also runs on CPU under torch.compile; its backward does not)


def _has_flex() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False)


@functools.lru_cache(maxsize=64)
def _flex_block_mask(kind: str, seq_len: int, window: int, stride: int, device: str):
    """Block masks depend on the sequence length: built once per (pattern, length, device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(kind, q_idx, kv_idx, window, stride)

    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)


def flex_attention(q, k, v, kind, window, stride, scale, documents=None):
    if documents is None:
        block_mask = _flex_block_mask(kind, q.shape[2], window, stride, str(q.device))
    else:  # the documents change with every batch: a block mask of its own
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q_idx, kv_idx):
            return visible(
                kind, q_idx, kv_idx, window, stride, documents[b, q_idx], documents[b, kv_idx]
            )

        T = q.shape[2]
        block_mask = create_block_mask(mask_mod, q.shape[0], None, T, T, device=str(q.device))
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)


@functools.cache
def _warn_dropout_fallback(backend: str) -> None:
    log.warning(
        "attention_dropout > 0: the %s backend has no dropout for local/strided layers, so those "
        "layers use a dense masked SDPA while training (O(T^2) memory)",
        backend,
    )
