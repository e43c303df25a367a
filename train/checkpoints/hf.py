"""Hugging Face GPT-Neo interop: GPT-Neo directories to and from our config and weights
(`neo import` here; `neo export` in train/checkpoints/export.py, which reads any checkpoint first).

Parameter names already match GPTNeoForCausalLM, so conversion is mostly about what GPT-Neo
cannot say:
- `strided` layers have no GPT-Neo equivalent: export refuses and names the layers;
- GPT-3 sizes scale scores by 1/sqrt(head_dim) and GPT-Neo never does: export folds the scale
  into q_proj (q_proj has no bias, so (s*Wq x) . k == s * (Wq x . k) exactly, up to rounding);
- lm_head is tied to wte on both sides; save_pretrained omits it and so do we.
Weights are read with safetensors or torch.load(weights_only=True); no remote code is run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from data_prep.files import OutputKind, atomic_dir, check_apart, check_output_free, when_full
from data_prep.tokenizers import LoadedTokenizer, load_tokenizer, save_hf_tokenizer
from train.checkpoints.card import RunRecords, model_card
from train.checkpoints.checksums import CHECKSUMS, check_if_listed
from train.checkpoints.model_format import (
    CHECKPOINT_KIND,
    check_state,
    materialize,
    model_config_from_dict,
    read_weights,
    save_checkpoint,
    save_tensors,
)
from train.checkpoints.pickles import read_tensors
from train.config.model import ModelConfig
from train.errors import CheckpointError
from train.model.gpt import TIED
from train.model.heads import TaskHead
from train.model.sizes import count_parameters

# GPTNeoConfig fields that are ModelConfig fields of the same name and meaning.
SHARED_FIELDS = (
    "vocab_size",
    "max_position_embeddings",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "attention_types",
    "window_size",
    "activation_function",
    "layer_norm_epsilon",
    "embed_dropout",
    "resid_dropout",
    "attention_dropout",
    "initializer_range",
)

# Buffers that old GPT-Neo checkpoints carry in their state dict (masks, rebuilt on load).
IGNORED_SUFFIXES = (".attn.attention.bias", ".attn.attention.masked_bias")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


# --------------------------------------------------------------------------------------------
# config


def config_from_hf(hf: dict, source: str) -> ModelConfig:
    if hf.get("model_type") != "gpt_neo":
        raise CheckpointError(
            f"{source}: model_type is {hf.get('model_type')!r}; neotrain imports 'gpt_neo' models"
        )
    if hf.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{source}: tie_word_embeddings=false; neotrain ties lm_head to wte")
    values = {k: hf[k] for k in SHARED_FIELDS if k in hf}
    name = Path(hf.get("_name_or_path") or Path(source).parent.name).name or "imported"
    return model_config_from_dict({"name": name, **values, "scale_attn_weights": False}, source)


def config_to_hf(
    config: ModelConfig,
    tokenizer: LoadedTokenizer | None,
    dtype: torch.dtype,
    head: TaskHead | None = None,
):
    from transformers import GPTNeoConfig  # transformers takes seconds to import

    kinds = config.layer_kinds()
    strided = [i for i, kind in enumerate(kinds) if kind == "strided"]
    if strided:
        raise CheckpointError(
            f"model {config.name!r} has strided attention in layers {strided}; GPT-Neo has only "
            "global and local layers, so this model cannot be exported as GPTNeoForCausalLM"
        )
    fields = {k: getattr(config, k) for k in SHARED_FIELDS}
    eod = tokenizer.eod_id if tokenizer is not None else None
    if head is None:
        # What `pipeline("text-generation")` applies, as GPT-2's and GPT-Neo's configs say.
        fields["task_specific_params"] = {"text-generation": {"do_sample": True, "max_length": 50}}
    else:
        # GPTNeoForSequenceClassification reads the last token that is not padding: the
        # classify token, when inputs are built as neo sft builds them (a reward model: the
        # last token before the closing end-of-text, where it was trained to read it).
        fields |= dict(
            num_labels=head.num_outputs,
            pad_token_id=eod,
            architectures=["GPTNeoForSequenceClassification"],
            task_specific_params={"neotrain_task": asdict(head)},
        )
        if head.type not in ("multiple_choice", "reward"):  # one score, not classes
            fields |= dict(
                id2label=dict(enumerate(head.labels)),
                label2id={name: i for i, name in enumerate(head.labels)},
                problem_type="single_label_classification",
            )
    return GPTNeoConfig(
        **{"architectures": ["GPTNeoForCausalLM"], **fields},
        bos_token_id=eod,
        eos_token_id=eod,
        tie_word_embeddings=True,
        dtype=str(dtype).removeprefix("torch."),
    )


# --------------------------------------------------------------------------------------------
# weights


def read_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory: one file or shards listed in an *.index.json."""
    for name in WEIGHT_FILES:
        index = path / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_weight_file(path / shard))
            return state
        if (path / name).is_file():
            return _read_weight_file(path / name)
    raise CheckpointError(f"{path}: no weights ({' or '.join(WEIGHT_FILES)}, or a sharded index)")


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        return read_weights(file)
    return read_tensors(file)


