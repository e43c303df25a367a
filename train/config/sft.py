"""`neo sft`'s schema: the fine-tuning keys (train/config/finetune.py), the fine-tuning data and
GPT-1's task head. torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from train.config.finetune import FineTuneConfig
from train.config.rules import Schema, require_choice, require_fraction, require_unread
from train.errors import ConfigError

SFT_FORMATS = ("alpaca", "prompt_completion", "chat")
HEAD_TYPES = ("lm", "classification", "entailment", "similarity", "multiple_choice", "reward")
# The GPT-1 task heads' keys, which a reward model (trained on preference pairs) does not read.
GPT1_KEYS = ("lm_coef", "special_tokens", "tokens")
GPT1_FIELDS = ("text", "text_pair", "label", "choices", "gold")
REWARD_FIELDS = ("prompt", "chosen", "rejected", "margin")


@dataclass
class SftFieldsConfig(Schema):
    """Field names of the records, for data that names them otherwise."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


@dataclass
class SftDataConfig(Schema):
    # JSON lines / JSON / hf:NAME; null: the bundled sample (instructions; with a task head,
    # the bundled classification sample).
    path: str | None = None
    # alpaca {instruction, input, output} | prompt_completion {prompt, completion} |
    # chat {messages: [{role, content}]}
    format: str = "alpaca"
    fields: SftFieldsConfig = field(default_factory=SftFieldsConfig)
    # A file of its own for validation; null: a seeded `validation_fraction` of `path`.
    validation_path: str | None = None
    validation_fraction: float = 0.05
    seed: int = 1234
    # Several examples per row (packing.pack_bins; attention blocked between them); false:
    # one example per row, padded to the micro-batch's longest.
    packing: bool = True
    # Train on the prompt tokens too (default: the response only; chats: assistant turns).
    train_on_prompt: bool = False
    # Chats: a Jinja template (or a name: neotrain); null: the tokenizer's own, else neotrain.
    chat_template: str | None = None
    # Stop at the first bad record or over-long example instead of counting and skipping it.
    strict: bool = False
    # hf:NAME datasets: the split to read.
    split: str | None = None


@dataclass
class HeadTokensConfig(Schema):
    """The GPT-1 input transformation's tokens: new tokens by these names (special_tokens=add)
    or existing single tokens of the vocabulary (special_tokens=map)."""

    start: str = "<|start|>"
    delim: str = "<|delim|>"
    classify: str = "<|classify|>"


@dataclass
class HeadFieldsConfig(Schema):
    """Field names of task records (JSON lines)."""

    text: str = "text"  # the text; the premise, or first text, of a pair; a choice's context
    text_pair: str = "text_pair"  # entailment's hypothesis, similarity's second text
    label: str = "label"  # a name or a number; the label names come from the training data
    choices: str = "choices"  # multiple_choice: the candidate answers
    gold: str = "gold"  # multiple_choice: the index of the right one
    # reward: preference pairs, in any of TRL's three forms (as neo dpo reads them)
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str = "margin"  # optional: how much better chosen is (TRL's margin column)


@dataclass
class HeadConfig(Schema):
    """`neo sft head=...`: lm fine-tunes the language model itself; reward trains a scalar
    score on preference pairs (the Bradley-Terry loss, as TRL's RewardTrainer); the others put
    GPT-1's linear head (Radford et al. 2018) over the final hidden state at the classify
    token and train task loss + lm_coef * LM loss on the task's text."""

    type: str = "lm"  # lm | classification | entailment | similarity | multiple_choice | reward
    lm_coef: float = 0.5  # GPT-1's weight of the auxiliary LM loss; 0 disables it
    special_tokens: str = "add"  # add: new embedding rows, N(0, initializer_range); map
    tokens: HeadTokensConfig = field(default_factory=HeadTokensConfig)
    fields: HeadFieldsConfig = field(default_factory=HeadFieldsConfig)
    # reward: TRL's center_rewards_coefficient, the weight of mean((chosen + rejected)^2) in
    # the loss, which pulls the rewards towards mean zero (TRL recommends 0.01); null: none.
    center_rewards_coefficient: float | None = None

    @property
    def enabled(self) -> bool:
        """A task head on the model (any type but lm)."""
        return self.type != "lm"

    @property
    def gpt1(self) -> bool:
        """GPT-1's input transformation: special tokens around the task's text."""
        return self.enabled and self.type != "reward"

    def validate(self) -> HeadConfig:
        require_choice("head.type", self.type, HEAD_TYPES)
        if not self.enabled:
            require_unread("head.", self, HeadConfig(), "head=lm has no task head")
            return self
        if self.type == "reward":
            return self._validate_reward()
        why = f"head={self.type} is a GPT-1 task head (head=reward reads it)"
        require_unread("head.", self, HeadConfig(), why, keys=("center_rewards_coefficient",))
        require_unread("head.fields.", self.fields, HeadFieldsConfig(), why, keys=REWARD_FIELDS)
        require_choice("head.special_tokens", self.special_tokens, ("add", "map"))
        if self.lm_coef < 0:
            raise ConfigError(f"head.lm_coef={self.lm_coef} must be >= 0")
        names = [self.tokens.start, self.tokens.delim, self.tokens.classify]
        if len(set(names)) != 3 or not all(names):
            raise ConfigError(f"head.tokens {names}: three different, non-empty tokens expected")
        return self

    def _validate_reward(self) -> HeadConfig:
        why = "head=reward scores preference pairs as they are (GPT-1's task heads read it)"
        require_unread("head.", self, HeadConfig(), why, keys=GPT1_KEYS)
        require_unread("head.fields.", self.fields, HeadFieldsConfig(), why, keys=GPT1_FIELDS)
        names = [self.fields.prompt, self.fields.chosen, self.fields.rejected]
        if len(set(names)) != 3 or not all(names):
            raise ConfigError(
                f"head.fields prompt, chosen, rejected = {names}: three different, non-empty "
                "field names expected"
            )
        c = self.center_rewards_coefficient
        if c is not None and not c >= 0:  # not >=: NaN too
            raise ConfigError(f"head.center_rewards_coefficient={c} must be >= 0 (or null)")
        return self


@dataclass
class SftConfig(FineTuneConfig):
    """`neo sft`: the training keys on fine-tuning data, starting from `base` (runs/demo
    missing: a fresh `model`, said so)."""

    sft: SftDataConfig = field(default_factory=SftDataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    def check_sft(self) -> None:
        """The rules of the keys only neo sft reads."""
        s = self.sft
        require_choice("sft.format", s.format, SFT_FORMATS)
        require_fraction("sft.validation_fraction", s.validation_fraction)
        self.head.validate()
        if self.head.type == "reward":
            require_unread(
                "sft.",
                s,
                SftDataConfig(),
                "head=reward reads preference pairs (head.fields), not packed",
                keys=("format", "fields", "packing", "train_on_prompt"),
            )
        elif self.head.enabled:
            require_unread(
                "sft.",
                s,
                SftDataConfig(),
                f"head={self.head.type} reads task records "
                "(head.fields), neither packed nor templated",
                keys=("format", "fields", "packing", "train_on_prompt", "chat_template"),
            )
        if self.head.enabled and self.lora.enabled and not self.lora.merge:
            raise ConfigError(
                f"lora.merge=false with head={self.head.type}: the head is trained whole, "
                "not as an adapter; keep lora.merge=true"
            )
        if not self.head.enabled and s.chat_template is not None and s.format != "chat":
            raise ConfigError(
                f"sft.chat_template is not read: sft.format={s.format} (templates render chats)"
            )
        self.check_fine_tuning()
