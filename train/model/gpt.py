"""The GPT-Neo / GPT-3 decoder: token ids in, logits out.

The computation is Hugging Face's GPTNeoForCausalLM exactly (learned positions, pre-LayerNorm,
gelu_new MLP, q/k/v without bias, lm_head tied to the token embedding) and the parameter names
are its state-dict keys, so weights move between the two without renaming. Attention per layer
is `global`, `local` or `strided` (train/model/attention.py).

Given targets it returns the loss as a sum over the targets and their count (`LossSum`): sums
add up over micro-batches, ranks and validation batches, and are divided once, where the total
is known. Decoding keeps keys and values in a KVCache (train/model/kv_cache.py): `GPT.prefill`
runs the prompts through the training attention backends and fills it, `GPT.decode` appends one
token per row.

This file imports torch, the attention kinds and its config only: no deepspeed, no
torch.distributed, no file I/O (train/checkpoints/load.py reads checkpoints into it).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from train.config.model import ModelConfig
from train.model.attention import attend
from train.model.kv_cache import KVCache, LayerCache
from train.model.ops.fused_loss import LinearCrossEntropy, chunked_cross_entropy

TIED = "lm_head.weight"  # the output projection: the token embedding itself (not saved)

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

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, H, T, D), kept as a view of (B, T, H, D) memory.
        q, k, v = (
            proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if cache is not None and cache.decoding:
            y = cache.attend_step(q, k, v, self.scale)
        else:
            y = self._attend(q, k, v, documents)
            if cache is not None:
                cache.fill(k, v)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.out_proj(y))

    def _attend(self, q, k, v, documents=None):
        return attend(
            q,
            k,
            v,
            kind=self.kind,
            window=self.window,
            stride=self.stride,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
            documents=documents,
        )


class Attention(nn.Module):
    """Holds SelfAttention as `.attention` only so that names read `attn.attention.q_proj`,
    as in Hugging Face's state dict."""

    def __init__(self, config: ModelConfig, kind: str):
        super().__init__()
        self.attention = SelfAttention(config, kind)

    def forward(self, x, cache=None, documents=None) -> torch.Tensor:
        return self.attention(x, cache, documents)


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

    def forward(self, x, cache=None, documents=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, documents)
        return x + self.mlp(self.ln_2(x))


class LossSum(NamedTuple):
    """A loss as the sum of its terms and how many there are: sums add up over micro-batches,
    ranks and batches; the one division happens where the whole count is known."""

    total: torch.Tensor  # fp32 scalar: the summed loss
    count: torch.Tensor  # integer scalar: the targets (or examples) it sums over

    def mean(self) -> torch.Tensor:
        """The loss of this batch alone."""
        return self.total / self.count


class LMHead(nn.Linear):
    """The output projection (tied to wte). Given targets it returns the next-token loss as a
    LossSum instead of logits, without ever holding the (tokens x vocab) logits in memory."""

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | LossSum:
        if targets is None:
            return super().forward(x)
        h, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        if torch.is_grad_enabled() and (h.requires_grad or self.weight.requires_grad):
            total, count = LinearCrossEntropy.apply(h, self.weight, targets)
        else:
            total, count, _, _ = chunked_cross_entropy(h, self.weight, targets, with_grad=False)
        return LossSum(total, count)


class GPT(nn.Module):
    """Construct, then `init_weights()` (construction leaves weights as torch allocates them,
    so a model can be built on the meta device or under deepspeed.zero.Init and filled after)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config  # resolved (checked) by the verb that builds the model
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
        1/sqrt(2 * num_layers), so the residual's variance does not grow with depth, or zero
        (model.residual_init=zero: every block starts as the identity)."""
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
                if self.config.residual_init == "zero":
                    std = 0.0
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

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab_size) logits; with (B, T) targets, the next-token
        loss instead as a LossSum (computed without materialising the logits). Packed rows
        (several examples each) give each token's (B, T) position within its example and its
        example's id in `documents`: attention stays within an example."""
        return self.lm_head(self.hidden_states(input_ids, None, positions, documents), targets)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden_size), the final LayerNorm's output: what lm_head
        reads. Scoring reads it to project only the positions it needs onto the vocabulary.
        With a cache: while it is filling, the tokens are at indices 0..T-1 and their keys and
        values are kept; while decoding, each row's token is at that row's next index."""
        B, T = input_ids.shape
        if cache is not None and cache.decoding:
            pos = cache.positions[:, None]
        else:
            self.config.check_sequence_length(T)
            pos = torch.arange(T, device=input_ids.device) if positions is None else positions
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            if cache is not None:
                x = block(x, cache.layers[i])
            elif self.checkpoint_fn and self.training:
                # Activation checkpointing: keep only block inputs, recompute them in backward.
                run = block if documents is None else functools.partial(block, documents=documents)
                x = self.checkpoint_fn(run, x)
            else:
                x = block(x, documents=documents)
        return self.transformer.ln_f(x)

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, KVCache]:
        """Start decoding: right-padded prompts (B, T), row b's tokens being the first
        lengths[b], -> (B, vocab_size) logits after each row's last token, and the cache, with
        room for `capacity` tokens per row. Padding sits after every real token, so causal
        attention never lets a real token see it: no padding mask is needed."""
        cache = KVCache(self.config, lengths, capacity)
        h = self.hidden_states(input_ids, cache)
        cache.start_decoding()
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        return self.lm_head(last), cache

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append one token to every row: (B,) ids -> (B, vocab_size) logits after it."""
        cache.begin_step()
        h = self.hidden_states(tokens[:, None], cache)
        cache.end_step()
        return self.lm_head(h[:, 0])

    def num_parameters(self) -> int:
        """Distinct parameters (the tied lm_head counted once)."""
        return sum(p.numel() for p in self.parameters())


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of logits (B, T, V) against targets (B, T), in fp32; targets equal to
    -100 are ignored (Hugging Face's convention)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
