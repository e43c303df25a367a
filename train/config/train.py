"""`neo train`'s schema: the training keys (train/config/run.py), its prepared data, the
validation budget, and the benchmarks it runs at every validation. torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from train.config.evaluation import VAL, BenchmarkConfig
from train.config.rules import Schema, require_positive
from train.config.run import RunConfig
from train.errors import ConfigError


@dataclass
class BlendComponent(Schema):
    """One part of a data blend: a `neo prep` directory, optionally one source of it."""

    path: str = ""
    weight: float = 1.0
    # A `meta.pile_set_name` recorded in the manifest; None takes every document.
    source: str | None = None


@dataclass
class DataConfig(Schema):
    # A `neo prep` output directory (or Megatron shards with a manifest); used when `blend` is
    # empty. The default is prepared from the bundled sample corpus on first use.
    path: str = "data/pile_sample"
    # Weighted blend, e.g. the Pile's per-component weights; weights are normalised.
    blend: list[BlendComponent] = field(default_factory=list)
    # Tokens per training sample (the model sees seq_len, predicts seq_len); None = context.
    seq_len: int | None = None
    # Seed of the document and sample order (one permutation per epoch).
    seed: int = 1234
    # Also check every shard's sha256 against the manifest before training (the cheap checks,
    # token ids below the vocabulary and each shard's xxh3-64, always run).
    verify_shards: bool = False


@dataclass
class TrainConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    max_steps: int = 200
    # Validation scores every document of the validation split up to this many tokens; over it,
    # a seeded sample of documents (each source keeping its share), the same at every
    # validation and on resume. `neo eval tasks=[val] val_tokens=N` gives the same numbers.
    eval_tokens: int = 2_000_000
    # Benchmarks run at every validation, as `neo eval` runs them: eval.tasks=[lambada_openai]
    # eval.limit=500.
    eval: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    @property
    def seq_len(self) -> int:
        """Tokens the model sees per sample: data.seq_len, or the model's context."""
        return self.data.seq_len or self.model.max_position_embeddings

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    def check_train(self) -> None:
        """The rules of the keys only neo train reads."""
        require_positive("max_steps", self.max_steps)
        require_positive("eval_tokens", self.eval_tokens)
        if self.data.seq_len is not None:
            require_positive("data.seq_len", self.data.seq_len)
        self.model.check_sequence_length(self.seq_len)
        if not self.data.blend and not self.data.path:
            raise ConfigError("data.path= must name a `neo prep` directory (or give data.blend)")
        for i, part in enumerate(self.data.blend):
            if not part.path:
                raise ConfigError(f"data.blend[{i}].path= must name a `neo prep` directory")
        weights = [part.weight for part in self.data.blend]
        if any(not w > 0 for w in weights):
            raise ConfigError(f"data.blend weights must be positive, got {weights}")
        self.eval.validate("eval.")
        if VAL in (self.eval.tasks or []):
            raise ConfigError(
                "eval.tasks names val: neo train validates on its data's validation split at "
                "every eval_every steps already (eval_tokens sets how much); eval.tasks names "
                "benchmarks"
            )
