"""The loss head without materialised logits: chunked linear cross-entropy whose gradients are
made in the forward pass, a few rows at a time (train/model/gpt.py's LMHead calls it)."""

from __future__ import annotations

import torch

# Logits per chunk of chunked_cross_entropy: 64 MB in fp32, 333 rows at GPT-2's vocabulary.
# Each chunk adds its part of grad_w (vocab x hidden) in one more pass over it, so small chunks
# cost memory traffic: for 2,048 tokens of a 384-wide model, 83-row chunks (4M elements) made
# 25 passes over grad_w's 77 MB: the small bench shape's forward + backward took 3.71 s
# against 3.00 with these (2 threads, AMD EPYC; README, Performance). Chunking still keeps
# the peak far below whole logits (a 6 x 384 model's step at 8 x 256 tokens: 1.9 GB whole,
# 0.9 GB in chunks). The chunks share two buffers made once per call: with one allocation
# per chunk, chunks over glibc's largest mmap threshold (32 MB) were mapped and faulted in
# afresh each time (217,000 page faults a call).
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

    Every chunk is written into the same two buffers (its logits in the input dtype, then its
    fp32 log-probabilities, softmax and gradient in place), allocated once per call: no chunk
    allocates."""
    valid = targets != -100
    any_ignored = bool((~valid).any())  # one host sync, not one per chunk
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = (torch.empty_like if len(h) else torch.zeros_like)(weight) if with_grad else None
    rows = max(1, min(len(h), CHUNK_ELEMENTS // weight.shape[0]))
    logits = h.new_empty((rows, weight.shape[0]))
    logp = torch.empty_like(logits, dtype=torch.float32)
    for start in range(0, h.shape[0], rows):
        end = start + rows
        hc, keep, safe = h[start:end], valid[start:end], targets[start:end].clamp(min=0)
        n = len(hc)
        torch.mm(hc, weight.T, out=logits[:n])
        torch.log_softmax(logits[:n], dim=-1, dtype=torch.float32, out=logp[:n])
        total -= (logp[:n].gather(1, safe[:, None]).squeeze(1) * keep).sum()
        if with_grad:
            grad = logp[:n].exp_()  # the softmax, in place of the log-probabilities
            grad[torch.arange(n, device=h.device), safe] -= 1.0
            if any_ignored:
                grad.mul_(keep[:, None])
            if grad.dtype != h.dtype:
                grad = logits[:n].copy_(grad)
            torch.mm(grad, weight, out=grad_h[start:end])
            if start == 0:
                torch.mm(grad.T, hc, out=grad_w)  # no pass to zero it first
            else:
                grad_w.addmm_(grad.T, hc)
    return total, valid.sum(), grad_h, grad_w


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
