"""`neo <verb> [hydra overrides]`: one console script, one Hydra app per verb.

Each verb has a primary config `configs/<verb>.yaml` checked against its schema
(train/config/); the overrides are checked and the config composed first
(train/config/compose.py), so that every mistake is one line naming the key and exit 2. The
verb's module then receives its schema's dataclass, resolves it once and runs
(train/verbs/<verb>.py `main`).

The command itself imports no torch: each verb's module (and with it torch, DeepSpeed,
transformers) is imported only after its config composed.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from train.config import compose
from train.config.compose import TEXT_KEYS, quote_text
from train.config.shell import override, verify_positional
from train.distributed.ranks import quiet_other_ranks, ranks_from_env
from train.errors import ConfigError, Interrupted, NeoError


@dataclass(frozen=True)
class Verb:
    module: str  # train.verbs.<name>, whose main(cfg) runs the verb
    help: str
    # Keys whose value is free text, taken as typed (train/config/compose.py TEXT_KEYS).
    text_keys: tuple[str, ...] = ()


VERBS = {
    "prep": Verb(
        "train.verbs.prep",
        "tokenize a corpus into Megatron-compatible token shards + manifest (input= output=)",
    ),
    "train": Verb(
        "train.verbs.train",
        "pretrain a causal LM with DeepSpeed ZeRO; resumes from the run's last checkpoint",
    ),
    "sft": Verb(
        "train.verbs.sft",
        "fine-tune a checkpoint on instruction, completion or chat data (base= sft.path=)",
    ),
    "dpo": Verb(
        "train.verbs.dpo",
        "preference-tune a checkpoint with DPO on chosen/rejected pairs (base= dpo.path=)",
    ),
    "plot": Verb("train.verbs.plot", "draw the loss curve of a run into <run_dir>/loss.png"),
    "info": Verb(
        "train.verbs.info",
        "parameters, FLOPs per token and ZeRO memory per device of a model size (model=NAME)",
    ),
    "import": Verb(
        "train.verbs.import_hf",
        "read a Hugging Face GPT-Neo directory into a neotrain checkpoint (input= output=)",
    ),
    "eval": Verb(
        "train.verbs.eval",
        "benchmark a checkpoint as lm-evaluation-harness does (checkpoint= tasks=[...])",
    ),
    "generate": Verb(
        "train.verbs.generate",
        "continue prompts with a checkpoint: greedy, sampling, beam search (checkpoint= prompt=)",
        text_keys=TEXT_KEYS["generate"],
    ),
    "export": Verb(
        "train.verbs.export",
        "write a checkpoint as a verified Hugging Face GPTNeoForCausalLM dir (input= output=)",
    ),
    "verify": Verb(
        "train.verbs.verify",
        "check an exported directory: checksums, loading, probe logits, usage (neo verify DIR)",
    ),
}
LAUNCH_HELP = (
    "run train/sft/dpo/eval/generate here, on SLURM, over a hostfile or multi-node torchrun"
)

# Hydra's own flags, and those of them that take a value (`--cfg job`, `-p model`).
FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}
INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
ONLY_HYDRA = {
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
}


# Hydra's modes, of which a command line gives one at most.
MODES = {
    "--run": {"--run", "-r"},
    "--multirun": {"--multirun", "-m"},
    "--cfg": {"--cfg", "-c"},
    "--info": {"--info", "-i"},
    "--shell-completion": {"--shell-completion", "-sc"},
}


def usage() -> str:
    width = max(len(name) for name in VERBS)
    lines = [
        "usage: neo <verb> [key=value ...] [--help] [--cfg job] [-m key=a,b ...]",
        "",
        "GPT-Neo / GPT-3 pretraining and fine-tuning. Verbs:",
    ]
    lines += [f"  {name.ljust(width)}  {verb.help}" for name, verb in VERBS.items()]
    lines.append(f"  {'launch'.ljust(width)}  {LAUNCH_HELP}")
    lines += ["", "`neo <verb> --help` shows a verb's config; every verb runs with no arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    argv = _without_local_rank(argv)
    name = argv[0]
    if name == "verify" and len(argv) > 1 and verify_positional(argv[1]):
        argv = [name, override("dir", argv[1]), *argv[2:]]  # neo verify DIR, any path
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
    if ranks_from_env().is_main:
        print(f"neo {verb}: {getattr(error, 'prefix', 'error')}: {error}", file=sys.stderr)


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


def split_arguments(args: list[str]) -> tuple[list[str], set[str]]:
    """(the overrides, Hydra's flags) of a verb's command line."""
    overrides, flags = [], set()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            flag = arg.split("=", 1)[0]
            flags.add(flag)
            takes_value = flag in FLAGS_WITH_VALUE or (
                flag in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in INFO_VALUES
            )
            if takes_value and "=" not in arg:
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return overrides, flags


def _first_missing(directory: Path) -> Path | None:
    """The outermost folder of `directory` that does not exist yet (None: it exists)."""
    missing = None
    for folder in [directory, *directory.parents]:
        if folder.exists():
            return missing
        missing = folder
    return missing


def _remove_empty(directory: Path, up_to: Path) -> None:
    """Remove `directory` and its parents up to `up_to` while they are empty: what Hydra made
    for a run that stopped on a mistake before writing anything."""
    for folder in [directory, *directory.parents]:
        try:
            folder.rmdir()  # empty folders only
        except OSError:
            return
        if folder == up_to:
            return


def run_verb(name: str, args: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    verb = VERBS[name]
    args = [quote_text(a, verb.text_keys) for a in args]
    overrides, flags = split_arguments(args)
    made = None  # the first folder Hydra's run directory will add: removed again on a mistake
    try:
        modes = [f for f in MODES if MODES[f] & flags]
        if len(modes) > 1:  # Hydra would raise its own ValueError with a traceback
            raise ConfigError(f"{' and '.join(modes)}: give one of them")
        if not flags & ONLY_HYDRA:  # help and info print the config; there is nothing to run
            run_dir = compose.check(name, overrides, multirun=bool(flags & {"-m", "--multirun"}))
            made = run_dir and _first_missing(run_dir)
    except NeoError as e:
        _report(name, e)
        sys.exit(e.exit_code)

    @hydra.main(version_base="1.3", config_path="pkg://" + compose.CONFIG_MODULE, config_name=name)
    def app(cfg) -> None:
        try:
            config = compose.to_schema(cfg)
            quiet_other_ranks(ranks_from_env())
            importlib.import_module(verb.module).main(config)
        except NeoError as e:  # a user's mistake: one line; anything else keeps its traceback
            _report(name, e)
            if made is not None:
                _remove_empty(Path(HydraConfig.get().runtime.output_dir), made.resolve())
            sys.exit(e.exit_code)
        except KeyboardInterrupt:  # outside training's loop, or its second Ctrl-C
            _report(name, Interrupted("stopped at once (Ctrl-C); nothing more was saved"))
            sys.exit(Interrupted.exit_code)

    compose.register_configs()
    sys.argv = [f"neo {name}", *args]
    app()


if __name__ == "__main__":
    main()
