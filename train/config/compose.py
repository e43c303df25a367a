"""A verb's config composed with Hydra from `configs/`, and every way composition can fail as
one line naming the key (train/cli.py prints it and exits 2). torch-free, so that `neo launch`
composes exactly what the verb will.

Hydra alone accepts a key the schema does not have when it is written `+key=value`, and words
its own errors over several lines; so every override's key is checked against the verb's
schema first (with the nearest valid key, or a word on where a key of another verb belongs),
then the config is composed, once per job of a sweep.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import re
import typing
from pathlib import Path
from typing import Any

from train.config.schemas import SCHEMAS, register_configs
from train.config.shell import hydra_quoted
from train.errors import ConfigError

CONFIG_MODULE = "configs"
# Sweeps larger than this are checked on their first jobs and on each value alone.
MAX_JOBS_CHECKED = 64

# Keys users reach for that a verb does not have, and where what they meant lives.
HINTS: dict[str, dict[str, str]] = {
    "sft": {
        "data": "neo sft reads its data from sft.path (sft.format, sft.validation_path)",
        "eval": "neo sft runs no benchmarks while it trains: run neo eval checkpoint=RUN_DIR "
        "tasks=[...] on its model",
        "eval_tokens": "neo sft validates on sft.validation_path or a seeded "
        "sft.validation_fraction of sft.path",
        "task": "the task head is head= now (head=classification, head.lm_coef=0.5)",
    },
    "dpo": {
        "sft": "neo dpo reads preference pairs from dpo.path (dpo.validation_path)",
        "data": "neo dpo reads preference pairs from dpo.path (dpo.validation_path)",
        "head": "neo dpo tunes the language model; a reward model is not built yet",
        "task": "neo dpo tunes the language model; a reward model is not built yet",
        "eval": "neo dpo runs no benchmarks while it trains: run neo eval checkpoint=RUN_DIR "
        "tasks=[...] on its model",
    },
    "train": {
        "base": "fine-tuning a checkpoint is neo sft base=PATH",
        "sft": "fine-tuning data is neo sft's (neo sft sft.path=...)",
        "lora": "LoRA is neo sft's (neo sft lora.r=8)",
        "head": "task heads are neo sft's (neo sft head=classification)",
        "epochs": "neo train counts max_steps",
        "eval.val_tokens": "neo train's validation budget is eval_tokens",
        "eval.val_seed": "neo train's validation sample is seeded by data.seed",
        "eval.batch_size": "neo train packs benchmark batches by eval.batch_tokens",
        "eval.output": "neo train logs benchmarks to run_dir/metrics.jsonl",
    },
    "eval": {"model": "the checkpoint is checkpoint= now (neo eval checkpoint=PATH)"},
    "generate": {"model": "the checkpoint is checkpoint= now (neo generate checkpoint=PATH)"},
}


# Keys whose value is free text, taken as typed (quoted for Hydra by quote_text): a prompt may
# hold commas and quotes, which Hydra's override grammar would read as syntax. `neo VERB` and
# `neo launch VERB` both apply it, so that they accept the same command lines.
TEXT_KEYS: dict[str, tuple[str, ...]] = {"generate": ("prompt",)}


def quote_text(override: str, text_keys: tuple[str, ...]) -> str:
    """`prompt=Hello, I'm here` -> `prompt='Hello, I\\'m here'` (Hydra's quoted string), unless
    the value is quoted already."""
    key, sep, value = override.partition("=")
    if not sep or key not in text_keys:
        return override
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return override
    return f"{key}={hydra_quoted(value)}"


def override_key(override: str) -> str:
    """`+model.hidden_size=64` -> model.hidden_size (`~key`, `++key`, `key@pkg` too)."""
    key = override.lstrip("~+").split("=", 1)[0]
    return key.split("@", 1)[0].strip()


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema, nested ones included."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        out.append(prefix + f.name)
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out += schema_keys(kind, f"{prefix}{f.name}.")
    return out


def _has_key(schema: type, key: str) -> bool:
    """Whether `key` (dotted) is in the schema. Below a mapping (deepspeed.extra, eval's
    task.<name>, ...) or a list (data.blend) any key is the field's own business."""
    node: Any = schema
    for part in key.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return True
        if part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = typing.get_type_hints(node)[part]
    return True


def check_key(verb: str, key: str) -> None:
    """A ConfigError naming `key` when neo `verb` does not read it."""
    schema = SCHEMAS[verb]
    if key.startswith("hydra") or "/" in key or _has_key(schema, key):
        return
    hints = HINTS.get(verb, {})
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in hints:
            raise ConfigError(f"{key} is not a key of neo {verb}: {hints['.'.join(parts[:n])]}")
    nearest = difflib.get_close_matches(key, schema_keys(schema), n=1, cutoff=0.6)
    advice = f"did you mean {nearest[0]}?" if nearest else f"see neo {verb} --cfg job"
    raise ConfigError(f"{key} is not a key of neo {verb}: {advice}")


def compose(verb: str, overrides: list[str], hydra_config: bool = False):
    """The verb's DictConfig with `overrides` applied (one job: no sweeps), or a ConfigError
    of one line. `hydra_config`: with Hydra's own node (for its run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    for override in overrides:
        check_key(verb, override_key(override))
    register_configs()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        try:
            return hydra_compose(verb, overrides=overrides, return_hydra_config=hydra_config)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(error_line(e)) from None


def check(verb: str, overrides: list[str], multirun: bool) -> Path | None:
    """Compose every job the command line asks for (each combination of a sweep's values),
    so that no mistake reaches Hydra's own error handling. Returns the directory Hydra will
    create for a single run (hydra.run.dir), None for a sweep."""
    if not multirun:
        return Path(compose(verb, overrides, hydra_config=True).hydra.run.dir)
    for job in jobs(overrides):
        compose(verb, job)
    return None


def jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of each job of a sweep (`a=1,2 b=x,y`: four jobs); every value alone as
    well past MAX_JOBS_CHECKED combinations."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(error_line(e)) from None
    choices = []
    for raw, o in zip(overrides, parsed, strict=True):
        if o.is_sweep_override():
            key = raw.split("=", 1)[0]
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([raw])
    combos = [list(c) for c in itertools.islice(itertools.product(*choices), MAX_JOBS_CHECKED)]
    if math.prod(map(len, choices)) <= MAX_JOBS_CHECKED:
        return combos
    singles = [
        [values[0] if j != i else v for j, values in enumerate(choices)]
        for i, values in enumerate(choices)
        for v in values[1:]
    ]
    return combos + [job for job in singles if job not in combos]


def error_line(e: Exception) -> str:
    """Hydra's and OmegaConf's multi-line errors as one line that names the key."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(e, MissingConfigException) and e.options is not None:
        found = re.search(r"Could not find '([^']+)'", str(e))
        group, _, option = (found.group(1) if found else "?").rpartition("/")
        return (
            f"{group}={option}: no such option; configs/{group}/ has {', '.join(sorted(e.options))}"
        )
    if isinstance(e, OverrideParseException):
        return f"{e.override}: {_first_line(e.message)}"
    cause = e.__cause__ or e.__context__
    merging = re.match(r"Error merging override (.+)", str(e))
    if merging and cause is not None:
        return f"{merging.group(1)}: {_first_line(getattr(cause, 'msg', str(cause)))}"
    return _first_line(str(e))


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), text)


def to_schema(cfg):
    """A composed DictConfig as its schema's dataclass (interpolations resolved)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key}: {_first_line(e.msg)}" if key else error_line(e)) from None
