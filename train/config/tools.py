"""The schemas of the verbs that plan, convert and check (neo info, export, import, verify,
plot). torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from train.config.model import ModelConfig
from train.config.rules import Schema, require_choice, require_positive, require_unread
from train.errors import ConfigError

EXPORT_FORMATS = ("hf", "onnx")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
ONNX_OPSETS = range(18, 24)  # what torch's exporter writes
# The run `make demo` writes: what every verb reads when given no path.
DEMO_RUN = "runs/demo"


@dataclass
class InfoConfig(Schema):
    model: ModelConfig = field(default_factory=ModelConfig)
    world_size: int = 1
    # Sequence length for the attention FLOPs; None means max_position_embeddings.
    seq_len: int | None = None

    def validate(self) -> InfoConfig:
        self.model.validate()
        require_positive("world_size", self.world_size)
        if self.seq_len is not None:
            require_positive("seq_len", self.seq_len)
            self.model.check_sequence_length(self.seq_len)
        return self


@dataclass
class ExportConfig(Schema):
    """`neo export`: any checkpoint -> a verified Hugging Face (or ONNX) directory."""

    input: str = "runs/demo"
    output: str = "exports/demo"  # beside the run, never inside an input
    overwrite: bool = False
    # Cast the weights (float32, bfloat16, float16); None keeps them as stored.
    dtype: str | None = None
    # A tokenizer (file, directory, gpt2) to export with the model; null: the checkpoint's own.
    tokenizer: str | None = None
    # hf (a GPTNeoForCausalLM directory) | onnx (ONNX graphs for ONNX Runtime).
    format: str = "hf"
    # hf: a `neo eval` results.json for the model card (default: one inside the run).
    eval_results: str | None = None
    # hf: weights above this size are sharded with an index, as save_pretrained does.
    max_shard_size: str = "5GB"
    # hf: the verification before the rename also runs the card's pipeline usage (neo verify's).
    usage: bool = True
    with_past: bool = True  # onnx: also decoder_with_past.onnx, the key/value cache form
    opset: int = 20  # onnx

    def validate(self) -> ExportConfig:
        _require_paths(self.input, self.output)
        require_choice("format", self.format, EXPORT_FORMATS)
        if self.dtype is not None:
            require_choice("dtype", self.dtype, EXPORT_DTYPES)
        if self.format == "hf":
            onnx_only = ("with_past", "opset")
            require_unread("", self, ExportConfig(), "format=onnx's setting", onnx_only)
            return self
        hf_only = ("eval_results", "max_shard_size", "usage")
        require_unread("", self, ExportConfig(), "format=hf's setting", hf_only)
        if self.dtype not in (None, "float32", "float16"):
            raise ConfigError(
                f"dtype={self.dtype}: ONNX export writes float32 or float16 (ONNX Runtime's CPU "
                "provider has no bfloat16 kernels for this graph)"
            )
        if self.opset not in ONNX_OPSETS:
            raise ConfigError(
                f"opset={self.opset}: torch's ONNX exporter writes opsets 18 to 23 (default 20)"
            )
        return self


@dataclass
class ImportConfig(Schema):
    """`neo import`: a Hugging Face GPT-Neo directory -> a neotrain checkpoint."""

    input: str = "runs/demo/hf"
    output: str = "runs/demo/imported"
    overwrite: bool = False

    def validate(self) -> ImportConfig:
        _require_paths(self.input, self.output)
        return self


@dataclass
class VerifyConfig(Schema):
    """`neo verify DIR`: check an exported directory (train/checkpoints/verify.py)."""

    dir: str = "exports/demo"
    # Also run the card's pipeline("text-generation") usage (seconds).
    usage: bool = True

    def validate(self) -> VerifyConfig:
        if not self.dir:
            raise ConfigError("dir= is required: the exported directory to check")
        return self


@dataclass
class PlotConfig(Schema):
    run_dir: str = DEMO_RUN

    def validate(self) -> PlotConfig:
        if not self.run_dir:
            raise ConfigError("run_dir= is required: the run directory to plot")
        return self


def _require_paths(input: str, output: str) -> None:
    if not input:
        raise ConfigError("input= is required: the directory to read")
    if not output:
        raise ConfigError("output= is required: the directory to write")
