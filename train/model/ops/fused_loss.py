"""The loss head without materialised logits: chunked linear cross-entropy whose gradients are
made in the forward pass, a few rows at a time (train/model/gpt.py's LMHead calls it)."""

from __future__ import annotations

import torch

# Logits per chunk of chunked_cross_entropy: 64 MB in fp32, 320 rows at GPT-2's vocabulary.
# Each chunk adds its part of grad_w (vocab x hidden) in one more pass over it, so small chunks
# cost memory traffic: for 2,048 tokens of a 384-wide model, 83-row chunks (4M elements) made
# 25 passes over grad_w's 77 MB: the small bench shape's forward + backward took 3.71 s
# against 3.00 with these (2 threads, AMD EPYC; README, Performance). Chunking still keeps
# the peak far below whole logits (a 6 x 384 model's step at 8 x 256 tokens: 1.9 GB whole,
# 0.9 GB in chunks). The chunks share buffers made once per call (two, or one in fp32 on a
# CPU): with one allocation per chunk, chunks over glibc's largest mmap threshold (32 MB) were
# mapped and faulted in afresh each time (217,000 page faults a call).
CHUNK_ELEMENTS = 1 << 24


def chunked_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_grad: bool
):
    """Summed cross entropy of h @ weight.T against targets (-100 ignored), a few rows at a
    time; with_grad also returns the gradients of the sum w.r.t. h and weight, made from each
    chunk's softmax minus one-hot while its logits exist.

    Logits and softmax are fp32 whatever the input dtype; the matmuls run in the input dtype
    (on CPU bf16 matmuls are the fast ones) and so does the sum of grad_w over chunks, as in
    one unchunked bf16 matmul's output (an fp32 sum costs an extra pass over the vocab x
    hidden weight per chunk: 15% of a 6 x 384 model's bf16 step).

    fp32 on a CPU takes `_vocab_major`: the same sums with each chunk's logits laid out
    vocab x rows, the layout in which the CPU's fp32 GEMM makes them fast."""
    if h.dtype == torch.float32 and h.device.type == "cpu":
        return _vocab_major(h, weight, targets, with_grad)
    return _row_major(h, weight, targets, with_grad)


def _outputs(h, weight, targets, with_grad):
    """(valid targets, whether any is ignored, the loss accumulator, grad_h, grad_w)."""
    valid = targets != -100
    any_ignored = bool((~valid).any())  # one host sync, not one per chunk
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = (torch.empty_like if len(h) else torch.zeros_like)(weight) if with_grad else None
    return valid, any_ignored, total, grad_h, grad_w


def _chunk_rows(tokens: int, vocab: int) -> int:
    """Rows per chunk: CHUNK_ELEMENTS logits, rounded down to a multiple of 64 (on 2 AVX-512
    cores the fp32 vocab x rows GEMM runs 115 GFLOP/s at 333 rows, 170-190 at multiples of
    16; the bf16 head's forward and backward take 0.94-0.96 s at 320 rows, 0.97-1.07 at 333)."""
    rows = CHUNK_ELEMENTS // vocab
    return max(1, min(tokens, rows - rows % 64 if rows >= 64 else rows))


