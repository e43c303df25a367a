"""neotrain model checkpoints: one directory, readable without neotrain's help.

    CKPT_DIR/
      neotrain.json       format version, the ModelConfig, the tokenizer's eod token
      model.safetensors   the state dict (lm_head.weight omitted: it is wte.weight)
      tokenizer/          tokenizer.json (absent: the bundled GPT-2 tokenizer)

`neo import` writes one from a Hugging Face directory, `neo train` at the end of a run;
train/checkpoints/load.py reads one (or any other kind of checkpoint) into a model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data_prep.files import OutputKind, atomic_dir, check_format, marked_by, when_full
from data_prep.tokenizers import LoadedTokenizer, load_tokenizer
from train.checkpoints.checksums import check_if_listed
from train.config.model import ModelConfig
from train.errors import CheckpointError
from train.model.gpt import GPT, TIED
from train.model.heads import TaskHead

FORMAT = "neotrain-model"
FORMAT_VERSION = 1
CONFIG_FILE = "neotrain.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def materialize(value) -> torch.Tensor:
    """A value of a state dict in memory: a tensor, or a lazy one (DeepSpeed's gathered ZeRO-3
    tensors, train/engine.consolidated_state_dict with lazy=True) assembled now."""
    return value if isinstance(value, torch.Tensor) else value.contiguous()


def model_config_from_dict(d: dict, source: str) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CheckpointError(f"{source}: unknown model config keys {unknown}")
    return ModelConfig(**d).validate()


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


# What overwrite=true may replace where a neotrain checkpoint is written.
CHECKPOINT_KIND = OutputKind(f"a neotrain checkpoint ({CONFIG_FILE})", marked_by(CONFIG_FILE))


def save_checkpoint(
    out_dir: str | Path,
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer: LoadedTokenizer | None,
    overwrite: bool = False,
    head: TaskHead | None = None,
    inputs: tuple[str | Path, ...] = (),
) -> Path:
    """Write a checkpoint atomically: it appears under out_dir only when complete. `head`: a
    task model's (neo sft task=...), whose weights are `score.weight`."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k != TIED}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": asdict(config),
        "tokenizer": {"eod_token": tokenizer.eod_token, "name": tokenizer.name}
        if tokenizer
        else None,
        **({"head": asdict(head)} if head else {}),
    }
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with (
        when_full(out_dir, lambda: needed),
        atomic_dir(out_dir, overwrite, kind=CHECKPOINT_KIND, inputs=inputs) as tmp,
    ):
        save_tensors(tensors, tmp / WEIGHTS_FILE)
        if tokenizer is not None:
            (tmp / TOKENIZER_DIR).mkdir()
            tokenizer.tokenizer.save(str(tmp / TOKENIZER_DIR / "tokenizer.json"))
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def save_tensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """safetensors' save_file, with the permissions the user's umask gives every other file
    (safetensors creates its file readable by its owner only)."""
    save_file(tensors, str(file), metadata={"format": "pt"})
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(file, 0o666 & ~mask)


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and the state dict (with lm_head.weight, tied) of a checkpoint."""
    path = Path(path)
    check_if_listed(path)
    meta = _read_meta(path)
    config = model_config_from_dict(meta["model"], str(path / CONFIG_FILE))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} is missing")
    state = read_weights(weights)
    if "transformer.wte.weight" in state:
        state[TIED] = state["transformer.wte.weight"]
    check_state(config, state, str(path))
    return config, state


def checkpoint_tokenizer(path: str | Path) -> LoadedTokenizer:
    """The tokenizer saved with a checkpoint, or the bundled GPT-2 one if none was saved."""
    path = Path(path)
    meta = _read_meta(path)
    info = meta.get("tokenizer") or {}
    if (path / TOKENIZER_DIR / "tokenizer.json").is_file():
        tok = load_tokenizer(path / TOKENIZER_DIR, eod_token=info.get("eod_token"))
        tok.name = info.get("name", tok.name)
        return tok
    return load_tokenizer("gpt2")


def check_state(config: ModelConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor the config's model has, in its shape, and no other (a task head's `score.`
    aside): a directory whose weights do not fit its config is named here, not written on as a
    checkpoint that fails later."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("score.")}
    wrong = [
        f"{k} is {have[k]}, the config makes {expected[k]}"
        for k in sorted(expected.keys() & have.keys())
        if have[k] != expected[k]
    ]
    missing, extra = sorted(expected.keys() - have.keys()), sorted(have.keys() - expected.keys())
    problems = [
        *([f"{len(missing)} missing ({', '.join(missing[:3])}...)"] if missing else []),
        *([f"{len(extra)} not in the model ({', '.join(extra[:3])}...)"] if extra else []),
        *wrong[:3],
    ]
    if problems:
        raise CheckpointError(f"{source}: the weights do not fit its config: {'; '.join(problems)}")


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a CheckpointError naming it when it is truncated or corrupt."""
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors' errors (header, size) have no common base class
        raise CheckpointError(
            f"{file}: cannot be read as safetensors, truncated or corrupt ({e})"
        ) from None


def checkpoint_head(path: str | Path) -> TaskHead | None:
    """A task model's head description, or None for a language model."""
    head = _read_meta(Path(path)).get("head")
    return TaskHead(**head) if head else None


def _read_meta(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: not a neotrain checkpoint ({CONFIG_FILE} is missing)")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from e
    check_format(meta, FORMAT, FORMAT_VERSION, file, CheckpointError)
    return meta
