"""Ascend: torch_npu, imported here only (and only when an NPU is asked for or detected), and
the attention backend on its fused kernel, `npu_fusion_attention` (band mode for local layers,
causal for global ones, an explicit mask for strided layers; packed rows in its variable-length
TND layout). Written from Ascend's documentation; tested on CPU against that documented
behaviour, not on an Ascend device."""

from __future__ import annotations

import functools
import importlib.util

import torch

from train.model.masks import attention_mask


def installed() -> bool:
    """Whether torch_npu can be imported (without importing it: it needs CANN)."""
    return importlib.util.find_spec("torch_npu") is not None


def torch_npu():
    """The torch_npu module (importing it registers torch.npu)."""
    import torch_npu as module

    return module


def _torch_npu_for_attention():
    try:
        return torch_npu()
    except ImportError as e:
        raise RuntimeError(
            "attention backend 'npu' needs torch_npu (pip install 'neotrain[npu]' on an Ascend "
            "machine with CANN installed)"
        ) from e


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
    torch_npu = _torch_npu_for_attention()
    B, H, T = q.shape[:3]
    common = dict(head_num=H, scale=scale, keep_prob=1.0 - dropout_p)
    if documents is not None and kind != "strided":
        # Packed examples: every row's runs of one document (its padding run too) become
        # sequences of the kernel's variable-length layout (TND: tokens, heads, head dim),
        # each causal (sparse_mode 3) or banded (4) on its own, so no (T, T) mask is built.
        ends = document_ends(documents)
        tnd = [x.transpose(1, 2).reshape(B * T, H, x.shape[-1]) for x in (q, k, v)]
        pattern = (
            dict(sparse_mode=3)
            if kind == "global"
            else dict(sparse_mode=4, pre_tockens=window - 1, next_tockens=0)
        )
        result = torch_npu.npu_fusion_attention(
            *tnd,
            input_layout="TND",
            atten_mask=_npu_compressed_mask(str(q.device)),
            actual_seq_qlen=ends,
            actual_seq_kvlen=ends,
            **pattern,
            **common,
        )
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
