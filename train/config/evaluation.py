"""The schemas of the verbs that run a finished model (neo eval, neo generate), and of the
benchmarks neo train runs at every validation (its `eval.*`). torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from train.config.rules import Schema, require_choice, require_positive
from train.config.run import ACCELERATOR_KINDS
from train.errors import ConfigError

EVAL_DTYPES = ("float32", "bfloat16", "float16")
# Tasks with settings of their own under task.<name> (train/evals/tasks.py defines them).
BENCHMARKS = ("lambada_openai", "wikitext", "pubmedqa", "hellaswag", "piqa", "winogrande", "mathqa")
VAL = "val"
# Every task type a task can have: the benchmarks, val, and the two for a user's own file.
TASK_TYPES = (VAL, *BENCHMARKS, "mc", "text")


@dataclass
class EvalTaskConfig(Schema):
    """One task's data: `task.<name>.path=FILE`. A new name (`+task.mine={type: mc, path:
    mine.jsonl}`) defines a task of a known type on the user's file."""

    # One of TASK_TYPES; None: the task's own name.
    type: str | None = None
    # A file (the published format), hf:NAME[@CONFIG] for a hub dataset, or for val a `neo prep`
    # directory or corpus file; None: the published file's name in data_dir (val: the data).
    path: str | None = None
    # val: the prepared split (default validation); hub datasets: the split to read.
    split: str | None = None


def _task_entries() -> dict[str, Any]:
    return {name: {"type": None, "path": None, "split": None} for name in (VAL, *BENCHMARKS)}


@dataclass
class BenchmarkConfig(Schema):
    """Which benchmarks and how: `neo train`'s `eval.*` (run at every validation) and the
    common part of `neo eval`'s settings."""

    # Task names. neo train: [] runs none; neo eval: None means val and every task whose file
    # is found in data_dir.
    tasks: list[str] | None = field(default_factory=list)
    # name -> EvalTaskConfig fields. A plain mapping, so that `+task.mine={type: mc, path: F}`
    # adds a task (OmegaConf cannot add entries to a mapping of dataclasses); checked in
    # `task_settings`.
    task: dict[str, Any] = field(default_factory=_task_entries)
    # Where the published benchmark files are looked for by their names (README: Benchmark
    # files; nothing is downloaded).
    data_dir: str = "data/eval"
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    # Padded tokens per forward.
    batch_tokens: int = 16384
    # The first N items of each task (val: documents).
    limit: int | None = None
    # Tokens the model reads at most; None: model.max_position_embeddings.
    max_length: int | None = None
    # Stop at the first malformed record instead of skipping and counting it.
    strict: bool = False

    def validate(self, key: str = "") -> BenchmarkConfig:
        """`key`: the prefix the user wrote (`eval.` under neo train)."""
        if self.num_fewshot < 0:
            raise ConfigError(f"{key}num_fewshot={self.num_fewshot} must be >= 0")
        require_positive(f"{key}batch_tokens", self.batch_tokens)
        for name in ("limit", "max_length"):
            if getattr(self, name) is not None:
                require_positive(f"{key}{name}", getattr(self, name))
        for name in self.task:
            self.task_settings(name, key)
        for name in self.tasks or []:
            task_type = self.task_settings(name, key).type or name
            if task_type not in TASK_TYPES:
                raise ConfigError(
                    f"{key}tasks: unknown task {name!r}; known: {', '.join(TASK_TYPES)}, or "
                    f"define one with +{key}task.{name}='{{type: mc, path: FILE}}'"
                )
        return self

    def task_settings(self, name: str, key: str = "") -> EvalTaskConfig:
        """task.<name> as an EvalTaskConfig (the task's defaults where it is not set)."""
        values = self.task.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{key}task.{name}={values!r} must be a mapping like {{path: FILE}}")
        known = EvalTaskConfig.__dataclass_fields__
        for k, value in values.items():
            if k not in known:
                raise ConfigError(
                    f"{key}task.{name}.{k}: unknown setting; expected {', '.join(known)}"
                )
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{key}task.{name}.{k}={value!r} must be a string")
        if values.get("type") is not None and values["type"] not in TASK_TYPES:
            raise ConfigError(
                f"{key}task.{name}.type={values['type']!r} is not one of {', '.join(TASK_TYPES)}"
            )
        return EvalTaskConfig(**values)


@dataclass
class CheckpointSource(Schema):
    """Where a verb that runs a finished model (eval, generate) reads it from, and how it
    places it."""

    # A neotrain checkpoint, a run directory (its latest checkpoint), a DeepSpeed checkpoint or
    # a Hugging Face GPT-Neo directory.
    checkpoint: str = "runs/demo"
    # Tokenizer for a model directory that has none (gpt2, a tokenizer.json or a directory).
    tokenizer: str | None = None
    accelerator: str = "auto"
    dtype: str = "float32"
    # auto: accelerate's big-model loading, layers spread over the devices and CPU memory.
    device_map: str | None = None

    def validate_source(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint= must name a checkpoint or run directory")
        require_choice("dtype", self.dtype, EVAL_DTYPES)
        require_choice("accelerator", self.accelerator, ACCELERATOR_KINDS)
        if self.device_map not in (None, "auto"):
            raise ConfigError(f"device_map={self.device_map!r} must be auto or null")


@dataclass
class EvalConfig(BenchmarkConfig, CheckpointSource):
    """`neo eval`: the benchmarks, the checkpoint, and where the results go."""

    tasks: list[str] | None = None
    # Sequences per forward: auto (as many as batch_tokens allow) or a number.
    batch_size: str = "auto"
    # val: documents over this many tokens are a seeded sample, each source keeping its share.
    val_tokens: int = 2_000_000
    val_seed: int = 1234
    output: str = "runs/eval"
    overwrite: bool = False
    log_samples: bool = False

    def validate(self, key: str = "") -> EvalConfig:
        super().validate(key)
        self.validate_source()
        if self.tasks is not None and not self.tasks:
            raise ConfigError("tasks=[] names no task (leave tasks unset for the default set)")
        if self.batch_size != "auto" and not (self.batch_size.isdigit() and int(self.batch_size)):
            raise ConfigError(f"batch_size={self.batch_size!r} must be auto or a positive number")
        require_positive("val_tokens", self.val_tokens)
        return self


TRUNCATE_MODES = ("error", "left")


@dataclass
class GenerationConfig(Schema):
    """How to decode; the names, defaults and meaning are Hugging Face GenerationConfig's."""

    # New tokens per sequence; max_length (prompt + new, the batch's longest prompt) is used
    # only when max_new_tokens is null.
    max_new_tokens: int | None = 64
    max_length: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Any = False  # true | false | never
    num_return_sequences: int = 1
    # Text that ends a sequence (kept in its output, as Hugging Face's stop_strings does).
    stop_strings: list[str] = field(default_factory=list)
    # Sampling is reproducible for a given seed (null: a random one, printed).
    seed: int | None = None
    # A sequence reaching max_position_embeddings: error, or left (keep the last positions).
    truncate: str = "error"

    def validate(self) -> GenerationConfig:
        if self.max_new_tokens is None and self.max_length is None:
            raise ConfigError("set max_new_tokens (or max_length)")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ConfigError(
                f"max_new_tokens must be greater than 0, but is {self.max_new_tokens}"
            )
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(
                f"early_stopping must be a boolean or 'never', but is {self.early_stopping!r}"
            )
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(
                f"temperature={self.temperature} has to be a strictly positive float; for greedy "
                "decoding set do_sample=false"
            )
        if self.top_k < 0:
            raise ConfigError(f"top_k has to be a positive integer (0: off), but is {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p has to be a float > 0 and <= 1, but is {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ConfigError(
                f"repetition_penalty has to be a strictly positive float, but is "
                f"{self.repetition_penalty}"
            )
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be at least 1, but is {self.num_beams}")
        if self.num_return_sequences < 1:
            raise ConfigError("num_return_sequences must be at least 1")
        if self.num_return_sequences > 1 and self.num_beams == 1 and not self.do_sample:
            raise ConfigError(
                "Greedy methods (do_sample != True) without beam search do not support "
                f"num_return_sequences different than 1 (got {self.num_return_sequences})"
            )
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ConfigError(
                f"num_return_sequences ({self.num_return_sequences}) has to be smaller or equal "
                f"to num_beams ({self.num_beams})"
            )
        if any(not s for s in self.stop_strings):
            raise ConfigError("stop_strings=[...] holds an empty string")
        require_choice("truncate", self.truncate, TRUNCATE_MODES)
        return self


GENERATE_FORMATS = ("text", "jsonl")


@dataclass
class GenerateConfig(GenerationConfig, CheckpointSource):
    prompt: str = "Hello, I'm a language model,"
    # One prompt per line, or JSONL with a "prompt" field; replaces `prompt`.
    prompts_file: str | None = None
    batch_size: int = 8
    # text: the prompts and their continuations; jsonl: one record per sequence with token ids
    # and per-token log-probabilities.
    format: str = "text"
    # Where to write (null: standard output).
    output: str | None = None
    overwrite: bool = False

    def validate(self) -> GenerateConfig:
        super().validate()
        self.validate_source()
        require_choice("format", self.format, GENERATE_FORMATS)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, but is {self.batch_size}")
        return self
