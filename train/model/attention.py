"""Attention patterns and the backends that compute them.

Three kinds of layer (GPT-Neo's `attention_types`, plus Sparse-Transformer striding):

    global   query i sees every key j <= i
    local    query i sees keys with 0 <= i - j < window       (HF GPT-Neo's mask: the query
                                                                itself is one of the window keys)
    strided  query i sees keys with 0 <= i - j < stride, and keys whose distance i - j is a
             multiple of stride                               (Child et al. 2019, "strided")

Packed sequences (several examples in one row, SFT) add one rule to every kind: a query sees
only keys of its own document (`documents`: (B, T) ids, equal within an example).

`visible` below is the only definition of these patterns; every backend is tested against the
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

from train.config import ATTENTION_BACKENDS
from train.model.ops.blockwise import blockwise_attention

log = logging.getLogger(__name__)


def visible(
    kind: str,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
    stride: int,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
):
    """True where a query at q_pos (of document q_doc) may attend to a key at k_pos (of
    document k_doc); broadcasting tensors."""
    distance = q_pos - k_pos
    allowed = distance >= 0
    if kind == "local":
        allowed = allowed & (distance < window)
    elif kind == "strided":
        allowed = allowed & ((distance < stride) | (distance % stride == 0))
    elif kind != "global":
        raise ValueError(f"unknown attention kind {kind!r}")
    if q_doc is not None:
        allowed = allowed & (q_doc == k_doc)
    return allowed


def attention_mask(
    kind: str,
    seq_len: int,
    window: int,
    stride: int,
    device=None,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """(T, T) boolean mask, True where attention is allowed; with (B, T) documents, (B, 1, T, T)."""
    pos = torch.arange(seq_len, device=device)
    if documents is None:
        return visible(kind, pos[:, None], pos[None, :], window, stride)
    q_doc, k_doc = documents[:, None, :, None], documents[:, None, None, :]
    return visible(kind, pos[:, None], pos[None, :], window, stride, q_doc, k_doc)


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
            return visible(kind, q_idx, kv_idx, window, stride,
                           documents[b, q_idx], documents[b, kv_idx])  # fmt: skip

        T = q.shape[2]
        block_mask = create_block_mask(mask_mod, q.shape[0], None, T, T, device=str(q.device))
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)


# --------------------------------------------------------------------------------------------
# npu: Ascend fused attention (torch_npu imported only here, only when asked for)

# npu_fusion_attention's band and causal modes take this compressed mask, True = masked.
_NPU_MASK_SIZE = 2048


@functools.cache
def _npu_compressed_mask(device: str) -> torch.Tensor:
    return torch.ones(_NPU_MASK_SIZE, _NPU_MASK_SIZE, dtype=torch.bool, device=device).triu(1)


def document_ends(documents: torch.Tensor) -> list[int]:
    """Where each run of one document id ends in the (B, T) ids flattened, a row's end ending
    a run too: the cumulative lengths npu_fusion_attention's TND layout takes (actual_seq_qlen,
    a host list: reading it waits for the device)."""
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return starts.flatten().nonzero().flatten()[1:].tolist() + [documents.numel()]


def npu_attention(q, k, v, kind, window, stride, scale, dropout_p, documents=None):
    try:
        import torch_npu
    except ImportError as e:
        raise RuntimeError(
            "attention backend 'npu' needs torch_npu (pip install 'neotrain[npu]' on an Ascend "
            "machine with CANN installed)"
        ) from e
    B, H, T = q.shape[:3]
    common = dict(head_num=H, scale=scale, keep_prob=1.0 - dropout_p)
    if documents is not None and kind != "strided":
        # Packed examples: every row's runs of one document (its padding run too) become
        # sequences of the kernel's variable-length layout (TND: tokens, heads, head dim),
        # each causal (sparse_mode 3) or banded (4) on its own, so no (T, T) mask is built.
        ends = document_ends(documents)
        tnd = [x.transpose(1, 2).reshape(B * T, H, x.shape[-1]) for x in (q, k, v)]
        pattern = dict(sparse_mode=3) if kind == "global" else dict(
            sparse_mode=4, pre_tockens=window - 1, next_tockens=0)  # fmt: skip
        result = torch_npu.npu_fusion_attention(
            *tnd, input_layout="TND", atten_mask=_npu_compressed_mask(str(q.device)),
            actual_seq_qlen=ends, actual_seq_kvlen=ends, **pattern, **common,
        )  # fmt: skip
        return result[0].reshape(B, T, H, -1).transpose(1, 2)
    common["input_layout"] = "BNSD"
    if documents is not None:
        # Strided layers have no fused pattern: an explicit (B, 1, T, T) mask (True = masked).
        mask = ~attention_mask(kind, T, window, stride, q.device, documents)
        result = torch_npu.npu_fusion_attention(q, k, v, atten_mask=mask, sparse_mode=0, **common)
    elif kind == "global":
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
