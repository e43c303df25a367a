"""`neo launch` with hostile values: what it refuses (one line naming the key, exit 2), and the
scripts it writes RUN under bash with stand-in `srun`, `scontrol` and `sbatch` (small scripts
that record their argv): no planted command runs, the job runs where it was told, and the
completion check looks where the trainer writes."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NEO

# The stand-in srun: records its argv, cwd and environment, then does what the trainer would
# with that command line: composes the verb's config (as train.cli does), and with STUB_FINISH=1
# writes the final model into the run directory it resolved (relative to its cwd).
SRUN = """#!{python}
import json, os, sys
from pathlib import Path
from train.cli import VERBS, quote_text
from train.config import compose

args = sys.argv[1:]
at = args.index("train.cli")
verb, overrides = args[at + 1], args[at + 2:]
cfg = compose.to_schema(
    compose.compose(verb, [quote_text(o, VERBS[verb].text_keys) for o in overrides])
)
record = {{"argv": args, "cwd": os.getcwd(), "evil": os.environ.get("EVIL")}}
if verb in ("train", "sft"):
    run_dir = Path(cfg.run_dir).absolute()
    record["run_dir"] = str(run_dir)
    if os.environ.get("STUB_FINISH") == "1":
        (run_dir / "model").mkdir(parents=True, exist_ok=True)
        (run_dir / "model" / "neotrain.json").write_text("{{}}")
if verb == "generate":
    record["prompt"] = cfg.prompt
