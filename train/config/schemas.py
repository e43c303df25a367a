"""Typed configuration schema.

Every verb's primary config is a dataclass registered in Hydra's ConfigStore; the YAML files
under `configs/` only fill in values. Unknown keys and wrong types therefore fail at the entry
point, and after it only these dataclasses travel through the code, never a DictConfig.

Model field names follow Hugging Face's `GPTNeoConfig` wherever it has the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from data_prep.config import PrepConfig
from train.errors import ConfigError

ATTENTION_KINDS = ("global", "local", "strided")
ATTENTION_BACKENDS = ("auto", "dense", "blockwise", "flex", "npu")
ACTIVATIONS = ("gelu_new", "gelu", "relu")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ACCELERATOR_KINDS = ("auto", "cpu", "cuda", "npu")
RESUME_MODES = ("auto", "never")
SCHEDULE_UNITS = ("steps", "tokens")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class ModelConfig:
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
        """Raise ConfigError for the first rule this config breaks; return self otherwise."""
        for key in ("vocab_size", "max_position_embeddings", "hidden_size", "num_layers"):
            _require_positive(f"model.{key}", getattr(self, key))
        _require_positive("model.num_heads", self.num_heads)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} does not divide "
                f"model.hidden_size={self.hidden_size}"
            )
        if self.intermediate_size is not None:
            _require_positive("model.intermediate_size", self.intermediate_size)
        kinds = self.layer_kinds()
        if len(kinds) != self.num_layers:
            raise ConfigError(
                f"model.attention_types={self.attention_types} expands to {len(kinds)} layers, "
                f"but model.num_layers={self.num_layers}"
            )
        if "local" in kinds:
            _require_window("model.window_size", self.window_size, self.max_position_embeddings)
        if "strided" in kinds:
            _require_window("model.sparse_stride", self.sparse_stride, self.max_position_embeddings)
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


def batch_layout(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps, or a ConfigError naming the numbers that do not divide."""
    per_step = micro_batch * world_size
    if micro_batch < 1 or global_batch < 1 or global_batch % per_step:
        raise ConfigError(
            f"global_batch_size={global_batch} is not a multiple of micro_batch_size="
            f"{micro_batch} x world size {world_size} = {per_step}"
        )
    return global_batch // per_step


def require_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _require_positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key}={value} must be >= 1")


def _require_window(key: str, value: int, context: int) -> None:
    if not 1 <= value <= context:
        raise ConfigError(
            f"{key}={value} must be between 1 and model.max_position_embeddings={context}"
        )


@dataclass
class InfoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    world_size: int = 1
    # Sequence length for the attention FLOPs; None means max_position_embeddings.
    seq_len: int | None = None


@dataclass
class ConvertConfig:
    """`neo import` and `neo export`: a directory in, a directory out."""

    input: str = ""
    output: str = ""
    overwrite: bool = False
    # export only: cast the weights (float32, bfloat16, float16); None keeps them as stored.
    dtype: str | None = None
    # export only: a tokenizer (file, directory, gpt2) to export with the model; null: the
    # checkpoint's own.
    tokenizer: str | None = None
    # export only: a `neo eval` results.json for the model card (default: one inside the run).
    eval_results: str | None = None
    # export only: hf (a GPTNeoForCausalLM directory) | onnx (ONNX graphs for ONNX Runtime).
    format: str = "hf"
    # hf: weights above this size are sharded with an index, as save_pretrained does.
    max_shard_size: str = "5GB"
    with_past: bool = True  # onnx: also decoder_with_past.onnx, the key/value cache form
    opset: int = 20  # onnx
    # hf: the verification before the rename also runs the card's pipeline usage (neo verify's).
    usage: bool = True


@dataclass
class VerifyConfig:
    """`neo verify DIR`: check an exported directory (train/checkpoints/verify.py)."""

    dir: str = "runs/demo/export"
    # Also run the card's pipeline("text-generation") usage (seconds).
    usage: bool = True


