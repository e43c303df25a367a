"""`neo launch`: rendered job scripts (golden files), bad input refused before anything is
submitted, a torch-free launcher, and real runs on a one-node SLURM cluster started on this
machine (scripts/slurm_local.sh) and as two torchrun "nodes"."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import NEO, ROOT
from runs import SMALL, losses, train

GOLDEN = ROOT / "tests" / "assets" / "launch"
# Fixed paths so that the scripts do not depend on this machine.
FIXED = ["launch.python=python", "launch.workdir=/work/project"]


def launch(*args: str, cwd=None, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [NEO, "launch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"neo launch failed ({proc.returncode})\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize(
    "name, args",
    [
        (
            "nvidia_4_nodes.sbatch",
            [
                "train",
                "model=gpt_neo_1.3b",
                "deepspeed=zero2",
                "accelerator=cuda",
                "global_batch_size=256",
                "micro_batch_size=4",
                "launcher=slurm",
                "launch.nodes=4",
                "launch.gpus_per_node=8",
                "launch.partition=gpu",
                "launch.account=lm",
                "launch.time=24:00:00",
                "launch.cpus_per_task=8",
                "launch.socket_ifname=ib0",
                "run_dir=/scratch/runs/neo13b",
            ],
        ),
        (
            "ascend_2_nodes.sbatch",
            [
                "sft",
                "accelerator=npu",
                "base=/models/gpt-neo-1.3B",
                "global_batch_size=64",
                "micro_batch_size=4",
                "launcher=slurm",
                "launch.mode=torchrun",
                "launch.nodes=2",
                "launch.gpus_per_node=8",
                "launch.partition=ascend",
                "launch.socket_ifname=enp189s0f0",
                "launch.sbatch_args=['--gres=npu:8']",
                "run_dir=/scratch/runs/sft",
            ],
        ),
    ],
)
def test_rendered_scripts_match_the_golden_files(name, args):
    out = launch(*args, *FIXED, "launch.dry_run=true").stdout
    if os.environ.get("NEO_UPDATE_GOLDEN"):
        (GOLDEN / name).write_text(out)
    assert out == (GOLDEN / name).read_text()
    for line in ("--requeue", "--signal=USR1@120", "--open-mode=append"):
        assert f"#SBATCH {line}" in out
    if "ascend" in name:
        for variable in (
            "ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7",
            "HCCL_CONNECT_TIMEOUT",
            "HCCL_EXEC_TIMEOUT",
            "HCCL_SOCKET_IFNAME=enp189s0f0",
            "GLOO_SOCKET_IFNAME=enp189s0f0",
            "PYTORCH_NPU_ALLOC_CONF",
        ):
            assert f"export {variable}" in out
        assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in out
        assert "--rdzv_backend=c10d" in out and "SIGUSR1" in out
    else:
        assert "NCCL_SOCKET_IFNAME=ib0" in out and "#SBATCH --gpus-per-node=8" in out
        assert "srun --kill-on-bad-exit=1 python -m train.cli train" in out


def test_torchrun_and_hostfile_commands(tmp_path):
    out = launch(
        "train",
        "launcher=torchrun",
        "launch.nodes=2",
        "launch.gpus_per_node=4",
        "launch.master_addr=10.0.0.1",
        "accelerator=cuda",
        "global_batch_size=64",
        *FIXED,
        "run_dir=/scratch/r",
    ).stdout
    assert "--nnodes=2 --node_rank=0 --nproc_per_node=4 --master_addr=10.0.0.1" in out
    assert "--node_rank=1" in out and "run_dir=/scratch/r" in out
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    out = launch(
        "train",
        "launcher=hostfile",
        f"launch.hostfile={hosts}",
        "launch.nodes=2",
        "launch.gpus_per_node=8",
        "accelerator=npu",
        "launch.dry_run=true",
        "global_batch_size=128",
        *FIXED,
        "run_dir=/scratch/r",
    ).stdout
    assert f"python -m deepspeed.launcher.runner --hostfile={hosts} --launcher=pdsh" in out
    assert "HCCL_CONNECT_TIMEOUT=1200" in out  # the .deepspeed_env lines


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["launcher=slurm", "launch.require=[partition,account]", "launch.account=lm"],
            "launch.partition is required",
        ),
        (
            [
                "launcher=slurm",
                "launch.gpus_per_node=3",
                "global_batch_size=8",
                "micro_batch_size=2",
            ],
            "launch.nodes=1 x launch.gpus_per_node=3 = 3 ranks",
        ),
        (["launcher=pbs"], "launcher=pbs: not one of local, slurm, hostfile, torchrun"),
        (["launcher=torchrun", "launch.nodes=2"], "needs launch.master_addr"),
        (["launcher=slurm", "launch.nodes=0"], "launch.nodes=0 must be >= 1"),
        (["launcher=slurm", "model=gpt_neo_9b"], "neo train overrides"),
    ],
)
def test_bad_input_fails_before_anything_is_submitted(tmp_path, args, message):
    proc = launch("train", *args, f"run_dir={tmp_path}/run", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_without_sbatch_it_says_so(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    proc = launch(
        "train",
        "launcher=slurm",
        f"run_dir={tmp_path}/run",
        check=False,
        env={"PATH": str(bin_dir)},
    )
    assert proc.returncode != 0 and "sbatch is not on PATH" in proc.stderr
    proc = launch("prep", "launcher=slurm", check=False, env={"PATH": str(bin_dir)})
    assert proc.returncode == 2 and "sbatch is not on PATH" in proc.stderr
    proc = launch("pretrain", check=False)
    verbs = "VERB must be one of prep, train, sft, dpo, eval, generate"
    assert proc.returncode != 0 and verbs in proc.stderr


def test_launching_needs_no_torch():
    """A login node without torch: importing torch fails, neo launch still renders."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from train.cli import main\n"
        "main(['launch', 'train', 'launcher=slurm', 'launch.dry_run=true', 'accelerator=cuda'])\n"
        "assert 'deepspeed' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --ntasks-per-node=1" in proc.stdout


