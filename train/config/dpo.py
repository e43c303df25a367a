"""`neo dpo`'s schema: the fine-tuning keys (train/config/finetune.py), the preference data and
the loss (TRL 1.16's names and defaults). torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from train.config.finetune import FineTuneConfig
from train.config.rules import Schema, require_choice, require_fraction, require_unread
from train.errors import ConfigError

# TRL's DPOTrainer loss types neo dpo computes, as TRL 1.16 defines them.
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass
class DpoFieldsConfig(Schema):
    """Field names of the records, for data that names them otherwise."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


@dataclass
class DpoDataConfig(Schema):
    # JSON lines / JSON / hf:NAME of preference pairs, in any of TRL's three forms (each record
    # by its own fields): {prompt, chosen, rejected} text; {chosen, rejected} text whose longest
    # shared prefix is the prompt (Anthropic hh-rlhf); lists of {role, content} messages,
    # rendered with the chat template. null: the bundled sample (data_prep/sample/dpo_pairs.jsonl).
    path: str | None = None
    fields: DpoFieldsConfig = field(default_factory=DpoFieldsConfig)
    # A file of its own for validation; null: a seeded `validation_fraction` of `path`.
    validation_path: str | None = None
    validation_fraction: float = 0.1
    seed: int = 1234
    # Conversations: a Jinja template (or a name: neotrain); null: the tokenizer's own, else
    # neotrain's (train/data/sft.py).
    chat_template: str | None = None
    # Stop at the first bad record or over-long pair instead of counting and skipping it.
    strict: bool = False
    # hf:NAME datasets: the split to read.
    split: str | None = None
    # Each micro-batch's chosen and rejected sequences packed into rows of seq_len tokens
    # (positions restart and attention is blocked per sequence, as `neo sft` packs; TRL's
    # padding_free); false: one sequence per row, padded to the micro-batch's longest: the
    # default, measured faster (bench/dpo.py --layouts, README `neo dpo`; CPU only so far).
    packing: bool = False
    # How far the policy may move from the reference (TRL's beta; ipo: its tau).
    beta: float = 0.1
    # sigmoid (DPO) | ipo (squared, per-token normalised) | hinge (SLiC) | robust (rDPO).
    loss_type: str = "sigmoid"
    # robust only: the probability that a pair's preference is flipped, in [0, 0.5). TRL 1.16's
    # sigmoid loss has no label smoothing; its robust loss is where label_smoothing acts.
    label_smoothing: float = 0.0
    # Held-out pairs (the first ones with a prompt) whose prompts get greedy answers at every
    # validation, the first before step 1, each compared with its pair's chosen and rejected
    # response (`val/answers/...`: train/loop/style.py); 0: none.
    style_prompts: int = 64


@dataclass
class DpoConfig(FineTuneConfig):
    """`neo dpo`: the training keys on preference pairs, starting from `base`, against the
    base's own log-probabilities (computed once, before the first step). With LoRA only the
    adapters train, and the reference is the base: the model with its adapters off."""

    # The model to tune and the reference. runs/demo-sft missing: runs/demo, else a fresh
    # `model` (said so).
    base: str = "runs/demo-sft"
    dpo: DpoDataConfig = field(default_factory=DpoDataConfig)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of a step at most: a chosen and a rejected row per pair."""
        return 2 * self.global_batch_size * self.seq_len

    def check_dpo(self) -> None:
        """The rules of the keys only neo dpo reads."""
        d = self.dpo
        require_fraction("dpo.validation_fraction", d.validation_fraction)
        require_choice("dpo.loss_type", d.loss_type, LOSS_TYPES)
        if d.style_prompts < 0:
            raise ConfigError(f"dpo.style_prompts={d.style_prompts} must be >= 0")
        if d.beta <= 0:
            raise ConfigError(f"dpo.beta={d.beta} must be > 0")
        if d.loss_type == "robust":
            if not 0.0 <= d.label_smoothing < 0.5:
                raise ConfigError(
                    f"dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5) for "
                    "dpo.loss_type=robust (the probability that a preference is flipped)"
                )
        else:
            require_unread(
                "dpo.",
                d,
                DpoDataConfig(),
                f"dpo.loss_type={d.loss_type} has no label smoothing (TRL 1.16: only its robust "
                "loss reads it; dpo.loss_type=robust)",
                keys=("label_smoothing",),
            )
        self.check_fine_tuning()