@dataclass
class BlendComponent:
    """One part of a data blend: a `neo prep` directory, optionally one source of it."""

    path: str = ""
    weight: float = 1.0
    # A `meta.pile_set_name` recorded in the manifest; None takes every document.
    source: str | None = None


@dataclass
class DataConfig:
    # A `neo prep` output directory (or Megatron shards with a manifest); used when `blend` is
    # empty. The default is prepared from the bundled sample corpus on first use.
    path: str = "data/pile_sample"
    # Weighted blend, e.g. the Pile's per-component weights; weights are normalised.
    blend: list[BlendComponent] = field(default_factory=list)
    # Tokens per training sample (the model sees seq_len, predicts seq_len); None = context.
    seq_len: int | None = None
    # Seed of the document and sample order (one permutation per epoch).
    seed: int = 1234
    # Check every shard's sha256 against the manifest before training.
    verify_shards: bool = False


@dataclass
class OptimConfig:
    """AdamW with GPT-3's defaults; linear warmup, then cosine decay to min_lr_ratio * lr."""

    lr: float = 6e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Not applied to biases, LayerNorm weights or embeddings.
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Schedule length unit: "steps" or "tokens".
    unit: str = "steps"
    warmup: int = 30
    # Length of warmup + cosine decay; None: the whole run.
    decay: int | None = None
    min_lr_ratio: float = 0.1


@dataclass
class DeepSpeedConfig:
    """The parts of DeepSpeed's config neotrain builds for you; `extra` is merged last, so any
    raw DeepSpeed key can be set (e.g. +deepspeed.extra.zero_optimization.overlap_comm=true)."""

    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    activation_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> DeepSpeedConfig:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_param=true needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1")
        return self


@dataclass
class WandbConfig:
    # offline (default: logs under the run directory, `wandb sync` later), online, disabled
    mode: str = "offline"
    project: str = "neotrain"
    entity: str | None = None


@dataclass
class LoggerConfig:
    log_every: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)


EVAL_DTYPES = ("float32", "bfloat16", "float16")
# Tasks with settings of their own under task.<name> (train/evals/tasks.py defines them).
BENCHMARKS = (
    "val", "lambada_openai", "wikitext", "pubmedqa", "hellaswag", "piqa", "winogrande", "mathqa",
)  # fmt: skip


@dataclass
class EvalTaskConfig:
    """One task's data: `task.<name>.path=FILE`. A new name (`+task.mine={type: mc, path:
    mine.jsonl}`) defines a task of a known type on the user's file."""

    # lambada_openai, wikitext, pubmedqa, hellaswag, piqa, winogrande, mathqa, mc, text, val;
    # None: the task's own name.
    type: str | None = None
    # A file (the published format), hf:NAME[@CONFIG] for a hub dataset, or for val a `neo prep`
    # directory or corpus file; None: the published file's name in data_dir (val: the data).
    path: str | None = None
    # val: the prepared split (default validation); hub datasets: the split to read.
    split: str | None = None


def _task_entries() -> dict[str, Any]:
    return {name: {"type": None, "path": None, "split": None} for name in BENCHMARKS}


