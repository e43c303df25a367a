"""Blockwise sparse attention: O(T * window) time and memory, forward and backward, in plain
PyTorch on any device (the CPU path, where flex_attention has no backward). Queries in blocks
attend only to the keys they can see, through the fused SDPA kernels' forward and backward.
train/model/attention.py defines what each layer kind sees; this file only computes it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Query block of the blockwise band: smaller blocks compute fewer masked-out scores (a block of
# B queries reads B + window - 1 keys), larger blocks make fewer, bigger kernel calls.
# Chosen by bench/attention.py on CPU.
BAND_BLOCK = 64


def blockwise_attention(q, k, v, kind, window, stride, scale, documents=None):
    """`documents` (B, T): packed examples; a query also needs its key's document."""
    if kind == "local":
        return _SparseAttention.apply(q, k, v, window, 0, scale, documents)
    if kind == "strided":
        return _SparseAttention.apply(q, k, v, stride, stride, scale, documents)
    raise ValueError(f"blockwise attention handles local and strided layers, not {kind!r}")


class _SparseAttention(torch.autograd.Function):
    """Causal band of `window` keys, plus (if stride > 0) every key a multiple of stride away.

    The two parts see disjoint keys, so each is computed by a fused attention kernel that also
    returns the log-sum-exp of its scores, and the parts are merged exactly:
        lse = logaddexp(lse_band, lse_col),   out = sum_p out_p * exp(lse_p - lse).
    The backward pass of a softmax-attention kernel needs only (q, k, v, dout, out, lse); given
    the merged out and lse it returns each part's exact share of the gradient. So nothing of
    size T x window is kept for backward, and no (T, T) tensor ever exists.

    band:    queries in blocks of BAND_BLOCK; block [s, e) reads keys [s - window + 1, e) as
             views (no copies) with a small additive band mask.
    columns: positions i = a * stride + r regrouped by residue r, so "distance a multiple of
             stride" becomes strictly-causal dense attention over T / stride positions per r.
    documents: both parts add "same document" to their masks (per batch row). A query always
             sees itself in the band; its columns may see nothing, so their document mask is
             finite (the dtype's minimum), never a row of -inf.
    """

    @staticmethod
    def forward(ctx, q, k, v, window: int, stride: int, scale: float, documents=None):
        out, lse = _band_forward(q, k, v, window, scale, documents)
        if stride and q.shape[2] > stride:
            col_out, col_lse = _columns_forward(q, k, v, stride, scale, documents)
            merged = torch.logaddexp(lse, col_lse)
            out = (
                out * torch.exp(lse - merged)[..., None]
                + col_out * torch.exp(col_lse - merged)[..., None]
            )
            lse = merged
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window, ctx.stride, ctx.scale = window, stride, scale
        ctx.documents = documents
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        docs = ctx.documents
        dq, dk, dv = _band_backward(dout, q, k, v, out, lse, ctx.window, ctx.scale, docs)
        if ctx.stride and q.shape[2] > ctx.stride:
            cq, ck, cv = _columns_backward(dout, q, k, v, out, lse, ctx.stride, ctx.scale, docs)
            dq, dk, dv = dq + cq, dk + ck, dv + cv
        return dq, dk, dv, None, None, None, None


def _band_span(block: int, window: int) -> int:
    """Keys read per query block: the block + window - 1 keys it can see, rounded up to a
    multiple of 16 (the extra keys are masked; aligned sizes run ~15% faster in the CPU kernel)."""
    return -(-(block + window - 1) // 16) * 16


def _band_mask(block: int, window: int, dtype, device) -> torch.Tensor:
    """Additive (block, span) mask. Key m of a block's span sits `span - block - m` positions
    before the block's first query, so query r sees it iff 0 <= r + span - block - m < window."""
    span = _band_span(block, window)
    r = torch.arange(block, device=device)[:, None]
    m = torch.arange(span, device=device)[None, :]
    distance = r + span - block - m
    allowed = (distance >= 0) & (distance < window)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, -math.inf)


def _band_spans(T: int, window: int):
    """Yield (s, e, ks, m0): query block [s, e), its keys [ks, e), and the mask column of ks."""
    block = min(BAND_BLOCK, T)
    span = _band_span(block, window)
    for s in range(0, T, block):
        e = min(s + block, T)
        first = s + block - span  # position of mask column 0
        ks = max(0, first)
        yield s, e, ks, ks - first


def _with_documents(mask, documents, s, e, ks):
    """The band block's mask (L, S), and (B, 1, L, S) with keys of other documents removed."""
    if documents is None:
        return mask
    same = documents[:, s:e, None] == documents[:, None, ks:e]
    return mask.masked_fill(~same[:, None], -math.inf)


def _band_forward(q, k, v, window, scale, documents=None):
    B, H, T, D = q.shape
    block = min(BAND_BLOCK, T)
    mask = _band_mask(block, window, _mask_dtype(q), q.device)
    # (B, T, H, D) memory, seen as (B, H, T, D): the layout the CPU kernel reads and writes.
    out = torch.empty(B, T, H, D, dtype=torch.float32, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    for s, e, ks, m0 in _band_spans(T, window):
        m = _with_documents(mask[: e - s, m0 : m0 + e - ks], documents, s, e, ks)
        o, block_lse = _kernel_forward(q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e], m, False, scale)
        out[:, :, s:e] = o
        lse[:, :, s:e] = block_lse
    return out, lse


