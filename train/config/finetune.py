"""What the fine-tuning verbs (neo sft, neo dpo) share in their schema: the base checkpoint,
LoRA, epochs or steps, greedy samples, and the rules of those keys. torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from train.config.rules import Schema, require_fraction, require_unread
from train.config.run import RunConfig
from train.errors import ConfigError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")


@dataclass
class LoraConfig(Schema):
    """Low-rank adapters (peft's LoRA): the base weights stay frozen and only the adapters
    train. LoRA usually wants a larger learning rate than full fine-tuning (optim.lr=2e-4)."""

    # Rank of the adapters; 0: full fine-tuning.
    r: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05
    # Linear layers to adapt, by name: q_proj k_proj v_proj out_proj (attention), c_fc c_proj
    # (MLP). GPT-Neo's usual choice (peft's default for gpt_neo) is the query and value.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # At the end: the base with the adapters folded in as run_dir/model (and its HF export);
    # false: only the adapters (run_dir/adapter, peft's format).
    merge: bool = True

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def validate(self) -> LoraConfig:
        if self.r < 0:
            raise ConfigError(f"lora.r={self.r} must be >= 0 (0 disables LoRA)")
        if not self.enabled:
            require_unread("lora.", self, LoraConfig(), "LoRA is off (set lora.r=8, say)")
            return self
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha} must be > 0")
        require_fraction("lora.dropout", self.dropout)
        unknown = sorted(set(self.target_modules) - set(LORA_TARGETS))
        if unknown or not self.target_modules:
            raise ConfigError(
                f"lora.target_modules={list(self.target_modules)}: expected names among "
                f"{', '.join(LORA_TARGETS)}"
            )
        return self


@dataclass
class FineTuneConfig(RunConfig):
    """The training keys (train/config/run.py) of a run that starts from `base`."""

    # A neotrain checkpoint, run directory, DeepSpeed checkpoint or Hugging Face GPT-Neo
    # directory; its model config replaces `model`. Each verb says what a missing default
    # falls back to.
    base: str = "runs/demo"
    # Low-rank adapters: only they train.
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Passes over the training rows, or a number of optimizer steps: one of the two (neither:
    # one epoch). A resolved config holds the steps.
    epochs: float | None = None
    max_steps: int | None = None
    # Greedy answers to this many validation prompts, logged at every validation.
    samples: int = 3
    sample_max_new_tokens: int = 48

    @property
    def seq_len(self) -> int:
        """Rows are (at most) the model's context long."""
        return self.model.max_position_embeddings

    def check_fine_tuning(self) -> None:
        """The rules of the shared keys: the run directory is not the base's, LoRA, epochs or
        steps (one of them), samples."""
        check_base(self)
        self.lora.validate()
        if self.epochs is not None and self.max_steps is not None:
            raise ConfigError(
                f"epochs={self.epochs} and max_steps={self.max_steps}: give one of them"
            )
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs={self.epochs} must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps} must be >= 1")
        if self.samples < 0:
            raise ConfigError(f"samples={self.samples} must be >= 0")


def check_base(cfg: FineTuneConfig) -> None:
    """The run directory neither is nor holds the base: the fine-tuned model and checkpoints
    would be written over the model it starts from."""
    if not cfg.base:
        return
    run_dir, base = Path(cfg.run_dir).resolve(), Path(cfg.base).resolve()
    if run_dir == base or run_dir in base.parents:
        raise ConfigError(
            f"run_dir={cfg.run_dir} holds base={cfg.base}: the fine-tuned model and "
            "checkpoints would be written over the model it starts from; choose another run_dir"
        )