@dataclass
class BenchmarkConfig:
    """Which tasks and how: `neo eval`'s settings, and `neo train`'s `eval.*` (the same tasks
    run at every validation)."""

    # Task names. neo eval: None means val and every task whose file is found in data_dir;
    # neo train: [] runs none.
    tasks: list[str] | None = field(default_factory=list)
    # name -> EvalTaskConfig fields. A plain mapping, so that `+task.mine={type: mc, path: F}`
    # adds a task (OmegaConf cannot add entries to a mapping of dataclasses); checked in
    # `task_settings`.
    task: dict[str, Any] = field(default_factory=_task_entries)
    # Where the published benchmark files are looked for by their names.
    data_dir: str = "../shared/eval"
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    # Sequences per forward: auto (as many as batch_tokens allow) or a number.
    batch_size: str = "auto"
    # Padded tokens per forward.
    batch_tokens: int = 16384
    # The first N items of each task (val: documents).
    limit: int | None = None
    # Tokens the model reads at most; None: model.max_position_embeddings.
    max_length: int | None = None
    # val: documents over this many tokens are a seeded sample, each source keeping its share.
    val_tokens: int = 2_000_000
    val_seed: int = 1234
    # Stop at the first malformed record instead of skipping and counting it.
    strict: bool = False

    def validate(self, key: str = "") -> BenchmarkConfig:
        """`key`: the prefix the user wrote (`eval.` under neo train)."""
        if self.batch_size != "auto" and not (self.batch_size.isdigit() and int(self.batch_size)):
            raise ConfigError(
                f"{key}batch_size={self.batch_size!r} must be auto or a positive number"
            )
        if self.num_fewshot < 0:
            raise ConfigError(f"{key}num_fewshot={self.num_fewshot} must be >= 0")
        _require_positive(f"{key}batch_tokens", self.batch_tokens)
        _require_positive(f"{key}val_tokens", self.val_tokens)
        for name in ("limit", "max_length"):
            if getattr(self, name) is not None:
                _require_positive(f"{key}{name}", getattr(self, name))
        for name in self.task:
            self.task_settings(name, key)
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
        return EvalTaskConfig(**values)


@dataclass
class ModelSourceConfig:
    """Where a verb that runs a finished model (eval, generate) reads it from, and how it
    places it."""

    # A neotrain checkpoint, a run directory (its latest checkpoint), a DeepSpeed checkpoint or
    # a Hugging Face GPT-Neo directory.
    model: str = "runs/demo"
    # Tokenizer for a model directory that has none (gpt2, a tokenizer.json or a directory).
    tokenizer: str | None = None
    accelerator: str = "auto"
    dtype: str = "float32"
    # auto: accelerate's big-model loading, layers spread over the devices and CPU memory.
    device_map: str | None = None

    def validate_source(self) -> None:
        require_choice("dtype", self.dtype, EVAL_DTYPES)
        require_choice("accelerator", self.accelerator, ACCELERATOR_KINDS)
        if self.device_map not in (None, "auto"):
            raise ConfigError(f"device_map={self.device_map!r} must be auto or null")


@dataclass
class EvalConfig(BenchmarkConfig, ModelSourceConfig):
    tasks: list[str] | None = None
    output: str = "runs/eval"
    overwrite: bool = False
    log_samples: bool = False

    def validate(self, key: str = "") -> EvalConfig:
        super().validate(key)
        self.validate_source()
        if self.tasks is not None and not self.tasks:
            raise ConfigError("tasks=[] names no task (leave tasks unset for the default set)")
        return self


TRUNCATE_MODES = ("error", "left")


