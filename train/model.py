"""The GPT-Neo / GPT-3 decoder: token ids in, logits out.

The computation is Hugging Face's GPTNeoForCausalLM exactly (learned positions, pre-LayerNorm,
gelu_new MLP, q/k/v without bias, lm_head tied to the token embedding) and the parameter names
are its state-dict keys, so weights move between the two without renaming. Attention per layer
is `global`, `local` or `strided` (train/attention.py).

This file imports torch, the attention kinds and its config only: no deepspeed, no
torch.distributed, no file I/O (train/load.py reads checkpoints into it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.attention import attend
from train.config import ModelConfig
from train.ops.fused_loss import LinearCrossEntropy, chunked_cross_entropy

ACTIVATIONS = {
    "gelu_new": lambda: nn.GELU(approximate="tanh"),  # GPT-2's tanh approximation
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.num_heads = config.num_heads
        self.window = config.window_size
        self.stride = config.sparse_stride
        self.scale = config.attention_scale
        self.dropout = config.attention_dropout
        self.backend = config.attention_backend
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=True)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, H, T, D), kept as a view of (B, T, H, D) memory.
        q, k, v = (
            proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = attend(
            q,
            k,
            v,
            kind=self.kind,
            window=self.window,
            stride=self.stride,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.out_proj(y))


class Attention(nn.Module):
    """Holds SelfAttention as `.attention` only so that names read `attn.attention.q_proj`,
    as in Hugging Face's state dict."""

    def __init__(self, config: ModelConfig, kind: str):
        super().__init__()
        self.attention = SelfAttention(config, kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.ffn_size)
        self.act = ACTIVATIONS[config.activation_function]()
        self.c_proj = nn.Linear(config.ffn_size, config.hidden_size)
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, kind: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, kind)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LMHead(nn.Linear):
    """The output projection (tied to wte). Given targets it returns the mean next-token loss
    instead of logits, without ever holding the (tokens x vocab) logits in memory."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        h, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        if torch.is_grad_enabled() and (h.requires_grad or self.weight.requires_grad):
            return LinearCrossEntropy.apply(h, self.weight, targets)
        total, count, _, _ = chunked_cross_entropy(h, self.weight, targets, with_grad=False)
        return total / count


class GPT(nn.Module):
    """Construct, then `init_weights()` (construction leaves weights as torch allocates them,
    so a model can be built on the meta device or under deepspeed.zero.Init and filled after)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.hidden_size),
                wpe=nn.Embedding(config.max_position_embeddings, config.hidden_size),
                drop=nn.Dropout(config.embed_dropout),
                h=nn.ModuleList(Block(config, kind) for kind in config.layer_kinds()),
                ln_f=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # Set from outside (train/engine) to checkpoint each block: fn(block, x) -> block(x).
        self.checkpoint_fn = None

    def tie_weights(self) -> None:
        """The output projection is the token embedding (GPT-Neo ties them)."""
        self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> GPT:
        """normal(0, initializer_range) for weights, zeros for biases, LayerNorm at identity;
        the projections that write into the residual stream (out_proj, c_proj) scaled by
        1/sqrt(2 * num_layers), so the residual's variance does not grow with depth."""
        self.tie_weights()
        for module in self.modules():
            self.init_module(module, generator)
        return self

    @torch.no_grad()
    def init_module(self, module: nn.Module, generator: torch.Generator | None = None) -> None:
        """Initialise the parameters `module` owns directly (modules visited in a fixed order
        draw the same numbers whether or not the model is partitioned)."""
        if module is self.lm_head:
            return  # tied to wte, initialised there
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            if isinstance(module, nn.Linear) and module in self._residual_projections():
                std = std / math.sqrt(2 * self.config.num_layers)
            module.weight.normal_(0.0, std, generator=generator)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()

    def _residual_projections(self) -> set[nn.Module]:
        return {
            m
            for block in self.transformer.h
            for m in (block.attn.attention.out_proj, block.mlp.c_proj)
        }

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab_size) logits; with (B, T) targets, the mean
        next-token loss instead (computed without materialising the logits)."""
        return self.lm_head(self.hidden_states(input_ids), targets)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden_size), the final LayerNorm's output: what lm_head
        reads. Scoring reads it to project only the positions it needs onto the vocabulary."""
        B, T = input_ids.shape
        self.config.check_sequence_length(T)
        pos = torch.arange(T, device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            # Activation checkpointing: keep only block inputs, recompute the rest in backward.
            x = self.checkpoint_fn(block, x) if self.checkpoint_fn and self.training else block(x)
        return self.transformer.ln_f(x)

    def num_parameters(self) -> int:
        """Distinct parameters (the tied lm_head counted once)."""
        return sum(p.numel() for p in self.parameters())


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of logits (B, T, V) against targets (B, T), in fp32; targets equal to
    -100 are ignored (Hugging Face's convention)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
