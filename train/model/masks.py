"""The one definition of what each attention kind lets a query see (`visible`), and the dense
mask built from it. Every backend (train/model/attention.py), the KV cache and the ONNX export
compute exactly this; the tests hold each of them to the dense mask.

    global   query i sees every key j <= i
    local    query i sees keys with 0 <= i - j < window       (HF GPT-Neo's mask: the query
                                                                itself is one of the window keys)
    strided  query i sees keys with 0 <= i - j < stride, and keys whose distance i - j is a
             multiple of stride                               (Child et al. 2019, "strided")

Packed sequences (several examples in one row, SFT) add one rule to every kind: a query sees
only keys of its own document (`documents`: (B, T) ids, equal within an example).
"""

from __future__ import annotations

import torch


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
