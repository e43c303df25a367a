"""The GPT-Neo / GPT-3 decoder: token ids in, logits out.

The computation is Hugging Face's GPTNeoForCausalLM exactly (learned positions, pre-LayerNorm,
gelu_new MLP, q/k/v without bias, lm_head tied to the token embedding) and the parameter names
are its state-dict keys, so weights move between the two without renaming. Attention per layer
is `global`, `local` or `strided` (train/model/attention.py).

Decoding keeps keys and values in a KVCache (below): `GPT.prefill` runs the prompts through the
training attention backends and fills it, `GPT.decode` appends one token per row.

This file imports torch, the attention kinds and its config only: no deepspeed, no
torch.distributed, no file I/O (train/checkpoints/load.py reads checkpoints into it).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from train.config import ModelConfig, TaskHead
from train.model.attention import attend, visible
from train.model.ops.fused_loss import LinearCrossEntropy, chunked_cross_entropy

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

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab_size) logits; with (B, T) targets, the mean
        next-token loss instead (computed without materialising the logits). Packed rows
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


class TaskGPT(GPT):
    """GPT with GPT-1's task head (Radford et al. 2018): `score`, a linear map without bias (as
    in GPTNeoForSequenceClassification) from the final hidden state at each sequence's classify
    token to the classes (multiple choice: to one score per choice).

    Inputs are (B, K, T): K sequences per example (1; 2 for similarity's two orders, whose
    states are added; one per choice). The loss is the task's cross entropy plus lm_coef times
    the next-token loss on the sequences (GPT-1's auxiliary objective)."""

    def __init__(self, config: ModelConfig, head: TaskHead, lm_coef: float = 0.5):
        super().__init__(config)
        self.head, self.lm_coef = head, lm_coef
        self.score = nn.Linear(config.hidden_size, head.num_outputs, bias=False)

    def classify(
        self, input_ids: torch.Tensor, classify_at: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, T) ids, (B, K) classify positions -> (B, classes or K) logits, and the
        (B * K, T, hidden) final states."""
        b, k, t = input_ids.shape
        h = self.hidden_states(input_ids.reshape(b * k, t))
        rows = torch.arange(b * k, device=h.device)
        pooled = h[rows, classify_at.reshape(-1)].reshape(b, k, -1)
        if self.head.type == "multiple_choice":
            return self.score(pooled).squeeze(-1), h
        return self.score(pooled.sum(1)), h  # similarity: the two orders added

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        classify_at: torch.Tensor,
        lm_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean task loss over the examples whose target is not -100, plus lm_coef times
        the mean next-token loss over `lm_targets`."""
        logits, h = self.classify(input_ids, classify_at)
        loss = F.cross_entropy(logits.float(), targets, ignore_index=-100)
        if self.lm_coef and lm_targets is not None:
            loss = loss + self.lm_coef * self.lm_head(h, lm_targets.reshape(h.shape[:2]))
        return loss


class KVCache:
    """Keys and values of every layer for rows decoded together.

    Rows are independent: row b holds `positions[b]` tokens at sequence indices
    0 .. positions[b] - 1, so prompts of different lengths need no padding mask. A layer keeps
    its keys in `slots` places, the key of index p in slot p % slots:

        global, strided   slots = capacity: every index the rows will reach (a strided query
                          sees keys at every multiple of the stride back to the start)
        local             slots = min(window, capacity): a ring. Writing index p overwrites
                          index p - window, the first key the query at p cannot see, so the
                          memory does not grow with the generated length and a decoding step
                          reads `window` keys.

    `index[slots]` (B, slots) holds the sequence index stored in each slot (-1: empty); which
    slots a query may read comes from `visible`, attention's one mask definition.
    """

    def __init__(self, config: ModelConfig, lengths: torch.Tensor, capacity: int):
        config.check_sequence_length(capacity)
        if int(lengths.min()) < 1 or int(lengths.max()) > capacity:
            raise ValueError(f"prompt lengths must be within 1..{capacity}")
        self.capacity = capacity
        self.positions = lengths.clone()  # the next index of each row
        self.rows = torch.arange(len(lengths), device=lengths.device)
        self.last_index = int(lengths.max()) - 1  # the largest index any row holds
        self.shortest = int(lengths.min())  # the fewest tokens any row holds
        self.decoding = False
        self.layers = [
            LayerCache(self, kind, config.window_size, config.sparse_stride, capacity)
            for kind in config.layer_kinds()
        ]
        self.index: dict[int, torch.Tensor] = {}
        self._masks: dict[tuple[str, int], torch.Tensor] = {}

    def fill_index(self, slots: int) -> torch.Tensor:
        """(B, slots): after the prompt, the index in each slot: the largest p < length with
        p % slots == slot, or -1."""
        if slots not in self.index:
            last = (self.positions - 1)[:, None]
            slot = torch.arange(slots, device=last.device)[None, :]
            index = last - (last - slot) % slots
            self.index[slots] = torch.where(index >= 0, index, -1)
        return self.index[slots]

    def start_decoding(self) -> None:
        self.decoding = True

    def begin_step(self) -> None:
        if self.last_index + 1 >= self.capacity:
            raise ValueError(f"the cache holds {self.capacity} tokens per row and is full")
        self.last_index += 1
        self.shortest += 1
        self._masks.clear()
        self.write_slot = {}
        for slots, index in self.index.items():
            self.write_slot[slots] = slot = self.positions % slots
            index[self.rows, slot] = self.positions

    def end_step(self) -> None:
        self.positions += 1

    def used(self, slots: int) -> int:
        """Slots that can hold a key so far (all of a ring; the start of the others)."""
        return min(slots, self.last_index + 1)

    def mask(self, kind: str, slots: int, window: int, stride: int) -> torch.Tensor | None:
        """(B, 1, 1, used) True where this step's query may read the slot; None when it may
        read them all: a global or local layer whose slots are all filled in every row (what
        a slot holds is then, by construction, a key its pattern lets the query see)."""
        if kind != "strided" and self.shortest >= self.used(slots):
            return None
        key = (kind, slots)
        if key not in self._masks:
            index = self.index[slots][:, : self.used(slots)]
            allowed = visible(kind, self.positions[:, None], index, window, stride) & (index >= 0)
            self._masks[key] = allowed[:, None, None, :]
        return self._masks[key]

    def reorder(self, order: torch.Tensor) -> None:
        """Keep rows `order` (beam search): row i becomes the old row order[i]."""
        self.positions = self.positions.index_select(0, order)
        self.rows = torch.arange(len(order), device=order.device)
        self.last_index = int(self.positions.max()) - 1
        self.shortest = int(self.positions.min())
        self.index = {s: index.index_select(0, order) for s, index in self.index.items()}
        for layer in self.layers:
            layer.k = layer.k.index_select(0, order)
            layer.v = layer.v.index_select(0, order)

    def nbytes(self, kind: str) -> int:
        """Bytes of keys and values held for the layers of one kind."""
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers if layer.kind == kind)


