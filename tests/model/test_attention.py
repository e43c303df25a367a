"""Every backend that runs here against the dense reference, outputs and gradients."""

import sys
import types

import pytest
import torch

from train.model.attention import attend, dense_attention, resolve_backend
from train.model.masks import attention_mask
from train.model.ops import blockwise
from train.model.ops.npu import document_ends


def brute_force_mask(kind, T, window, stride):
    """The patterns written out element by element, independently of `visible`."""
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            d = i - j
            if kind == "global":
                m[i, j] = True
            elif kind == "local":
                m[i, j] = d < window
            else:
                m[i, j] = d < stride or d % stride == 0
    return m


@pytest.mark.parametrize("kind", ["global", "local", "strided"])
def test_mask_matches_definition(kind):
    assert torch.equal(attention_mask(kind, 37, 5, 4), brute_force_mask(kind, 37, 5, 4))


def test_local_mask_is_hugging_face_band():
    # HF GPT-Neo: tril(ones) xor tril(ones, -window) -> the query and window-1 keys before it.
    T, W = 20, 6
    ones = torch.ones(T, T, dtype=torch.bool)
    hf = torch.bitwise_xor(torch.tril(ones), torch.tril(ones, -W))
    assert torch.equal(attention_mask("local", T, W, 0), hf)


def qkv(B, H, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def run(backend, q, k, v, kind, window, stride, scale):
    out = attend(q, k, v, kind=kind, window=window, stride=stride, scale=scale, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


# Window 16, block 128 (BAND_BLOCK): lengths below, equal to and far above the window, and not
# multiples of the block.
LENGTHS = [7, 16, 50, 129, 300]


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("kind", ["local", "strided"])
@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_blockwise_matches_dense(T, kind, scale):
    q, k, v = qkv(2, 3, T, 8)
    ref, ref_grads = run("dense", q, k, v, kind, 16, 16, scale)
    out, grads = run("blockwise", q, k, v, kind, 16, 16, scale)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("T", [50, 300])
@pytest.mark.parametrize("kind", ["local", "strided"])
def test_blockwise_small_blocks(monkeypatch, T, kind):
    # Many blocks: block 8 with window 21 and stride 5, so spans start mid-block and overlap.
    monkeypatch.setattr(blockwise, "BAND_BLOCK", 8)
    q, k, v = qkv(1, 2, T, 4)
    ref, ref_grads = run("dense", q, k, v, kind, 21, 5, 1.0)
    out, grads = run("blockwise", q, k, v, kind, 21, 5, 1.0)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["local", "strided"])
def test_portable_kernels_match_dense(monkeypatch, kind):
    """The plain-tensor kernels used off CPU, forced on here."""
    monkeypatch.setattr(blockwise, "_USE_CPU_FLASH", False)
    monkeypatch.setattr(blockwise, "BAND_BLOCK", 32)
    q, k, v = qkv(2, 2, 150, 8)
    ref, ref_grads = run("dense", q, k, v, kind, 24, 12, 0.3)
    out, grads = run("blockwise", q, k, v, kind, 24, 12, 0.3)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


def test_global_backends_agree():
    q, k, v = qkv(1, 2, 40, 8)
    ref, ref_grads = run("dense", q, k, v, "global", 0, 0, 1.0)
    out, grads = run("blockwise", q, k, v, "global", 0, 0, 1.0)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


def test_blockwise_bf16_close_to_fp32_reference():
    q, k, v = qkv(1, 2, 200, 16)
    ref = dense_attention(q, k, v, "strided", 32, 32, 0.25)
    low = [x.detach().bfloat16() for x in (q, k, v)]
    out = attend(*low, kind="strided", window=32, stride=32, scale=0.25, backend="blockwise")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_blockwise_keeps_no_quadratic_tensors():
    """Saved-for-backward memory grows with T, not T^2: the point of the backend."""

    def saved_bytes(T):
        q, k, v = qkv(1, 1, T, 8)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attend(q, k, v, kind="local", window=16, stride=0, scale=1.0, backend="blockwise")
        return total

    assert saved_bytes(4096) <= 2.2 * saved_bytes(2048)


def test_dropout_uses_masked_fallback():
    q, k, v = qkv(1, 1, 64, 8)
    torch.manual_seed(0)
    out = attend(
        q, k, v, kind="local", window=8, stride=0, scale=1.0, dropout_p=0.5, backend="blockwise"
    )
    ref = dense_attention(q, k, v, "local", 8, 0, 1.0)
    assert out.shape == ref.shape and not torch.allclose(out, ref)


def test_auto_backend_selection():
    assert resolve_backend("auto", torch.device("cpu")) == "blockwise"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "flex"
    assert resolve_backend("auto", torch.device("meta")) == "blockwise"
    assert resolve_backend("dense", torch.device("cuda", 0)) == "dense"
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("triton", torch.device("cpu"))


def test_auto_backend_on_npu(monkeypatch):
    class FakeNpuDevice:
        type = "npu"

    assert resolve_backend("auto", FakeNpuDevice()) == "npu"


def test_npu_backend_without_torch_npu_says_how_to_install():
    q, k, v = qkv(1, 1, 8, 4)
    with pytest.raises(RuntimeError, match=r"neotrain\[npu\]"):
        attend(q, k, v, kind="local", window=4, stride=0, scale=1.0, backend="npu")


def documented_fusion_attention(calls):
    """torch_npu.npu_fusion_attention as Ascend documents it, for the calls npu_attention makes
    (dense, on CPU; no Ascend device here): True in atten_mask = masked; sparse_mode 0 an
    explicit mask, 2 causal, 3 causal per sequence (equal query and key lengths), 4 a band of
    pre_tockens before and next_tockens after; layout BNSD, or TND (tokens, heads, dim) with
    actual_seq_qlen/kvlen the cumulative sequence ends."""

    def attention(q, k, v, allowed, scale):  # (..., S, D), (S, S)
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.float()

    def pattern(n, atten_mask, sparse_mode, pre_tockens, next_tockens):
        distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        if sparse_mode == 0:
            return ~atten_mask
        if sparse_mode in (2, 3):
            return distance >= 0
        assert sparse_mode == 4
        return (distance <= pre_tockens) & (-distance <= next_tockens)

    def kernel(
        q,
        k,
        v,
        head_num,
        input_layout,
        *,
        atten_mask=None,
        scale=1.0,
        keep_prob=1.0,
        pre_tockens=2**31 - 1,
        next_tockens=2**31 - 1,
        actual_seq_qlen=None,
        actual_seq_kvlen=None,
        sparse_mode=0,
    ):
        calls.append((input_layout, sparse_mode))
        assert keep_prob == 1.0 and head_num == q.shape[1]  # N is dim 1 of BNSD and TND
        if input_layout == "BNSD":
            allowed = pattern(q.shape[2], atten_mask, sparse_mode, pre_tockens, next_tockens)
            return (attention(q, k, v, allowed, scale).to(q.dtype),)
        assert input_layout == "TND" and actual_seq_qlen == actual_seq_kvlen
        assert all(isinstance(end, int) for end in actual_seq_qlen)
        assert actual_seq_qlen[-1] == q.shape[0] and sparse_mode in (3, 4)
        out, start = [], 0
        for end in actual_seq_qlen:
            part = [x[start:end].transpose(0, 1) for x in (q, k, v)]  # (N, S, D)
            allowed = pattern(end - start, None, sparse_mode, pre_tockens, next_tockens)
            out.append(attention(*part, allowed, scale).transpose(0, 1))
            start = end
        return (torch.cat(out).to(q.dtype),)

    return kernel


def test_document_ends_split_rows_into_runs():
    documents = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0], [0, 1, 2, -1, -1, -1]])
    assert document_ends(documents) == [2, 5, 6, 12, 13, 14, 15, 18]