def _band_backward(dout, q, k, v, out, lse, window, scale, documents=None):
    B, H, T, D = q.shape
    block = min(BAND_BLOCK, T)
    mask = _band_mask(block, window, _mask_dtype(q), q.device)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for s, e, ks, m0 in _band_spans(T, window):
        m = _with_documents(mask[: e - s, m0 : m0 + e - ks], documents, s, e, ks)
        gq, gk, gv = _kernel_backward(
            dout[:, :, s:e],
            q[:, :, s:e],
            k[:, :, ks:e],
            v[:, :, ks:e],
            out[:, :, s:e],
            lse[:, :, s:e],
            m,
            False,
            scale,
        )
        dq[:, :, s:e] = gq
        dk[:, :, ks:e] += gk
        dv[:, :, ks:e] += gv
    return dq, dk, dv


def _to_columns(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, H, T, *rest) -> (B, H * stride, n, *rest) with n = ceil(T / stride): position
    a * stride + r goes to row r, column a (zero padding after the end)."""
    B, H, T = x.shape[:3]
    n = -(-T // stride)
    pad = [0, 0] * (x.dim() - 3) + [0, n * stride - T]
    x = F.pad(x, pad).view(B, H, n, stride, *x.shape[3:])
    return x.transpose(2, 3).reshape(B, H * stride, n, *x.shape[4:])


def _from_columns(x: torch.Tensor, H: int, T: int) -> torch.Tensor:
    """Inverse of _to_columns."""
    B, HS, n = x.shape[:3]
    stride = HS // H
    x = x.view(B, H, stride, n, *x.shape[3:]).transpose(2, 3)
    return x.reshape(B, H, n * stride, *x.shape[4:])[:, :, :T]


def _columns_mask(documents, H, stride, dtype):
    """Without documents: None (the kernel's causal mode). With them: the additive
    (B, H * stride, n - 1, n - 1) mask of causal & same document between query columns 1..n-1
    and key columns 0..n-2, finite where masked (a column may see no key at all)."""
    if documents is None:
        return None
    cols = _to_columns(documents[:, None], stride)  # (B, stride, n)
    same = cols[:, :, 1:, None] == cols[:, :, None, :-1]
    allowed = same & torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask = mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    B, _, L, S = mask.shape
    return mask[:, None].expand(B, H, stride, L, S).reshape(B, H * stride, L, S)


def _columns_forward(q, k, v, stride, scale, documents=None):
    """Keys at distance stride, 2*stride, ...: strictly causal attention within each residue.
    Column a of the queries attends to columns 0..a-1 of the keys, which is ordinary causal
    attention between query columns 1..n-1 and key columns 0..n-2."""
    B, H, T, D = q.shape
    qc, kc, vc = (_to_columns(x, stride) for x in (q, k, v))
    mask = _columns_mask(documents, H, stride, _mask_dtype(q))
    causal = mask is None
    o, col_lse = _kernel_forward(qc[:, :, 1:], kc[:, :, :-1], vc[:, :, :-1], mask, causal, scale)
    out = torch.zeros(*qc.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(qc.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
    out[:, :, 1:] = o
    lse[:, :, 1:] = col_lse
    return _from_columns(out, H, T), _from_columns(lse, H, T)


def _columns_backward(dout, q, k, v, out, lse, stride, scale, documents=None):
    B, H, T, D = q.shape
    qc, kc, vc, dc, oc = (_to_columns(x, stride) for x in (q, k, v, dout, out))
    lc = _to_columns(lse, stride)
    mask = _columns_mask(documents, H, stride, _mask_dtype(q))
    gq, gk, gv = _kernel_backward(
        dc[:, :, 1:],
        qc[:, :, 1:],
        kc[:, :, :-1],
        vc[:, :, :-1],
        oc[:, :, 1:],
        lc[:, :, 1:],
        mask,
        mask is None,
        scale,
    )
    dq, dk, dv = torch.zeros_like(qc), torch.zeros_like(kc), torch.zeros_like(vc)
    dq[:, :, 1:] = gq
    dk[:, :, :-1] = gk
    dv[:, :, :-1] = gv
    return _from_columns(dq, H, T), _from_columns(dk, H, T), _from_columns(dv, H, T)


# Fused kernels returning (out, lse). On CPU, PyTorch's flash-attention kernel; elsewhere the
# same computation in plain tensor ops (memory O(block * keys) per call, not O(T^2)).
# `causal` is top-left aligned and only used with as many queries as keys.


def _mask_dtype(q):
    return q.dtype if q.device.type == "cpu" else torch.float32


def _kernel_forward(q, k, v, mask, causal, scale):
    if q.device.type == "cpu" and _USE_CPU_FLASH:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
        return o, lse
    return _math_forward(q, k, v, mask, causal, scale)


def _kernel_backward(dout, q, k, v, out, lse, mask, causal, scale):
    if q.device.type == "cpu" and _USE_CPU_FLASH:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype),
            q,
            k,
            v,
            out.to(q.dtype),
            lse,
            0.0,
            causal,
            attn_mask=mask,
            scale=scale,
        )
    return _math_backward(dout, q, k, v, out, lse, mask, causal, scale)


_USE_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def _scores(q, k, mask, causal, scale):
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    if causal:
        L, S = s.shape[-2:]
        upper = torch.ones(L, S, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(upper, -math.inf)
    return s


def _math_forward(q, k, v, mask, causal, scale):
    s = _scores(q, k, mask, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse[..., None]), v.float())
    return out, lse


def _math_backward(dout, q, k, v, out, lse, mask, causal, scale):
    p = torch.exp(_scores(q, k, mask, causal, scale) - lse[..., None])  # (.., L, S)
    dout = dout.float()
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.float().transpose(-1, -2))
    ds = p * (dp - (dout * out.float()).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.float()) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
