"""`neo launch VERB [launcher=NAME] [launch.KEY=VALUE ...] [VERB's overrides ...]`

Runs a verb that runs a model (train, sft, dpo, eval, generate) here, on SLURM, through the
deepspeed launcher over a hostfile, or as a multi-node torchrun, with every other override
passed to the verb unchanged. The verb's config is composed and resolved here first, as the verb
will, so a bad override or a world size that does not fit the batch fails before anything is
submitted. Torch-free: it
runs on a login node without torch.

    neo launch train model=gpt_neo_1.3b deepspeed=zero2 launcher=slurm launch.nodes=4 \\
        launch.gpus_per_node=8 launch.partition=gpu launch.time=24:00:00 launch.account=lm
    neo launch train launcher=slurm launch.dry_run=true ...      # print the script only
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

from data_prep.files import atomic_write_text
from launch import scripts
from launch.config import LAUNCHERS, LaunchConfig, LaunchEntry
from launch.quoting import hydra_path, one_line, shell_join, shell_word
from train.config import compose
from train.config.compose import TEXT_KEYS, error_line, override_key, quote_text
from train.config.resolve import (
    World,
    resolve_dpo,
    resolve_eval,
    resolve_generate,
    resolve_sft,
    resolve_train,
)
from train.errors import ConfigError, NeoError, NotFound

LAUNCHABLE = ("train", "sft", "dpo", "eval", "generate")
RESUMABLE = ("train", "sft", "dpo")


def main(argv: list[str]) -> None:
    try:
        run(argv)
    except NeoError as e:
        print(f"neo launch: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def usage() -> str:
    settings = "\n".join(
        f"  launch.{f.name}={_default(f)}"
        for f in dataclasses.fields(LaunchConfig)
        if f.name != "launcher"
    )
    return f"""usage: neo launch VERB launcher=NAME [launch.KEY=VALUE ...] [VERB's overrides ...]
       neo launch prep launcher=slurm launch.array=N input=... output=... [neo prep's overrides]
       neo launch status sweep_dir=DIR | launch_dir=DIR [resubmit=true]

Runs neo VERB ({", ".join(LAUNCHABLE)}) on SLURM, over a DeepSpeed hostfile, as a multi-node
torchrun, or here; every override that is not launcher= or launch.* goes to the verb as typed
(`neo VERB --help` shows its config). The verb's config is composed and checked for the world
the job will start before anything is written or submitted.

launcher= (required): slurm, hostfile, torchrun, local (this machine), or a site preset of
configs/launcher/.  launch.dry_run=true prints the script or commands and runs nothing.

launch.KEY settings and their defaults (launch/config.py):
{settings}"""


def _default(f: dataclasses.Field) -> object:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "null" if f.default is None else f.default


def run(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return
    if argv and argv[0] == "status":
        from launch.status import status

        status(argv[1:])
        return
    if not argv or argv[0] not in (*LAUNCHABLE, "prep"):
        got = f"{argv[0]!r}" if argv else "nothing"
        raise ConfigError(
            f"neo launch VERB ...: VERB must be one of prep, {', '.join(LAUNCHABLE)} (got {got}); "
            "neo launch --help says more"
        )
    verb, rest = argv[0], argv[1:]
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        raise ConfigError(
            f"{flags[0]}: neo launch takes key=value overrides only (Hydra's flags are "
            f"neo {verb}'s: run neo {verb} {flags[0]} ...)"
        )
    mine = [
        a for a in rest if override_key(a) == "launcher" or override_key(a).startswith("launch.")
    ]
    overrides = [a for a in rest if a not in mine]
    launch = launch_config(mine)
    if verb == "prep":
        from launch.prep import prepare_prep, run_prep

        run_prep(prepare_prep(overrides, launch, shell_join(["neo", "launch", *argv])), launch)
        return
    if launch.array is not None:
        raise ConfigError(f"launch.array={launch.array} is read by neo launch prep only")
    job = prepare_job(verb, overrides, launch, shell_join(["neo", "launch", *argv]))
    {"local": run_local, "slurm": run_slurm, "hostfile": run_hostfile, "torchrun": run_torchrun}[
        launch.launcher
    ](job, launch)


def launch_config(overrides: list[str]) -> LaunchConfig:
    """configs/launch.yaml with the `launcher` group and launch.* overrides applied."""
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    # launch.env is a mapping whose keys are the user's: `launch.env.NAME=v` and
    # `launch.env={NAME: v}` add to it (Hydra would want `+` for a key the config lacks).
    overrides = [
        f"++{a}" if a.startswith("launch.env.") or a.startswith("launch.env=") else a
        for a in overrides
    ]
    ConfigStore.instance().store(name="launch_schema", node=LaunchEntry)
    with initialize_config_module("configs", version_base="1.3"):
        try:
            cfg = compose("launch", overrides=overrides)
        except HydraException as e:
            if any(a.startswith("launcher=") for a in overrides) and "launcher" in str(e):
                raise ConfigError(
                    f"{_choice(overrides)}: not one of {', '.join(LAUNCHERS)} or a preset in "
                    "configs/launcher/"
                ) from None
            raise ConfigError(f"launch settings: {error_line(e)}") from None
    return OmegaConf.to_object(cfg).launch.validate()


def _choice(overrides: list[str]) -> str:
    return next(a for a in overrides if a.startswith("launcher="))


def prepare_job(verb: str, overrides: list[str], launch: LaunchConfig, typed: str):
    """The verb's config composed and resolved exactly as the verb will (train/config/), for
    launch.world_size ranks. The run directory is the one the trainer will write: run_dir (or
    Hydra's run dir) as composed, relative to the job's workdir; it is passed to the job
    absolute, so that the job script, its logs and a requeued job all find it."""
    workdir = Path(launch.workdir or os.getcwd()).absolute()
    runs_or_submits = not (
        launch.dry_run or (launch.launcher == "torchrun" and launch.node_rank is None)
    )
    if runs_or_submits and not workdir.is_dir():
        raise NotFound(f"launch.workdir={workdir}: no such directory (the job runs there)")
    # The verb's own reading of free-text keys (a prompt with commas and quotes): the job gets
    # the overrides as typed and its `neo VERB` reads them the same way.
    text_keys = TEXT_KEYS.get(verb, ())
    given = [a for a in overrides if override_key(a) == "run_dir"]
    try:
        if verb in RESUMABLE:
            full = compose.compose(verb, [quote_text(a, text_keys) for a in overrides], True)
            run_dir = workdir / _composed_run_dir(full)
            final = run_dir / "model" / "neotrain.json"
        else:
            stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            run_dir, final = workdir / "runs" / "launch" / f"{verb}-{stamp}", None
        one_line("run_dir", str(run_dir))
        if verb in RESUMABLE:
            overrides = [a for a in overrides if a not in given] + [
                f"run_dir={hydra_path(run_dir)}"
            ]
        config = compose.to_schema(
            compose.compose(verb, [quote_text(a, text_keys) for a in overrides])
        )
    except ConfigError as e:
        raise ConfigError(f"neo {verb} overrides: {e}") from None
    lora = getattr(config, "lora", None)
    if final is not None and lora is not None and lora.enabled and not lora.merge:
        final = run_dir / "adapter" / "adapter_config.json"  # no merged model is written
    accelerator = config.accelerator
    if accelerator == "auto":  # decided on the compute nodes; the script sets GPU variables
        accelerator = "cpu" if launch.launcher == "local" else "cuda"
    # The world the job will start: its ranks and accelerator; the machine's precision is
    # decided there (native_bf16 unknown here).
    world = World(launch.world_size, accelerator)
    try:
        resolve_for(verb, config, world)
    except ConfigError as e:
        raise ConfigError(
            f"with launch.nodes={launch.nodes} x launch.gpus_per_node={launch.gpus_per_node}"
            f" = {launch.world_size} ranks: {e}"
        ) from None
    return scripts.Job(
        verb,
        overrides,
        str(run_dir),
        accelerator,
        None if final is None else str(final),
        str(workdir),
        typed,
    )


def _composed_run_dir(full) -> str:
    """run_dir as the verb will read it. Its default, `${hydra:runtime.output_dir}`, only a
    running Hydra app resolves: that is Hydra's run dir (hydra.run.dir)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw = OmegaConf.to_container(full, resolve=False)["run_dir"]
    try:
        return str(full.hydra.run.dir if raw == "${hydra:runtime.output_dir}" else full.run_dir)
    except OmegaConfBaseException as e:
        raise ConfigError(f"run_dir={raw}: {error_line(e)}") from None


def resolve_for(verb: str, config, world: World):
    """The verb's own resolve (neo sft without reading its base and data: those are read where
    it runs)."""
    if verb == "train":
        return resolve_train(config, world)
    if verb == "sft":
        return resolve_sft(config, world, None)
    if verb == "dpo":
        return resolve_dpo(config, world, None)
    if verb == "eval":
        return resolve_eval(config, world)
    return resolve_generate(config, world)


def run_local(job: scripts.Job, launch: LaunchConfig) -> None:
    if launch.nodes > 1:
        raise ConfigError("launcher=local runs on this machine: launch.nodes must be 1")
    command = scripts.verb_command(job, launch)
    if launch.gpus_per_node > 1:
        command = [
            *scripts.torchrun(launch),
            "--standalone",
            f"--nproc_per_node={launch.gpus_per_node}",
            *command[1:],
        ]
    _run_or_print([command], launch, cwd=job.workdir)


def run_torchrun(job: scripts.Job, launch: LaunchConfig) -> None:
    commands = scripts.torchrun_commands(job, launch)
    if launch.node_rank is None or launch.dry_run:
        print(f"# run on each node ({launch.nodes}), node 0 at {launch.master_addr}:")
        for rank, command in enumerate(commands):
            print(f"# node {rank}\n{command}")
        return
    _run_or_print([["bash", "-c", commands[launch.node_rank]]], launch)


def run_hostfile(job: scripts.Job, launch: LaunchConfig) -> None:
    hostfile = Path(launch.hostfile)
    if not hostfile.is_file():
        raise NotFound(f"launch.hostfile={hostfile}: no such file ('host slots=N' lines)")
    env_file = Path(job.run_dir) / "launch" / ".deepspeed_env"
    command = scripts.deepspeed_command(job, launch)
    if launch.dry_run:
        print(f"# {env_file}\n{scripts.deepspeed_env(job, launch)}# command\n{shell_join(command)}")
        return
    env_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(env_file, scripts.deepspeed_env(job, launch))
    # .deepspeed_env reaches the other nodes; this one gets the variables directly.
    variables = {n: v for n, v, _ in scripts.environment(job, launch)}
    env = {**variables, "DS_ENV_FILE": str(env_file)}
    _run_or_print([command], launch, env=env, cwd=job.workdir)


def run_slurm(job: scripts.Job, launch: LaunchConfig) -> None:
    text = scripts.slurm_script(job, launch)
    if launch.dry_run:
        print(text, end="")
        return
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise NotFound(
            "launcher=slurm: sbatch is not on PATH (run on a SLURM login node, or "
            "launch.dry_run=true to see the script)"
        )
    script = Path(job.run_dir) / "launch" / "job.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(script, text)
    done = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"sbatch {script} failed: {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: neo {job.verb}, run dir {job.run_dir}")
    log = shell_word(f"{job.run_dir}/slurm-{job_id}.out")
    print(f"follow it: squeue -j {job_id}; tail -f {log}")


def _run_or_print(commands: list[list[str]], launch: LaunchConfig, env=None, cwd=None) -> None:
    for command in commands:
        if launch.dry_run:
            print(shell_join(command))
            continue
        done = subprocess.run(command, env={**os.environ, **(env or {})}, cwd=cwd)
        if done.returncode != 0:
            sys.exit(done.returncode)