@dataclass
class GenerationConfig:
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
class GenerateConfig(GenerationConfig, ModelSourceConfig):
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


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "tiny"
    run_dir: str = "runs/tiny"
    seed: int = 1234
    # auto | cpu | cuda | npu
    accelerator: str = "auto"
    # auto (bf16 where the device computes it natively, else fp32) | bf16 | fp16 (dynamic loss
    # scaling; CUDA and Ascend only) | fp32
    precision: str = "auto"
    micro_batch_size: int = 4
    # Samples per optimizer step over all ranks: micro_batch_size * accumulation * world_size.
    global_batch_size: int = 8
    max_steps: int = 200
    eval_every: int = 50
    # Validation scores every document of the validation split up to this many tokens; over it,
    # a seeded sample of documents (each source keeping its share), the same at every
    # validation and on resume. `neo eval tasks=[val] val_tokens=N` gives the same numbers.
    eval_tokens: int = 2_000_000
    save_every: int = 100
    keep_last: int = 2
    # Stop with an error after this many optimizer steps in a row with a non-finite loss.
    max_bad_steps: int = 5
    # Peak FLOP/s per device for MFU; None: this device's matmul peak in the training precision,
    # measured in a fraction of a second and cached (train/distributed/machine.py).
    peak_flops: float | None = None
    # auto: continue from run_dir/checkpoints if present; never: refuse a non-empty run dir.
    resume: str = "auto"
    # At the end: a consolidated neotrain checkpoint (run_dir/model) and a HF directory.
    export_hf: bool = True
    # Benchmarks run at every validation, as `neo eval` runs them: eval.tasks=[lambada_openai]
    # eval.limit=500 (val without a path: this run's data).
    eval: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def validate(self, world_size: int) -> int:
        """Every rule a config can break, checked before any process group, data or model
        exists; returns the gradient-accumulation steps (ConfigError naming the key
        otherwise)."""
        self.model.validate()
        self.model.check_sequence_length(self.seq_len)
        self.deepspeed.validate()
        require_choice("precision", self.precision, PRECISIONS)
        require_choice("accelerator", self.accelerator, ACCELERATOR_KINDS)
        require_choice("resume", self.resume, RESUME_MODES)
        require_choice("optim.unit", self.optim.unit, SCHEDULE_UNITS)
        require_choice("logger.wandb.mode", self.logger.wandb.mode, WANDB_MODES)
        for key in ("max_steps", "eval_every", "eval_tokens", "save_every", "keep_last"):
            _require_positive(key, getattr(self, key))
        _require_positive("max_bad_steps", self.max_bad_steps)
        _require_positive("logger.log_every", self.logger.log_every)
        if self.data.seq_len is not None:
            _require_positive("data.seq_len", self.data.seq_len)
        self.eval.validate("eval.")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"peak_flops={self.peak_flops} must be > 0 (FLOP/s per device)")
        return batch_layout(self.global_batch_size, self.micro_batch_size, world_size)

    @property
    def seq_len(self) -> int:
        """Tokens the model sees per sample: data.seq_len, or the model's context."""
        return self.data.seq_len or self.model.max_position_embeddings

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


SFT_FORMATS = ("alpaca", "prompt_completion", "chat")


@dataclass
class SftFieldsConfig:
    """Field names of the records, for data that names them otherwise."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


@dataclass
class SftDataConfig:
    # JSON lines / JSON / hf:NAME; null: the bundled instruction sample.
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

    def validate(self) -> SftDataConfig:
        require_choice("sft.format", self.format, SFT_FORMATS)
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(
                f"sft.validation_fraction={self.validation_fraction} must be in [0, 1)"
            )
        return self


@dataclass
class LoraConfig:
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
        if self.enabled:
            if self.alpha <= 0:
                raise ConfigError(f"lora.alpha={self.alpha} must be > 0")
            if not 0 <= self.dropout < 1:
                raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
            unknown = sorted(set(self.target_modules) - set(LORA_TARGETS))
            if unknown or not self.target_modules:
                raise ConfigError(
                    f"lora.target_modules={list(self.target_modules)}: expected names among "
                    f"{', '.join(LORA_TARGETS)}"
                )
        return self


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")

TASK_TYPES = ("lm", "classification", "entailment", "similarity", "multiple_choice")


@dataclass
class TaskTokensConfig:
    """The GPT-1 input transformation's tokens: new tokens by these names (special_tokens=add)
    or existing single tokens of the vocabulary (special_tokens=map)."""

    start: str = "<|start|>"
    delim: str = "<|delim|>"
    classify: str = "<|classify|>"


@dataclass
class TaskFieldsConfig:
    """Field names of task records (JSON lines)."""

    text: str = "text"  # the text; the premise, or first text, of a pair; a choice's context
    text_pair: str = "text_pair"  # entailment's hypothesis, similarity's second text
    label: str = "label"  # a name or a number; the label names come from the training data
    choices: str = "choices"  # multiple_choice: the candidate answers
    gold: str = "gold"  # multiple_choice: the index of the right one


@dataclass
class TaskConfig:
    """`neo sft task=...`: lm fine-tunes the language model itself; the others put GPT-1's
    linear head (Radford et al. 2018) over the final hidden state at the classify token and
    train task loss + lm_coef * LM loss on the task's text."""

    type: str = "lm"  # lm | classification | entailment | similarity | multiple_choice
    lm_coef: float = 0.5  # GPT-1's weight of the auxiliary LM loss; 0 disables it
    special_tokens: str = "add"  # add: new embedding rows, N(0, initializer_range); map
    tokens: TaskTokensConfig = field(default_factory=TaskTokensConfig)
    fields: TaskFieldsConfig = field(default_factory=TaskFieldsConfig)

    @property
    def head(self) -> bool:
        return self.type != "lm"

    def validate(self) -> TaskConfig:
        require_choice("task.type", self.type, TASK_TYPES)
        require_choice("task.special_tokens", self.special_tokens, ("add", "map"))
        if self.lm_coef < 0:
            raise ConfigError(f"task.lm_coef={self.lm_coef} must be >= 0")
        names = [self.tokens.start, self.tokens.delim, self.tokens.classify]
        if len(set(names)) != 3 or not all(names):
            raise ConfigError(f"task.tokens {names}: three different, non-empty tokens expected")
        return self