@pytest.mark.parametrize("kind", ["global", "local", "strided"])
def test_npu_backend_calls_the_kernel_as_documented(kind, monkeypatch):
    """Packed rows through npu_fusion_attention's variable-length layout (global, local) or an
    explicit mask (strided), and unpacked rows through its causal and band modes, equal the
    dense reference, given the kernel as Ascend documents it (above): what this checks is our
    side of the call (layouts, lengths, modes), not the kernel, which cannot run here."""
    calls = []
    fake = types.ModuleType("torch_npu")
    fake.npu_fusion_attention = documented_fusion_attention(calls)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    B, H, T, D = 3, 2, 40, 16
    q, k, v = (x.detach() for x in qkv(B, H, T, D))
    documents = torch.tensor(
        [[0] * 5 + [1] * 20 + [2] * 12 + [-1] * 3, [0] * 40, [0] * 30 + [-1] * 10]
    )
    common = dict(kind=kind, window=8, stride=4, scale=D**-0.5)
    for docs in (documents, None):
        out = attend(q, k, v, backend="npu", documents=docs, **common)
        expected = dense_attention(q, k, v, kind, 8, 4, D**-0.5, documents=docs)
        torch.testing.assert_close(out, expected)
    modes = {"global": 3, "local": 4, "strided": 0}
    packed = ("TND", modes[kind]) if kind != "strided" else ("BNSD", 0)
    assert calls == [packed, ("BNSD", {"global": 2, "local": 4, "strided": 0}[kind])]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "strided"])
def test_flex_forward_matches_dense_on_cpu(kind):
    """flex_attention's forward runs on CPU under torch.compile (its backward does not)."""
    q, k, v = (x.detach() for x in qkv(1, 2, 300, 16))
    out = attend(q, k, v, kind=kind, window=64, stride=32, scale=1.0, backend="flex")
    torch.testing.assert_close(out, dense_attention(q, k, v, kind, 64, 32, 1.0))
