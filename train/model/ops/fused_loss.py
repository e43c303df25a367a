"""The loss head without materialised logits: chunked linear cross-entropy whose gradients are
made in the forward pass, a few rows at a time (train/model/gpt.py's LMHead calls it)."""

from __future__ import annotations

import torch

# Logits per chunk of chunked_cross_entropy: 16 MB in fp32. Peak memory of a training step of
# a 6 x 384 model at 8 x 256 tokens fell from 1.9 GB to 0.9 GB with chunks. They stay under
# glibc's largest mmap threshold (32 MB), so after the first step they come from the heap:
# 64 MB chunks were mapped afresh each time, 100K page faults and 0.2 s of system time per step
# of the tiny model (a fifth of its CPU time), 17K and 0.04 s with these.
CHUNK_ELEMENTS = 1 << 22


def chunked_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_grad: bool
):
    """Summed cross entropy of h @ weight.T against targets (-100 ignored), a few rows at a
    time; with_grad also returns the gradients of the sum w.r.t. h and weight, made from each
    chunk's softmax minus one-hot while its logits exist.

    Logits and softmax are fp32 whatever the input dtype; the matmuls run in the input dtype
    (on CPU bf16 matmuls are the fast ones) and so does the sum of grad_w over chunks, as in
    one unchunked bf16 matmul's output (an fp32 sum costs an extra pass over the vocab x
    hidden weight per chunk: 15% of a 6 x 384 model's bf16 step)."""
    valid = targets != -100
    any_ignored = bool((~valid).any())  # one host sync, not one per chunk
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = (torch.empty_like if len(h) else torch.zeros_like)(weight) if with_grad else None
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    for start in range(0, h.shape[0], rows):
        end = start + rows
        hc, keep, safe = h[start:end], valid[start:end], targets[start:end].clamp(min=0)
        logp = torch.log_softmax((hc @ weight.T).float(), dim=-1)
        total -= (logp.gather(1, safe[:, None]).squeeze(1) * keep).sum()
        if with_grad:
            grad = logp.exp_()  # the softmax, in place of the log-probabilities
            grad[torch.arange(len(safe), device=h.device), safe] -= 1.0
            if any_ignored:
                grad.mul_(keep[:, None])
            grad = grad.to(h.dtype)
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
