"""The model's schema: Hugging Face GPTNeoConfig's field names wherever it has the field, plus
strided attention and GPT-3's attention scaling. torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from train.config.rules import Schema, require_positive, require_window
from train.errors import ConfigError

ATTENTION_KINDS = ("global", "local", "strided")
ATTENTION_BACKENDS = ("auto", "dense", "blockwise", "flex", "npu")
ACTIVATIONS = ("gelu_new", "gelu", "relu")
RESIDUAL_INITS = ("scaled", "zero")


@dataclass
class ModelConfig(Schema):
    name: str = "tiny"
    vocab_size: int = 50257
    max_position_embeddings: int = 256
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    # None means 4 * hidden_size, as in GPTNeoConfig.
    intermediate_size: int | None = None
    # GPT-Neo form: [[[kinds...], repeat], ...], expanded in order to one kind per layer.
    attention_types: list[Any] = field(default_factory=lambda: [[["global", "local"], 2]])
    # `local` layers: query i sees keys i - window_size < j <= i (the query itself included).
    window_size: int = 64
    # `strided` layers: a band of sparse_stride keys plus every key a multiple of it away.
    sparse_stride: int = 64
    # GPT-Neo does not scale scores by 1/sqrt(head_dim); GPT-3 does.
    scale_attn_weights: bool = False
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embed_dropout: float = 0.0
    resid_dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    # How a fresh model's residual projections (attention's out_proj, the MLP's c_proj) start:
    # scaled (normal, std initializer_range / sqrt(2 * num_layers), GPT-2's) or zero (each
    # block starts as the identity). Not part of the model: a checkpoint's weights replace it.
    residual_init: str = "scaled"
    # How attention is computed, not what it computes: see train/model/attention.py.
    attention_backend: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0

    def layer_kinds(self) -> list[str]:
        """`attention_types` expanded to one attention kind per layer."""
        return expand_attention_types(self.attention_types)

    def validate(self) -> ModelConfig:
        """Raise ConfigError for the first rule this config breaks; return self otherwise.
        `resolve` runs it once per verb; a checkpoint's config is checked when it is read."""
        for key in ("vocab_size", "max_position_embeddings", "hidden_size", "num_layers"):
            require_positive(f"model.{key}", getattr(self, key))
        require_positive("model.num_heads", self.num_heads)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} does not divide "
                f"model.hidden_size={self.hidden_size}"
            )
        if self.intermediate_size is not None:
            require_positive("model.intermediate_size", self.intermediate_size)
        kinds = self.layer_kinds()
        if len(kinds) != self.num_layers:
            raise ConfigError(
                f"model.attention_types={self.attention_types} expands to {len(kinds)} layers, "
                f"but model.num_layers={self.num_layers}"
            )
        if "local" in kinds:
            require_window("model.window_size", self.window_size, self.max_position_embeddings)
        if "strided" in kinds:
            require_window("model.sparse_stride", self.sparse_stride, self.max_position_embeddings)
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"model.activation_function={self.activation_function!r} is not one of "
                f"{', '.join(ACTIVATIONS)}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"model.attention_backend={self.attention_backend!r} is not one of "
                f"{', '.join(ATTENTION_BACKENDS)}"
            )
        if self.residual_init not in RESIDUAL_INITS:
            raise ConfigError(
                f"model.residual_init={self.residual_init!r} is not one of "
                f"{', '.join(RESIDUAL_INITS)}"
            )
        for key in ("embed_dropout", "resid_dropout", "attention_dropout"):
            p = getattr(self, key)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"model.{key}={p} must be in [0, 1)")
        return self

    def check_sequence_length(self, seq_len: int) -> None:
        if seq_len > self.max_position_embeddings:
            raise ConfigError(
                f"sequence length {seq_len} is longer than "
                f"model.max_position_embeddings={self.max_position_embeddings}"
            )


def expand_attention_types(attention_types: Any) -> list[str]:
    """[[["global", "local"], 12]] -> ["global", "local", ...] (24 kinds), checking every entry."""
    kinds: list[str] = []
    if not isinstance(attention_types, list | tuple) or not attention_types:
        raise ConfigError(
            f"model.attention_types={attention_types!r} must be a list like "
            '[[["global", "local"], 12]]'
        )
    for i, entry in enumerate(attention_types):
        if (
            not isinstance(entry, list | tuple)
            or len(entry) != 2
            or not isinstance(entry[0], list | tuple)
            or not isinstance(entry[1], int)
            or entry[1] < 1
        ):
            raise ConfigError(
                f"model.attention_types[{i}]={entry!r} must be [[kinds...], repeat] "
                "with repeat >= 1"
            )
        for kind in entry[0]:
            if kind not in ATTENTION_KINDS:
                raise ConfigError(
                    f"model.attention_types[{i}] has unknown attention kind {kind!r}; "
                    f"expected one of {', '.join(ATTENTION_KINDS)}"
                )
        kinds.extend(list(entry[0]) * entry[1])
    return kinds
