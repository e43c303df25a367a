"""Attention patterns and the backends that compute them.

Three kinds of layer (GPT-Neo's `attention_types`, plus Sparse-Transformer striding):

    global   query i sees every key j <= i
    local    query i sees keys with 0 <= i - j < window       (HF GPT-Neo's mask: the query
                                                                itself is one of the window keys)
    strided  query i sees keys with 0 <= i - j < stride, and keys whose distance i - j is a
             multiple of stride                               (Child et al. 2019, "strided")

`visible` below is the only definition of these patterns; every backend is tested against the
dense mask built from it.

Backends, all behind `attend`:

    dense      materialised (T, T) mask, fp32 scores as Hugging Face computes them; the reference
    blockwise  O(T * window) time and memory, forward and backward, plain PyTorch: queries in
               blocks attend only to the keys they can see; the default on CPU, any device
    flex       torch flex_attention with a block mask cached per length; the default on CUDA
    npu        torch_npu.npu_fusion_attention (band / causal / explicit mask); default on Ascend
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from train.config import ATTENTION_BACKENDS
from train.ops.blockwise import blockwise_attention

log = logging.getLogger(__name__)


def visible(kind: str, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, stride: int):
    """True where a query at q_pos may attend to a key at k_pos (broadcasting tensors)."""
    distance = q_pos - k_pos
    causal = distance >= 0
    if kind == "global":
        return causal
    if kind == "local":
        return causal & (distance < window)
    if kind == "strided":
        return causal & ((distance < stride) | (distance % stride == 0))
    raise ValueError(f"unknown attention kind {kind!r}")


def attention_mask(kind: str, seq_len: int, window: int, stride: int, device=None) -> torch.Tensor:
    """(T, T) boolean mask, True where attention is allowed."""
    pos = torch.arange(seq_len, device=device)
    return visible(kind, pos[:, None], pos[None, :], window, stride)


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
) -> torch.Tensor:
    """Causal attention of one layer. q, k, v: (B, H, T, D) -> (B, H, T, D)."""
    backend = resolve_backend(backend, q.device)
    if backend == "dense":
        return dense_attention(q, k, v, kind, window, stride, scale, dropout_p)
    if backend == "npu":
        return npu_attention(q, k, v, kind, window, stride, scale, dropout_p)
    if kind == "global" or (kind == "local" and window >= q.shape[2]):
        # A window at least as long as the sequence is plain causal attention.
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale
        )
    if dropout_p > 0.0:
        _warn_dropout_fallback(backend)
        mask = attention_mask(kind, q.shape[2], window, stride, q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
    if backend == "flex":
        return flex_attention(q, k, v, kind, window, stride, scale)
    return blockwise_attention(q, k, v, kind, window, stride, scale)


# --------------------------------------------------------------------------------------------
# dense: the reference


def dense_attention(q, k, v, kind, window, stride, scale, dropout_p=0.0):
    """Exactly Hugging Face GPT-Neo's computation: fp32 scores, masked with the dtype minimum."""
    T = q.shape[2]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))  # (B, H, T, T)
    if scale != 1.0:
        scores = scores * scale
    mask = attention_mask(kind, T, window, stride, q.device)
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


def flex_attention(q, k, v, kind, window, stride, scale):
    block_mask = _flex_block_mask(kind, q.shape[2], window, stride, str(q.device))
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)


# --------------------------------------------------------------------------------------------
# npu: Ascend fused attention (torch_npu imported only here, only when asked for)

# npu_fusion_attention's band and causal modes take this compressed mask, True = masked.
_NPU_MASK_SIZE = 2048


@functools.cache
def _npu_compressed_mask(device: str) -> torch.Tensor:
    return torch.ones(_NPU_MASK_SIZE, _NPU_MASK_SIZE, dtype=torch.bool, device=device).triu(1)


def npu_attention(q, k, v, kind, window, stride, scale, dropout_p):
    try:
        import torch_npu
    except ImportError as e:
        raise RuntimeError(
            "attention backend 'npu' needs torch_npu (pip install 'neotrain[npu]' on an Ascend "
            "machine with CANN installed)"
        ) from e
    H, T = q.shape[1], q.shape[2]
    common = dict(head_num=H, input_layout="BNSD", scale=scale, keep_prob=1.0 - dropout_p)
    if kind == "global":
        mask = _npu_compressed_mask(str(q.device))
        result = torch_npu.npu_fusion_attention(q, k, v, atten_mask=mask, sparse_mode=2, **common)
    elif kind == "local":
        # Band mode: query i sees keys i - pre_tockens .. i + next_tockens.
        mask = _npu_compressed_mask(str(q.device))
        result = torch_npu.npu_fusion_attention(
            q,
            k,
            v,
            atten_mask=mask,
            sparse_mode=4,
            pre_tockens=window - 1,
            next_tockens=0,
            **common,
        )
    else:
        # No fused strided mode: an explicit mask (True = masked, the opposite of SDPA).
        mask = ~attention_mask(kind, T, window, stride, q.device)
        result = torch_npu.npu_fusion_attention(q, k, v, atten_mask=mask, sparse_mode=0, **common)
    return result[0]


@functools.cache
def _warn_dropout_fallback(backend: str) -> None:
    log.warning(
        "attention_dropout > 0: the %s backend has no dropout for local/strided layers, so those "
        "layers use a dense masked SDPA while training (O(T^2) memory)",
        backend,
    )