class LayerCache:
    """One layer's keys and values (B, H, slots, D); the slot bookkeeping is the KVCache's."""

    def __init__(self, cache: KVCache, kind: str, window: int, stride: int, capacity: int):
        self.cache = cache
        self.kind, self.window, self.stride = kind, window, stride
        self.slots = min(window, capacity) if kind == "local" else capacity
        self.k = self.v = None

    @property
    def decoding(self) -> bool:
        return self.cache.decoding

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the prompt's keys and values (B, H, T, D), each row's up to its length."""
        B, H, _, D = k.shape
        index = self.cache.fill_index(self.slots)
        gather = index.clamp(min=0)[:, None, :, None].expand(B, H, self.slots, D)
        self.k = k.gather(2, gather)
        self.v = v.gather(2, gather)

    def attend_step(self, q, k, v, scale: float) -> torch.Tensor:
        """One new token per row: store its key and value, attend over the visible slots."""
        cache = self.cache
        slot = cache.write_slot[self.slots]
        self.k[cache.rows, :, slot] = k[:, :, 0]
        self.v[cache.rows, :, slot] = v[:, :, 0]
        n = cache.used(self.slots)
        mask = cache.mask(self.kind, self.slots, self.window, self.stride)
        return F.scaled_dot_product_attention(
            q, self.k[:, :, :n], self.v[:, :, :n], attn_mask=mask, scale=scale
        )


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of logits (B, T, V) against targets (B, T), in fp32; targets equal to
    -100 are ignored (Hugging Face's convention)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