def _row_major(h, weight, targets, with_grad):
    """Each chunk's logits rows x vocab, in the input dtype, then in fp32 (the same buffer
    where that is the input dtype) for the softmax and gradient, made in place: the buffers
    are allocated once per call and no chunk allocates (log_softmax(dtype=float32) made a
    fresh fp32 copy of every bf16 chunk: 0.11 of the bf16 head's 1.0 s at the bench shape)."""
    valid, any_ignored, total, grad_h, grad_w = _outputs(h, weight, targets, with_grad)
    rows = _chunk_rows(len(h), weight.shape[0])
    logits = h.new_empty((rows, weight.shape[0]))
    fp32 = (
        logits
        if logits.dtype == torch.float32
        else logits.new_empty(logits.shape, dtype=torch.float32)
    )
    for start in range(0, h.shape[0], rows):
        end = start + rows
        hc, keep, safe = h[start:end], valid[start:end], targets[start:end].clamp(min=0)
        n = len(hc)
        torch.mm(hc, weight.T, out=logits[:n])
        z = fp32[:n] if fp32 is logits else fp32[:n].copy_(logits[:n])
        total += _softmax_(z, 1, safe, keep, with_grad)
        if with_grad:
            z[torch.arange(n, device=h.device), safe] -= 1.0
            if any_ignored:
                z.mul_(keep[:, None])
            grad = z if z.dtype == h.dtype else logits[:n].copy_(z)
            torch.mm(grad, weight, out=grad_h[start:end])
            if start == 0:
                torch.mm(grad.T, hc, out=grad_w)  # no pass to zero it first
            else:
                grad_w.addmm_(grad.T, hc)
    return total, valid.sum(), grad_h, grad_w


def _vocab_major(h, weight, targets, with_grad):
    """The fp32 form, each chunk's logits vocab x rows (weight @ h_chunk.T): MKL's fp32 GEMM
    makes rows x vocab logits at 117-135 GFLOP/s on 2 AVX-512 cores and vocab x rows ones at
    170-190 when rows is a multiple of 16 (115 at 333 rows), like the two other matmuls of
    the head in either layout (bench/quality.py's shape, 2,048 x 384 x 50,257: the head's
    forward and backward 1.5-1.6 s against 1.7-1.9). The softmax then runs down the columns,
    in place in the one buffer."""
    valid, any_ignored, total, grad_h, grad_w = _outputs(h, weight, targets, with_grad)
    vocab = weight.shape[0]
    rows = _chunk_rows(len(h), vocab)
    buffer = h.new_empty(vocab * rows)
    for start in range(0, h.shape[0], rows):
        end = start + rows
        hc, keep, safe = h[start:end], valid[start:end], targets[start:end].clamp(min=0)
        n = len(hc)
        z = buffer[: vocab * n].view(vocab, n)  # contiguous for the last, shorter chunk too
        torch.mm(weight, hc.T, out=z)
        total += _softmax_(z, 0, safe, keep, with_grad)
        if with_grad:
            z[safe, torch.arange(n, device=h.device)] -= 1.0
            if any_ignored:
                z.mul_(keep)
            torch.mm(z.T, weight, out=grad_h[start:end])
            if start == 0:
                torch.mm(z, hc, out=grad_w)
            else:
                grad_w.addmm_(z, hc)
    return total, valid.sum(), grad_h, grad_w


def _softmax_(z, dim, targets, keep, normalize):
    """The summed cross entropy of fp32 logits `z` (classes along `dim`) against `targets`
    where `keep`, as log_softmax would make it (max, then logsumexp); `z` becomes exp(z - max)
    in place, and with `normalize` the softmax."""
    target_logits = z.gather(dim, targets.unsqueeze(dim)).squeeze(dim)
    top = z.amax(dim, keepdim=True)
    z.sub_(top).exp_()
    sums = z.sum(dim, keepdim=True)
    losses = (top + sums.log()).squeeze(dim) - target_logits
    if normalize:
        z.div_(sums)
    return (losses * keep).sum()


class LinearCrossEntropy(torch.autograd.Function):
    """(summed cross_entropy(h @ W.T, targets), count of targets) whose gradients are made in
    the forward pass, chunk by chunk (chunked_cross_entropy): the same matmuls as lm_head +
    cross_entropy, but the fp32 logits, their log-softmax and its gradient (each tokens x
    vocab) never exist whole."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        total, count, grad_h, grad_w = chunked_cross_entropy(h, weight, targets, with_grad=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    def backward(ctx, grad_total, grad_count):
        # Scaled in place: the gradients are made for this one backward, and a fresh copy of
        # grad_w (vocab x hidden) is a fresh mapping of that many pages every step.
        grad_h, grad_w = ctx.saved_tensors
        return grad_h.mul_(grad_total), grad_w.mul_(grad_total), None