@dataclass
class TaskHead:
    """What a checkpoint records about its task head: what the rows of `score.weight` mean
    and how inputs are built."""

    type: str
    labels: list[str]  # classes in score's row order (multiple_choice: none, one score row)
    token_ids: dict[str, int]  # start, delim, classify
    tokens: dict[str, str]

    @property
    def num_outputs(self) -> int:
        return 1 if self.type == "multiple_choice" else len(self.labels)


@dataclass
class SftConfig(TrainConfig):
    """`neo sft`: TrainConfig's machinery (ZeRO, precision, accumulation, schedule, resume,
    checkpoints, export) on fine-tuning data, starting from `base`."""

    # A neotrain checkpoint, run directory, DeepSpeed checkpoint or Hugging Face GPT-Neo
    # directory; its model config replaces `model`. runs/demo missing: a fresh `model`.
    base: str = "runs/demo"
    sft: SftDataConfig = field(default_factory=SftDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    # Passes over the training rows; sets max_steps when given.
    epochs: float | None = None
    # Greedy answers to this many validation prompts, logged at every validation.
    samples: int = 3
    sample_max_new_tokens: int = 48

    def validate(self, world_size: int) -> int:
        self.sft.validate()
        self.lora.validate()
        self.task.validate()
        if self.lora.enabled and self.task.head and not self.lora.merge:
            raise ConfigError(
                f"lora.merge=false with task.type={self.task.type}: the head is trained whole, "
                "not as an adapter; keep lora.merge=true"
            )
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs={self.epochs} must be > 0")
        if self.samples < 0:
            raise ConfigError(f"samples={self.samples} must be >= 0")
        return super().validate(world_size)


@dataclass
class PlotConfig:
    run_dir: str = "runs/tiny"


def register_configs() -> None:
    """Register the schemas so that YAML files are checked against them."""
    from hydra.core.config_store import ConfigStore  # only the `neo` command needs Hydra

    cs = ConfigStore.instance()
    cs.store(name="prep_schema", node=PrepConfig)
    cs.store(name="info_schema", node=InfoConfig)
    cs.store(name="convert_schema", node=ConvertConfig)
    cs.store(name="verify_schema", node=VerifyConfig)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="plot_schema", node=PlotConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="sft_schema", node=SftConfig)
    from launch.config import LaunchEntry  # torch-free, like this file

    cs.store(name="launch_schema", node=LaunchEntry)
