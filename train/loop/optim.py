"""The optimizer, its parameter groups and the learning-rate schedule (GPT-3's recipe: AdamW,
no weight decay on biases, norms and embeddings; linear warmup, then cosine to 10%). The
engine (train/loop/engine.py) hands them to DeepSpeed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.adamw import adamw

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
    """Linear warmup to optim.lr, then decay to optim.min_lr_ratio * optim.lr, by steps or by
    tokens (optim.unit): cosine, or warmup-stable-decay (optim.schedule=wsd: the peak held
    until the last optim.cooldown of the schedule, then a linear decay). Its length is
    optim.decay, or the whole run."""

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
        if o.schedule == "wsd":
            # The cooldown takes the last fraction of the whole schedule, warmup included.
            length = max(1.0, o.cooldown * total)
            progress = min(1.0, max(0.0, (t - (total - length)) / length))
            return o.lr * (1 - (1 - o.min_lr_ratio) * progress)
        progress = min(1.0, (t - o.warmup) / max(1, total - o.warmup))
        decay = (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return o.lr * (o.min_lr_ratio + decay)


def clip_or_skip(optimizer, max_grad_norm: float) -> bool:
    """Clip the gradients of `optimizer`'s parameters to max_grad_norm (if > 0), record their
    norm, and say whether the step may go on: False, with the gradients dropped, when the norm
    is not finite. Sets `overflow`, the attribute DeepSpeed reads to count skipped steps."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    optimizer.last_grad_norm = float(norm)
    optimizer.overflow = not math.isfinite(optimizer.last_grad_norm)
    if optimizer.overflow:
        optimizer.zero_grad(set_to_none=True)
    return not optimizer.overflow


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that clips gradients itself and skips a step whose gradient norm is not finite
    (`clip_or_skip`).

    Used where DeepSpeed's engine would hand the step straight to the optimizer (ZeRO-0 in
    fp32): DeepSpeed's ZeRO and bf16/fp16 optimizers clip and check gradients themselves."""

    def __init__(self, params, max_grad_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self.last_grad_norm = math.nan

    @torch.no_grad()
    def step(self, closure=None):
        if not clip_or_skip(self, self.max_grad_norm):
            return None
        return super().step(closure)


# torch.optim.Muon's quintic Newton-Schulz coefficients and step count (Keller Jordan's).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, dtype: torch.dtype, method: str = "standard") -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz orthogonalization computed in `dtype` (torch fixes
    bfloat16, which a CPU without native bf16 emulates: ~6x slower than fp32 for a 384 x 1536
    matrix, more than the training step's own matmuls).

    method "standard" is torch's, operation for operation. "gram" (DeepSpeed's Muon default,
    after Tri Dao's Gram Newton-Schulz) is the same iteration rewritten for a wide matrix X
    (m x n, m < n): each step multiplies X on the left by a polynomial of X X^T, so it runs the
    five steps on m x m matrices and touches X twice (X X^T, then Q X) instead of twice a step.
    For 384 x 1536 that is 2.8 GFLOP instead of 5.1; matrices less than twice as wide as tall
    take the standard form, where it is cheaper."""
    x = g.to(dtype, copy=True)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=1e-7))
    gram = method == "gram" and x.size(1) >= 2 * x.size(0)
    x = _gram_newton_schulz(x) if gram else _newton_schulz(x)
    return x.T if tall else x


def _newton_schulz(x: torch.Tensor) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    for _ in range(NS_STEPS):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    return x


def _gram_newton_schulz(x: torch.Tensor) -> torch.Tensor:
    """X_(k+1) = (aI + bR + cR^2) X_k with R = X_k X_k^T, kept as X_k = Q X_0: Q and R are
    polynomials of X_0 X_0^T, so they commute and R_(k+1) = U R U for the step's U. No restart
    (DeepSpeed's, at step 2, keeps fp16 in range): this runs in fp32 or bf16 on matrices the
    normalisation has brought under 1."""
    a, b, c = NS_COEFFICIENTS
    r, q = x @ x.T, None
    for step in range(NS_STEPS):
        u = torch.addmm(r, r, r, beta=b, alpha=c)
        u.diagonal().add_(a)
        q = u if q is None else u @ q
        if step < NS_STEPS - 1:
            r = u @ r @ u
    return q @ x


def muon_parameter_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Muon for the 2-D weights of the Linear layers in the transformer blocks (attention and
    MLP); AdamW for the rest (embeddings, positions, LayerNorms, biases, task heads), with
    `parameter_groups`' weight decay rule. Each group's `lr_scale` is its peak learning rate
    over optim.lr (the schedule sets lr * lr_scale). Muon's weight decay is scaled so that its
    matrices shrink by lr * weight_decay a step, as AdamW's do."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    matrices = {
        id(m.weight)
        for m in (blocks.modules() if blocks is not None else ())
        if isinstance(m, nn.Linear) and m.weight.requires_grad
    }
    groups = parameter_groups(model, optim.weight_decay)
    decay = groups[0]["params"]
    muon = [p for p in decay if id(p) in matrices]
    groups[0]["params"] = [p for p in decay if id(p) not in matrices]
    scale = optim.muon_lr / optim.lr
    muon_group = {
        "params": muon,
        "muon": True,
        "lr_scale": scale,
        "weight_decay": optim.weight_decay / scale,
        "momentum": optim.momentum,
    }
    return [muon_group, *(g for g in groups if g["params"])]


class MuonAdamW(torch.optim.Optimizer):
    """Muon (Nesterov momentum, Newton-Schulz orthogonalized update, torch.optim.Muon's
    "original" shape scaling sqrt(max(1, rows / cols))) on the groups marked `muon`, AdamW
    (torch's functional AdamW) on the others, in one optimizer with one state dict; it clips
    and skips non-finite steps as SkippingAdamW does. `ns_method` and `ns_dtype`: how the
    orthogonalization computes, and in what (`orthogonalize`; "standard" is torch.optim.Muon's,
    in bf16 unless `ns_dtype` says otherwise, "gram" the Gram form, in fp32 unless said: as
    DeepSpeed's Muon computes them on a CPU). `fused`: AdamW's one-pass kernel (torch's
    `fused=True`) instead of its multi-tensor one."""

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        max_grad_norm: float = 0.0,
        ns_method: str = "gram",
        ns_dtype: torch.dtype | None = None,
        fused: bool = False,
    ):
        for group in groups:
            if group.get("muon") and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon's parameter groups hold matrices only")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, muon=False, lr_scale=1.0)
        super().__init__(groups, defaults | dict(momentum=0.95))
        self.max_grad_norm = max_grad_norm
        if ns_dtype is None:
            ns_dtype = torch.bfloat16 if ns_method == "standard" else torch.float32
        self.ns_dtype = ns_dtype
        self.ns_method = ns_method
        self.fused = fused
        self.overflow = False
        self.last_grad_norm = math.nan

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not clip_or_skip(self, self.max_grad_norm):
            return loss
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon(group, params)
            else:
                self._adamw(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = orthogonalize(p.grad.lerp(buf, momentum), self.ns_dtype, self.ns_method)
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            if not self.state[p]:
                self.state[p].update(
                    step=torch.tensor(0.0),
                    exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                )
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=not self.fused,
            fused=self.fused,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