with open(os.path.join(os.environ["STUB_DIR"], "srun.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\\n")
"""
SCONTROL = """#!/bin/bash
printf '%s\\n' "$*" >> "$STUB_DIR/scontrol.log"
if [ "$1" = show ] && [ "$2" = hostnames ]; then echo vm; fi
"""
SBATCH = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_DIR/sbatch.args"
echo 4242
"""


@pytest.fixture
def stubs(tmp_path):
    """A bin/ of stand-ins and the folder they record into."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in (
        ("srun", SRUN.format(python=sys.executable)),
        ("scontrol", SCONTROL),
        ("sbatch", SBATCH),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_DIR": str(record)}
    return env, record


def launch(*args, env=None, cwd=None, check=True):
    proc = subprocess.run(
        [NEO, "launch", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def run_job(script: Path, stubs, cwd: Path, finish: bool) -> subprocess.CompletedProcess:
    """The job script under bash, as SLURM would start it, somewhere else than neo launch ran."""
    env, _ = stubs
    cwd.mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", str(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            **env,
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "vm",
            "STUB_FINISH": "1" if finish else "0",
        },
        timeout=120,
    )


def records(folder: Path) -> list[dict]:
    path = folder / "srun.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def planted(tmp_path: Path) -> list[Path]:
    return list(tmp_path.rglob("PWNED"))


# A run directory as hostile as a path gets: a quote, spaces, SLURM's %j, a comment sign, a
# command substitution. Given relative, Hydra-quoted, with a working directory elsewhere.
NAME = "it's a b %j #1 $(touch PWNED)"
HYDRA_NAME = "runs/" + NAME.replace("'", "\\'")


@pytest.mark.parametrize("finish", [True, False])
def test_slurm_script_runs_where_it_says_and_checks_the_trainers_run_dir(tmp_path, stubs, finish):
    env, record = stubs
    workdir = tmp_path / "work dir $(touch PWNED)"
    workdir.mkdir()
    out = launch(
        "train",
        "launcher=slurm",
        "accelerator=cpu",
        f"launch.workdir='{workdir}'",
        f"run_dir='{HYDRA_NAME}'",
        "+launch.env.EVIL='$(touch PWNED) `touch PWNED`'",
        "launch.sbatch_args=['--comment=a b #c']",
        env=env,
        cwd=tmp_path,
    ).stdout
    run_dir = workdir / "runs" / NAME
    assert f"run dir {run_dir}" in out
    script = run_dir / "launch" / "job.sbatch"
    assert (record / "sbatch.args").read_text().splitlines()[-1] == str(script)

    job = run_job(script, stubs, tmp_path / "elsewhere", finish)
    assert job.returncode == 0, job.stderr
    assert planted(tmp_path) == []
    (ran,) = records(record)
    assert ran["cwd"] == str(workdir)
    assert ran["run_dir"] == str(run_dir)  # where the trainer writes ...
    assert ran["evil"] == "$(touch PWNED) `touch PWNED`"
    requeued = "requeue 4242" in (record / "scontrol.log").read_text()
    assert requeued == (not finish)  # ... is where the script looks for the final model
    text = script.read_text()
    assert "set -euo pipefail" in text
    # sbatch reads these lines with its own quoting: the paths and the comment stay whole.
    assert f'#SBATCH "--output={workdir}/runs/{NAME.replace("%", "%%")}/slurm-%j.out"' in text
    assert '#SBATCH "--comment=a b #c"' in text


def test_a_failed_cd_starts_nothing(tmp_path, stubs):
    env, record = stubs
    script = tmp_path / "job.sbatch"
    script.write_text(
        launch(
            "train",
            "launcher=slurm",
            "launch.dry_run=true",
            "accelerator=cpu",
            f"launch.workdir={tmp_path / 'gone'}",
            f"run_dir={tmp_path / 'run'}",
        ).stdout
    )
    job = run_job(script, stubs, tmp_path / "elsewhere", finish=True)
    assert job.returncode != 0
    assert records(record) == []


@pytest.mark.parametrize(
    "prompt",
    [
        "Hello, I'm a language model,",
        "one line\ntouch PWNED #",
        "tab\tC1\x85DEL\x7f\\x41 \\'",
        "$(touch PWNED) `touch PWNED` ${oops} \\' \"",
    ],
)
def test_generate_takes_what_neo_generate_takes(tmp_path, stubs, prompt):
    """The prompt arrives as typed; the header comment that repeats the command line stays one
    comment."""
    env, record = stubs
    script = tmp_path / "job.sbatch"
    script.write_text(
        launch(
            "generate",
            f"prompt={prompt}",
            "checkpoint=/models/x",
            "launcher=slurm",
            "launch.dry_run=true",
            f"launch.workdir={tmp_path}",
            env=env,
        ).stdout
    )
    job = run_job(script, stubs, tmp_path / "elsewhere", finish=True)
    assert job.returncode == 0, job.stderr
    assert planted(tmp_path) == []
    (ran,) = records(record)
    assert ran["prompt"] == prompt
    assert f"prompt={prompt}" in ran["argv"]


@pytest.mark.parametrize(
    "args, key",
    [
        (["launch.job_name='x\ntouch PWNED'"], "launch.job_name"),
        (["launch.sbatch_args=['--gres=gpu:1\ntouch PWNED']"], "launch.sbatch_args[0]"),
        (["launch.time='1:00:00 --wrap=x'"], "launch.time"),
        (["launch.time=tomorrow"], "launch.time"),
        (["launch.partition='gpu --wrap=x'"], "launch.partition"),
        (["launch.account='lm;x'"], "launch.account"),
        (["launch.qos='a b'"], "launch.qos"),
        (["launch.job_name='a b'"], "launch.job_name"),
        (["launch.sbatch_args=['-p gpu']"], "launch.sbatch_args[0]"),
        (["launch.sbatch_args=['gres=gpu:1']"], "launch.sbatch_args[0]"),
        (["launch.sbatch_args=['--comment=hetjob']"], "launch.sbatch_args[0]"),
        (["launch.env={A-B:x}"], "launch.env"),
        (["launch.env={A:'x\ny'}"], "launch.env.A"),
        (["launch.python='python\nid'"], "launch.python"),
        (["launch.workdir='/tmp\nid'"], "launch.workdir"),
        (["launch.cpus_per_task=0"], "launch.cpus_per_task"),
        (["launch.master_port=70000"], "launch.master_port"),
        (["run_dir='/tmp/a\nb'"], "run_dir"),
        (["run_dir='/tmp/a\\\\b'"], "run_dir"),
    ],
)
def test_hostile_slurm_values_are_one_line_naming_the_key(tmp_path, args, key):
    proc = launch("train", "launcher=slurm", "launch.dry_run=true", *args, check=False)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.count("\n") == 1 and key in proc.stderr, proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "args, key",
    [
        (["+launch.env.B='$(touch PWNED)'"], "launch.env.B"),  # the form that worked before
        (["launch.env={B:'a\"b'}"], "launch.env.B"),
        (["launch.env.B='a\\\\b'"], "launch.env.B"),
        (["launch.env={B:' padded'}"], "launch.env.B"),
        (["launch.socket_ifname='ib0`id`'", "accelerator=cuda"], "launch.socket_ifname"),
        (["name='$(touch PWNED)'"], "name"),
        (["name='a $(touch PWNED)'"], "name"),
        (["name='x;id'"], "name"),
        (["name=100%n"], "name"),
        (["model.attention_types=[[[global,local],2]]"], "model.attention_types"),
        (["launch.python='/opt/my python'"], "launch.python"),
        (["launch.ds_launcher=pdsh2"], "launch.ds_launcher"),
    ],
)
def test_hostile_hostfile_values_are_refused(tmp_path, args, key):
    """Over pdsh, DeepSpeed runs `export K="V"; cd DIR; python ... ARGS` in each node's shell
    (ARGS with a space double-quoted): what that shell would read as code is refused."""
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=1\nnode2 slots=1\n")
    proc = launch(
        "train",
        "launcher=hostfile",
        f"launch.hostfile={hosts}",
        "launch.nodes=2",
        "launch.dry_run=true",
        *args,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.count("\n") == 1 and key in proc.stderr, proc.stderr
    assert not (tmp_path / "PWNED").exists()


def test_deepspeed_env_and_arguments_arrive_whole_through_pdsh(tmp_path, monkeypatch):
    """DeepSpeed's own pdsh runner builds each node's command from what neo launch passes it
    (the .deepspeed_env lines, the arguments); bash runs it here with a stand-in python: the
    variables and arguments arrive exactly, and nothing planted runs."""
    from deepspeed.launcher.multinode_runner import PDSHRunner

    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=1\nnode2 slots=1\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {"A": "x y", "B": "it's", "C": "a;b|c&d<e>f(g)*?[h]{i,j}~k!l#m"}
    out = launch(
        "train",
        "launcher=hostfile",
        f"launch.hostfile={hosts}",
        "launch.nodes=2",
        "accelerator=cpu",
        "launch.dry_run=true",
        f"launch.workdir={workdir}",
        "launch.env={"
        + ",".join(f"{k}:'{v}'".replace("it's", "it\\'s") for k, v in env.items())
        + "}",
        "run_dir='runs/a b'",
        "model.attention_types=[[[global, local], 2]]",
    ).stdout
    lines = out.splitlines()
    env_lines = lines[1 : lines.index("# command")]
    command = shlex.split(lines[lines.index("# command") + 1])
    user_args = command[command.index("train.cli") + 1 :]
    assert f"run_dir='{workdir}/runs/a b'" in user_args

    stand_in = tmp_path / "python"
    stand_in.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), "
        f"'env': {{k: os.environ.get(k) for k in {sorted(env)!r}}}}}, "
        f"open({str(tmp_path / 'ran.json')!r}, 'w'))\n"
    )
    stand_in.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stand_in))
    monkeypatch.chdir(workdir)  # deepspeed's `cd DIR` is where its runner runs: the workdir
    args = type(
        "Args",
        (),
        dict(
            user_args=user_args,
            user_script="train.cli",
            launcher_args="",
            ssh_port=None,
            master_addr="node1",
            master_port=29500,
            venv_script=None,
            no_python=False,
            module=True,
            no_local_rank=False,
            save_pid=False,
            enable_each_rank_log=None,
        ),
    )()
    runner = PDSHRunner(args, "d29ybGQ=")
    for line in env_lines:  # as deepspeed.launcher.runner reads .deepspeed_env
        key, value = line.split("=", 1)
        runner.add_export(key, value)
    cmd, _, _ = runner.get_cmd({}, {"node1": [0], "node2": [0]})
    remote = " ".join(cmd[cmd.index("node1,node2") + 1 :])  # what pdsh hands each node's shell
    done = subprocess.run(["bash", "-c", remote], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ran = json.loads((tmp_path / "ran.json").read_text())
    assert ran["env"] == env
    assert ran["cwd"] == str(workdir)
    assert ran["argv"][ran["argv"].index("train.cli") + 1 :] == user_args
    assert planted(tmp_path) == []


def test_help_and_a_launcher_that_must_be_chosen():
    for args in (["--help"], ["-h"], ["train", "--help"]):
        proc = launch(*args)
        assert "usage: neo launch" in proc.stdout and "launcher=" in proc.stdout
    proc = launch("train", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "launcher=slurm" in proc.stderr and "launcher=local" in proc.stderr
    proc = launch("train", "--cfg", "job", "launcher=slurm", check=False)
    assert proc.returncode == 2 and "--cfg" in proc.stderr


def test_sft_without_a_merged_model_is_done_when_its_adapters_are(tmp_path):
    """lora.merge=false writes no run_dir/model: the script must not wait for one (it would
    requeue a finished job forever)."""
    out = launch(
        "sft",
        "base=/models/x",
        "lora.r=8",
        "lora.merge=false",
        "accelerator=cpu",
        "launcher=slurm",
        "launch.dry_run=true",
        f"run_dir={tmp_path}/run",
    ).stdout
    assert f"[ ! -e {tmp_path}/run/adapter/adapter_config.json ]" in out


def test_dpo_launches_and_requeues_like_sft(tmp_path):
    """neo dpo saves on USR1 and resumes: its job requeues until run_dir/model exists; a bad
    dpo override fails before anything is written."""
    out = launch(
        "dpo",
        "accelerator=cpu",
        "launcher=slurm",
        "launch.dry_run=true",
        "dpo.beta=0.2",
        f"run_dir={tmp_path}/run",
    ).stdout
    assert f"-m train.cli dpo accelerator=cpu dpo.beta=0.2 run_dir={tmp_path}/run" in out
    assert f"[ ! -e {tmp_path}/run/model/neotrain.json ]" in out
    proc = launch("dpo", "launcher=slurm", "launch.dry_run=true", "dpo.beta=0", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "neo launch: error: with launch.nodes=1 x launch.gpus_per_node=1 = 1 ranks: "
        "dpo.beta=0.0 must be > 0"
    ]