def state_dict_from_hf(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    wte = state.get("transformer.wte.weight")
    if wte is None:
        raise CheckpointError(f"{source}: transformer.wte.weight is missing")
    head = state.get(TIED)
    if head is not None and not torch.equal(head, wte):
        raise CheckpointError(f"{source}: lm_head.weight differs from transformer.wte.weight")
    state[TIED] = wte
    return state


def hf_tensor(config: ModelConfig, key: str, tensor: torch.Tensor, dtype: torch.dtype):
    """One tensor as model.safetensors holds it (attention scaling folded into q_proj)."""
    if config.scale_attn_weights and key.endswith("attn.attention.q_proj.weight"):
        tensor = tensor.float() * config.attention_scale
    return tensor.to(dtype).contiguous()


def parse_size(size: str | int) -> int:
    """Bytes of "5GB", "500MB", "10KB" (decimal units, as save_pretrained reads them) or an int."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    raise CheckpointError(f"max_shard_size={size!r}: expected bytes or a size like 5GB, 500MB")


def write_weights(
    directory: Path,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    max_shard_size: int,
) -> None:
    """The weights as model.safetensors, or above max_shard_size as save_pretrained shards them
    (model-0000i-of-0000n.safetensors + model.safetensors.index.json). Tensors are converted
    one at a time and taken out of `state` as they are, so the export never holds a second copy
    of the model: what `state` still has, plus the shard being filled. `state` may be lazy
    (train/engine.consolidated_state_dict): each tensor is then read as it is converted."""
    keys = [k for k in state if k != TIED]
    sizes = {k: state[k].shape.numel() * dtype.itemsize for k in keys}
    shards: list[list[str]] = [[]]
    filled = 0
    for key in keys:
        if shards[-1] and filled + sizes[key] > max_shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += sizes[key]
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        tensors = {}
        for k in shard:  # each source tensor released as soon as it is converted
            if state.get(TIED) is state[k]:
                del state[TIED]
            tensors[k] = hf_tensor(config, k, materialize(state.pop(k)), dtype)
            weight_map[k] = name
        save_tensors(tensors, directory / name)
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_hf_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    check_if_listed(path)
    config_file = path / "config.json"
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}:{e.lineno}: not valid JSON ({e.msg})") from e
    config = config_from_hf(hf, str(config_file))
    state = state_dict_from_hf(read_hf_state_dict(path), str(path))
    check_state(config, state, str(path))
    return config, state


# --------------------------------------------------------------------------------------------
# the two verbs


def is_export(path: Path) -> bool:
    """A directory `neo export` wrote: a Hugging Face config and the checksums of its files."""
    return (path / "config.json").is_file() and (path / CHECKSUMS).is_file()


EXPORT_KIND = OutputKind(f"a `neo export` directory (config.json, {CHECKSUMS})", is_export)


def import_hf(
    input_dir: str | Path, output_dir: str | Path, overwrite: bool = False
) -> ModelConfig:
    """A Hugging Face GPT-Neo directory -> a neotrain checkpoint (tokenizer included)."""
    input_dir = Path(input_dir)
    check_apart(output_dir, [input_dir])
    check_output_free(Path(output_dir), overwrite, CHECKPOINT_KIND)
    if not is_hf_dir(input_dir):
        raise CheckpointError(f"{input_dir}: not a Hugging Face model directory (no config.json)")
    config, state = read_hf_dir(input_dir)
    tokenizer = hf_dir_tokenizer(input_dir)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{input_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {config.vocab_size}"
        )
    save_checkpoint(output_dir, config, state, tokenizer, overwrite, inputs=(input_dir,))
    return config


def write_hf_dir(
    output_dir: str | Path,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer: LoadedTokenizer | None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    source: str = "the model",
    head: TaskHead | None = None,
    finish: Callable[[Path, torch.dtype], None] | None = None,
    records: RunRecords | None = None,
    max_shard_size: str | int = "5GB",
    inputs: tuple[str | Path, ...] = (),
) -> None:
    """A directory GPTNeoForCausalLM and AutoTokenizer load offline, written atomically;
    `source` names what the weights came from, in errors. With a task `head`: a
    GPTNeoForSequenceClassification directory (score.weight, id2label). tokenizer None: no
    tokenizer files. `finish(tmp, dtype)` runs on the complete directory before it is renamed
    into place (checksums, probe, verification); raising leaves nothing behind. `records`: what
    the model card says about training and evaluation (train/checkpoints/card.py). The weights
    are taken out of `state` as they are written (write_weights): pass a dict the caller can
    give up."""
    from transformers import GenerationConfig  # transformers takes seconds to import

    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{source}: no tokenizer fits vocab_size={config.vocab_size} "
            f"({tokenizer.name} has {tokenizer.vocab_size} tokens); pass tokenizer=PATH"
        )
    dtype = dtype or state["transformer.wte.weight"].dtype
    hf_config = config_to_hf(config, tokenizer, dtype, head)  # refuses strided layers first
    eod = tokenizer.eod_id if tokenizer is not None else None
    needed = count_parameters(config).total * dtype.itemsize
    with (
        when_full(output_dir, lambda: needed),
        atomic_dir(output_dir, overwrite, kind=EXPORT_KIND, inputs=inputs) as tmp,
    ):
        hf_config.save_pretrained(str(tmp))
        write_weights(tmp, config, state, dtype, parse_size(max_shard_size))
        GenerationConfig(bos_token_id=eod, eos_token_id=eod, pad_token_id=eod).save_pretrained(
            str(tmp)
        )
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, tmp, model_max_length=config.max_position_embeddings)
        (tmp / "README.md").write_text(model_card(config, tokenizer, dtype, head, records))
        if finish is not None:
            finish(tmp, dtype)


def hf_dir_tokenizer(path: Path) -> LoadedTokenizer | None:
    """The directory's tokenizer, with its chat template when tokenizer_config.json has one
    (a string; transformers' named-template lists are not read)."""
    try:
        tokenizer = load_tokenizer(path)
    except FileNotFoundError:
        return None
    config = Path(path) / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        tokenizer.chat_template = template if isinstance(template, str) else None
    return tokenizer
