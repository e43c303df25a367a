"""One loader for every kind of checkpoint a user can point at:

- a neotrain model checkpoint (train/checkpoints/model_format.py: neotrain.json +
  model.safetensors),
- a `neo train` run directory, its checkpoints/ folder or one DeepSpeed checkpoint of it
  (train/checkpoints/run_format.py; any ZeRO stage, consolidated with DeepSpeed's
  zero_to_fp32: train/checkpoints/zero.py),
- a Hugging Face GPT-Neo directory (train/checkpoints/hf.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_prep.tokenizers import LoadedTokenizer, load_tokenizer
from train.checkpoints import run_format as run_checkpoints
from train.checkpoints.hf import hf_dir_tokenizer, is_hf_dir, read_hf_dir
from train.checkpoints.model_format import (
    CONFIG_FILE,
    checkpoint_head,
    checkpoint_tokenizer,
    is_checkpoint,
    model_config_from_dict,
    read_checkpoint,
)
from train.checkpoints.zero import consolidated_state_dict
from train.config.evaluation import CheckpointSource
from train.config.finetune import LoraConfig
from train.config.model import ModelConfig
from train.errors import CheckpointError, ConfigError, NotFound
from train.model import lora
from train.model.gpt import GPT, TIED
from train.model.heads import TaskHead

HEAD_PREFIX = "score."  # a task model's head, as GPTNeoForSequenceClassification names it


def read_training_checkpoint(
    tag_dir: Path, lazy: bool = False
) -> tuple[ModelConfig, dict[str, torch.Tensor], LoadedTokenizer]:
    """Consolidate a DeepSpeed checkpoint of `neo train` (any ZeRO stage) into one state dict
    (`lazy`: see train/engine.consolidated_state_dict; a LoRA run's is merged in memory)."""
    saved = run_checkpoints.read_state(tag_dir)
    config = model_config_from_dict(saved["model"], str(tag_dir / run_checkpoints.STATE_FILE))
    state = consolidated_state_dict(tag_dir.parent, tag_dir.name, lazy and not saved.get("lora"))
    if saved.get("lora"):  # a LoRA run's checkpoint: the model it computes, adapters merged
        state = lora.merge(state, LoraConfig(**saved["lora"]))
    state[TIED] = state["transformer.wte.weight"]
    tokenizer = load_tokenizer(
        tag_dir / run_checkpoints.TOKENIZER_FILE, eod_token=saved["eod_token"]
    )
    tokenizer.name = saved.get("tokenizer_name", tokenizer.name)
    return config, state, tokenizer


def read_any(
    path: str | Path, lazy: bool = False
) -> tuple[ModelConfig, dict[str, torch.Tensor], LoadedTokenizer | None]:
    """Model config, state dict and tokenizer of any checkpoint this module reads. `lazy`: a
    DeepSpeed checkpoint's tensors are read as they are asked for (train/checkpoint.materialize);
    for a streaming export."""
    path = resolve_run(Path(path))
    if is_checkpoint(path):
        config, state = read_checkpoint(path)
        return config, state, checkpoint_tokenizer(path)
    if (tag_dir := run_checkpoints.find(path)) is not None:
        return read_training_checkpoint(tag_dir, lazy)
    if is_hf_dir(path):
        config, state = read_hf_dir(path)
        return config, state, hf_dir_tokenizer(path)
    raise CheckpointError(
        f"{path}: not a neotrain checkpoint ({CONFIG_FILE}), a neo train run or checkpoint "
        "(checkpoints/latest, trainer_state.json), or a Hugging Face directory (config.json)"
    )


def resolve_run(path: Path) -> Path:
    """A run directory means its final model (run_dir/model) when that is newer than its last
    checkpoint (a finished run), else the checkpoint (a run still going, or resumed past its
    end); any other path means itself."""
    final = path / "model"
    if is_checkpoint(path) or not is_checkpoint(final):
        return path
    tag_dir = run_checkpoints.find(path)
    if tag_dir is None:
        return final
    newest = (tag_dir / run_checkpoints.STATE_FILE).stat().st_mtime
    return final if (final / CONFIG_FILE).stat().st_mtime >= newest else path


def read_head(path: str | Path) -> TaskHead | None:
    """The task head (neo sft task=...) of a neotrain checkpoint or training checkpoint, or
    None: a language model (Hugging Face directories are read as language models)."""
    path = resolve_run(Path(path))
    if is_checkpoint(path):
        return checkpoint_head(path)
    if (tag_dir := run_checkpoints.find(path)) is not None:
        head = run_checkpoints.read_state(tag_dir).get("head")
        return TaskHead(**head) if head else None
    return None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A GPT from any checkpoint this module reads."""
    config, state, _ = read_any(path)
    return model_from_state(config, state).to(device)


def model_from_state(
    config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> GPT:
    """A GPT holding `state`'s tensors themselves (built on the meta device: no second copy;
    `dtype`: cast first). A task model's head (`score.weight`) is left out: its language model
    is what loads."""
    state = {
        k: v if dtype is None else v.to(dtype)
        for k, v in state.items()
        if not k.startswith(HEAD_PREFIX)
    }
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    return model


def require_checkpoint(path: str, key: str) -> None:
    """NotFound naming the key (checkpoint=, input=, base=) when `path` does not exist."""
    if not Path(path).exists():
        hint = f": make one with `make demo`, or pass {key}=PATH" if path == "runs/demo" else ""
        raise NotFound(f"{key}={path} does not exist{hint}")


def source_tokenizer(
    source: CheckpointSource, config: ModelConfig, found: LoadedTokenizer | None
) -> LoadedTokenizer:
    """`tokenizer=` if given, else the checkpoint's own; it must fit the model's vocabulary."""
    tokenizer = load_tokenizer(source.tokenizer) if source.tokenizer else found
    if tokenizer is None:
        raise NotFound(
            f"{source.checkpoint} has no tokenizer; pass tokenizer=gpt2 (or a tokenizer.json or "
            "directory)"
        )
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"the tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens, more than the "
            f"model's vocab_size={config.vocab_size}: its ids would index past the embedding"
        )
    return tokenizer
