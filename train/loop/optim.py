"""The optimizer, its parameter groups and the learning-rate schedule (GPT-3's recipe: AdamW,
no weight decay on biases, norms and embeddings; linear warmup, then cosine to 10%). The
engine (train/loop/engine.py) hands them to DeepSpeed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from train.config.run import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices of Linear layers only: not on biases, LayerNorm weights or
    embeddings (wte, wpe; lm_head is wte)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            is_matrix = isinstance(module, nn.Linear) and name == "weight"
            (decay if is_matrix else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass(frozen=True)
class Schedule:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr_ratio * optim.lr, by steps
    or by tokens (optim.unit). Its length is optim.decay, or the whole run."""

    optim: OptimConfig
    total_steps: int
    tokens_per_step: int

    def lr(self, step: int, tokens: int) -> float:
        o = self.optim
        by_tokens = o.unit == "tokens"
        t = tokens if by_tokens else step
        total = o.decay or self.total_steps * (self.tokens_per_step if by_tokens else 1)
        if o.warmup and t < o.warmup:
            return o.lr * (t + 1) / o.warmup
        progress = min(1.0, (t - o.warmup) / max(1, total - o.warmup))
        decay = (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return o.lr * (o.min_lr_ratio + decay)


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that clips gradients itself and skips a step whose gradient norm is not finite,
    saying so through `overflow`, the attribute DeepSpeed reads to count skipped steps.

    Used where DeepSpeed's engine would hand the step straight to the optimizer (ZeRO-0 in
    fp32): DeepSpeed's ZeRO and bf16/fp16 optimizers clip and check gradients themselves."""

    def __init__(self, params, max_grad_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self.last_grad_norm = math.nan

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        self.last_grad_norm = float(norm)
        self.overflow = not math.isfinite(self.last_grad_norm)
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)
