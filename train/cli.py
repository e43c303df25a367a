"""`neo <verb> [hydra overrides]`: one console script, one Hydra app per verb.

Each verb has a primary config `configs/<verb>.yaml` checked against a dataclass schema
(train/config/); the config is converted to that dataclass here, once, and the verb's `run`
function receives only the dataclass.

The command itself imports no torch: each verb's module (and with it torch, DeepSpeed,
transformers) is imported inside the function that runs that verb, after the config checked.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from dataclasses import dataclass

from train.config import (
    ConfigError,
    EvalConfig,
    GenerateConfig,
    SftConfig,
    TrainConfig,
    register_configs,
)
from train.distributed.ranks import ranks_from_env
from train.errors import NeoError

log = logging.getLogger("neo")


@dataclass(frozen=True)
class Verb:
    target: str  # "module:function" taking the verb's config dataclass
    help: str
    # Where its primary config is: verbs whose `model=` is a path use configs/path_verbs.
    config_path: str = "pkg://configs"
    # Keys whose value is free text, taken as typed (quoted for Hydra here): a prompt may hold
    # commas and quotes, which Hydra's override grammar would read as syntax.
    text_keys: tuple[str, ...] = ()


VERBS = {
    "prep": Verb(
        "train.cli:run_prep",
        "tokenize a corpus into Megatron-compatible token shards + manifest (input= output=)",
    ),
    "train": Verb(
        "train.verbs.train:run",
        "pretrain a causal LM with DeepSpeed ZeRO; resumes from the run's last checkpoint",
    ),
    "sft": Verb(
        "train.verbs.sft:run",
        "fine-tune a checkpoint on instruction, completion or chat data (base= sft.path=)",
    ),
    "plot": Verb("train.cli:run_plot", "draw the loss curve of a run into <run_dir>/loss.png"),
    "info": Verb(
        "train.verbs.info:run",
        "parameters, FLOPs per token and ZeRO memory per device of a model size (model=NAME)",
    ),
    "import": Verb(
        "train.cli:run_import",
        "read a Hugging Face GPT-Neo directory into a neotrain checkpoint (input= output=)",
    ),
    "eval": Verb(
        "train.verbs.eval:run",
        "benchmark a checkpoint as lm-evaluation-harness does (model= tasks=[...])",
        "pkg://configs.path_verbs",
    ),
    "generate": Verb(
        "train.verbs.generate:run",
        "continue prompts with a checkpoint: greedy, sampling, beam search (model= prompt=)",
        "pkg://configs.path_verbs",
        text_keys=("prompt",),
    ),
    "export": Verb(
        "train.cli:run_export",
        "write a checkpoint as a verified Hugging Face GPTNeoForCausalLM dir (input= output=)",
    ),
    "verify": Verb(
        "train.cli:run_verify",
        "check an exported directory: checksums, loading, probe logits, usage (neo verify DIR)",
    ),
}


def usage() -> str:
    width = max(len(name) for name in VERBS)
    lines = [
        "usage: neo <verb> [key=value ...] [--help] [--cfg job] [-m key=a,b ...]",
        "",
        "GPT-Neo / GPT-3 pretraining and fine-tuning. Verbs:",
    ]
    lines += [f"  {name.ljust(width)}  {verb.help}" for name, verb in VERBS.items()]
    lines.append(f"  {'launch'.ljust(width)}  run train/sft/eval/generate here, on SLURM, over a "
                 "hostfile or multi-node torchrun")  # fmt: skip
    lines += ["", "`neo <verb> --help` shows a verb's config; every verb runs with no arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    argv = _without_local_rank(argv)
    name = argv[0]
    if name == "verify" and len(argv) > 1 and "=" not in argv[1] and not argv[1].startswith("-"):
        argv = [name, f"dir={argv[1]}", *argv[2:]]  # neo verify DIR
    if name == "launch":
        from launch.cli import main as launch

        launch(argv[1:])
        return
    if name not in VERBS:
        print(f"neo: unknown verb {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    run_verb(name, argv[1:])


def _report(verb: str, error: Exception) -> None:
    """One line on stderr; from rank 0 only when several ranks hit the same error."""
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(f"neo {verb}: error: {error}", file=sys.stderr)


def _without_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; Hydra would reject it. LOCAL_RANK is in
    the environment too, which is where neotrain reads it."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg == "--local_rank" and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def run_verb(name: str, overrides: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    register_configs()
    verb = VERBS[name]
    module, function = verb.target.split(":")

    @hydra.main(version_base="1.3", config_path=verb.config_path, config_name=name)
    def app(cfg: DictConfig) -> None:
        config = OmegaConf.to_object(cfg)
        try:
            # Every rule of the config before the verb's module (torch, DeepSpeed) is imported.
            if isinstance(config, SftConfig):
                if _given("max_steps") and not _given("epochs"):
                    config.epochs = None  # a step count asked for wins over the default epoch
                config.sft.validate()  # the model is the base's: checked once it is read
                config.lora.validate()
                config.task.validate()
            elif isinstance(config, TrainConfig):
                config.validate(ranks_from_env().world_size)
            elif isinstance(config, EvalConfig | GenerateConfig):
                config.validate()
            getattr(importlib.import_module(module), function)(config)
        except NeoError as e:  # a user's mistake: one line; anything else keeps its traceback
            _report(name, e)
            sys.exit(e.exit_code)

    sys.argv = [f"neo {name}", *(quote_text(o, verb.text_keys) for o in overrides)]
    app()


def _given(key: str) -> bool:
    """Whether the command line (Hydra's task overrides) sets `key`."""
    from hydra.core.hydra_config import HydraConfig

    return any(o.lstrip("+~").split("=", 1)[0] == key for o in HydraConfig.get().overrides.task)


def quote_text(override: str, text_keys: tuple[str, ...]) -> str:
    """`prompt=Hello, I'm here` -> `prompt='Hello, I\\'m here'` (Hydra's quoted string), unless
    the value is quoted already."""
    key, sep, value = override.partition("=")
    if not sep or key not in text_keys:
        return override
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return override
    # Inside Hydra's quotes a backslash is literal except where it precedes a quote or ends the
    # string: those runs are doubled, and every quote escaped; `${` is not an interpolation.
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    escaped = escaped.replace("${", "\\${")
    return f"{key}='{escaped}'"


def run_prep(cfg) -> None:
    from data_prep.prep import prepare

    try:
        prepare(cfg)
    except KeyboardInterrupt:
        print(
            f"neo prep: interrupted; rerun the same command to continue from the shards "
            f"already complete in {cfg.output}",
            file=sys.stderr,
        )
        sys.exit(130)


def run_import(cfg) -> None:
    from train.checkpoints.hf import import_hf

    source, output = _require_paths(cfg)
    config = import_hf(source, output, overwrite=cfg.overwrite)
    log.info(
        "imported %s (%s, %d layers) from %s into the neotrain checkpoint %s",
        config.name,
        _params(config),
        config.num_layers,
        source,
        output,
    )


def run_export(cfg) -> None:
    import torch

    from train.checkpoints.export import export_hf
    from train.checkpoints.load import require_model

    source, output = _require_paths(cfg)
    if source == "runs/demo":
        require_model(source)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype={cfg.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    if cfg.format not in ("hf", "onnx"):
        raise ConfigError(f"format={cfg.format!r}: expected hf or onnx")
    if cfg.format == "onnx":
        from train.checkpoints.export import export_onnx_dir

        config = export_onnx_dir(source, output, overwrite=cfg.overwrite, dtype=dtype,
                                 with_past=cfg.with_past, opset=cfg.opset,
                                 tokenizer=cfg.tokenizer)  # fmt: skip
    else:
        config = export_hf(source, output, overwrite=cfg.overwrite, dtype=dtype,
                           tokenizer=cfg.tokenizer, eval_results=cfg.eval_results,
                           max_shard_size=cfg.max_shard_size, usage=cfg.usage)  # fmt: skip
    log.info(
        "exported %s (%s) to %s, verified (its README.md says how to load it); check it again "
        "with neo verify %s",
        config.name,
        _params(config),
        output,
        output,
    )


def run_verify(cfg) -> None:
    from train.checkpoints.verify import verify

    for line in verify(cfg.dir, usage=cfg.usage):
        log.info("ok  %s", line)
    log.info("%s: verified", cfg.dir)


def run_plot(cfg) -> None:
    from train.loop.metrics import plot_run

    log.info("wrote %s", plot_run(cfg.run_dir))


def _require_paths(cfg) -> tuple[str, str]:
    if not cfg.input:
        raise ConfigError("input= is required: the directory to read")
    if not cfg.output:
        raise ConfigError("output= is required: the directory to write")
    return cfg.input, cfg.output


def _params(config) -> str:
    from train.verbs.info import count_parameters

    return f"{count_parameters(config).total / 1e6:,.1f}M parameters"


if __name__ == "__main__":
    main()