# --------------------------------------------------------------------------------------------
# a real SLURM


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return done.returncode == 0 and any(s in done.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module")
def slurm():
    """A one-node SLURM: the running one, or started by scripts/slurm_local.sh (root)."""
    if not _slurm_up() and os.geteuid() == 0:
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "slurm_local.sh")], capture_output=True, timeout=300
        )
    if not _slurm_up():
        if os.environ.get("CI"):
            pytest.fail("SLURM could not be started (scripts/slurm_local.sh); CI needs it")
        pytest.skip("no SLURM here: run `sudo bash scripts/slurm_local.sh` (root, Debian)")


def _job_state(job: str) -> tuple[str, int]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState", "GONE"), int(fields.get("Restarts", 0))


def _wait(job: str, until, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = _job_state(job)
        if until(*state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job}: still {_job_state(job)} after {timeout} s")


FIXED_RUN = ("precision=fp32", "max_steps=10", "save_every=100", "eval_every=100")


@pytest.mark.slow
def test_slurm_job_equals_torchrun_and_resumes_after_usr1(slurm, tmp_path, corpus):  # noqa: F811
    """2 tasks (srun, one per rank) train as `torchrun --nproc_per_node 2` does, loss for loss;
    a job sent USR1 mid-run (as SLURM does before the time limit) saves, requeues itself and
    finishes with the same losses."""
    train(tmp_path / "torchrun", corpus, *FIXED_RUN, "export_hf=false", ranks=2)  # losses only
    expected = losses(tmp_path / "torchrun")
    args = [
        "train",
        "launcher=slurm",
        "launch.gpus_per_node=2",
        "accelerator=cpu",
        f"data.path={corpus}",
        *SMALL,
        *FIXED_RUN,
    ]

    straight = tmp_path / "slurm"
    out = launch(*args, f"run_dir={straight}", cwd=tmp_path).stdout
    job = out.split()[2].rstrip(":")
    assert _wait(job, lambda state, _: state in ("COMPLETED", "FAILED", "GONE"))[0] == "COMPLETED"
    assert losses(straight) == expected
    assert (straight / "launch" / "job.sbatch").is_file()
    assert "on 2 x cpu" in (straight / f"slurm-{job}.out").read_text()

    interrupted = tmp_path / "usr1"
    out = launch(*args, f"run_dir={interrupted}", cwd=tmp_path).stdout
    job = out.split()[2].rstrip(":")
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = (
            [
                json.loads(x).get("step", 0)
                for x in metrics.read_text().splitlines()
                if x.endswith("}")
            ]
            if metrics.exists()
            else []
        )
        if max(steps, default=0) >= 3:
            break
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    # Saved and requeued itself; SLURM starts it again once its credential has expired
    # (cred_expire: 120 s by default, 10 s on the test cluster; starting it sooner by hand gets
    # "Job credential revoked").
    _wait(job, lambda state, restarts: restarts >= 1)
    state = _wait(job, lambda state, _: state in ("COMPLETED", "FAILED", "GONE"))
    log = (interrupted / f"slurm-{job}.out").read_text()
    assert state == ("COMPLETED", 1), log
    assert "stopped by SIGUSR1 after step" in log and "resumed at step" in log
    assert losses(interrupted) == expected


@pytest.mark.slow
def test_slurm_job_in_a_workdir_finds_its_run_dir_and_ends(slurm, tmp_path, corpus):  # noqa: F811
    """A working directory with a space, a relative run_dir with a quote, a space, % and #
    (Hydra-quoted), an sbatch option with a space and #: the job runs there, its logs go to
    that run directory, and a finished run is not requeued."""
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    out = launch(
        "train",
        "launcher=slurm",
        "accelerator=cpu",
        f"launch.workdir='{workdir}'",
        "run_dir='runs/it\\'s 100% #1'",
        "launch.sbatch_args=['--comment=a b #c']",
        f"data.path={corpus}",
        *SMALL,
        "precision=fp32",
        "max_steps=2",
        "eval_every=100",
        cwd=tmp_path,
    ).stdout
    job = out.split()[2].rstrip(":")
    run_dir = workdir / "runs" / "it's 100% #1"
    assert f"run dir {run_dir}" in out
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE")
    state = _wait(job, lambda state, restarts: state in ended or restarts > 0)
    log = run_dir / f"slurm-{job}.out"
    assert state == ("COMPLETED", 0), log.read_text() if log.exists() else list(tmp_path.rglob("*"))
    assert (run_dir / "model" / "neotrain.json").is_file()
    assert "on 1 x cpu" in log.read_text()
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    assert "Comment=a b #c" in shown.stdout
    assert not (tmp_path / "runs").exists()  # nothing written where neo launch ran


@pytest.mark.slow
def test_torchrun_nodes_and_the_deepspeed_launcher_equal_torchrun(tmp_path, corpus):  # noqa: F811
    """launcher=torchrun, two "nodes" on this machine (one rank each, rendezvous on
    127.0.0.1), and launcher=hostfile with `localhost slots=2` (the deepspeed launcher): the
    losses of one node with two ranks under plain torchrun."""
    train(tmp_path / "one", corpus, "precision=fp32", "export_hf=false", ranks=2)  # losses only
    run = tmp_path / "two"
    common = [
        "train",
        "launcher=torchrun",
        "launch.nodes=2",
        "launch.gpus_per_node=1",
        "launch.master_addr=127.0.0.1",
        "launch.master_port=29731",
        "accelerator=cpu",
        f"data.path={corpus}",
        *SMALL,
        "precision=fp32",
        "max_steps=4",
        f"run_dir={run}",
    ]
    nodes = [
        subprocess.Popen(
            [NEO, "launch", *common, f"launch.node_rank={r}"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs
    assert losses(run) == losses(tmp_path / "one")

    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n")
    by_deepspeed = tmp_path / "deepspeed"
    launch(
        "train",
        "launcher=hostfile",
        f"launch.hostfile={hosts}",
        "launch.gpus_per_node=2",
        *common[5:-1],
        f"run_dir={by_deepspeed}",
        cwd=tmp_path,
    )
    assert losses(by_deepspeed) == losses(tmp_path / "one")
    assert "OMP_NUM_THREADS=1" in (by_deepspeed / "launch" / ".deepspeed_env").read_text()


@pytest.mark.slow
def test_a_hydra_sweep_runs_on_slurm_through_submitit(slurm, tmp_path, corpus):  # noqa: F811
    """`neo train -m optim.lr=a,b hydra/launcher=submitit_slurm`: two jobs of two tasks each
    (their rendezvous found from SLURM's variables), one run directory each, and the table of
    the sweep at the end and from `neo launch status`."""
    sweep = tmp_path / "sweep"
    command = [
        NEO,
        "train",
        "-m",
        "optim.lr=1e-3,3e-3",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.tasks_per_node=2",
        f"hydra.sweep.dir={sweep}",
        "accelerator=cpu",
        "precision=fp32",
        "max_steps=3",
        f"data.path={corpus}",
        *(a for a in SMALL if not a.startswith("optim.lr")),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "model" / "neotrain.json").is_file()
        assert len(losses(sweep / job)) == 3
    assert losses(sweep / "0") != losses(sweep / "1")  # different learning rates
    assert f"sweep {sweep}: 2 jobs" in done.stdout
    rows = [
        line
        for line in done.stdout.splitlines()
        if line.startswith("| 0 ") or line.startswith("| 1 ")
    ]
    assert len(rows) == 2 and all(r.endswith("| done |") for r in rows), done.stdout
    assert "optim.lr=0.001" in rows[0] and "optim.lr=0.003" in rows[1]
    status = launch("status", f"sweep_dir={sweep}").stdout
    assert all(r in status for r in rows)


def test_local_launcher_and_verbs_that_do_not_resume():
    out = launch(
        "train",
        "launcher=local",
        "launch.gpus_per_node=2",
        "launch.dry_run=true",
        *FIXED,
        "run_dir=/scratch/r",
    ).stdout
    assert out.strip() == (
        "python -m torch.distributed.run --standalone --nproc_per_node=2 "
        "-m train.cli train run_dir=/scratch/r"
    )
    # eval does not save on USR1: no requeue, no signal, and no run_dir override added.
    out = launch(
        "eval", "checkpoint=/models/x", "launcher=slurm", "launch.dry_run=true", *FIXED
    ).stdout
    assert "--requeue" not in out and "USR1" not in out and "scontrol requeue" not in out
    srun = "srun --kill-on-bad-exit=1 python -m train.cli eval checkpoint=/models/x || rc=$?\n"
    assert srun in out
