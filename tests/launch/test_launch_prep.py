"""`neo launch prep`: the staged neo prep as SLURM job arrays with stage dependencies, bad input
refused before anything is written, and on the real one-node SLURM (scripts/slurm_local.sh) a
pipeline with one array element cancelled, named by `neo launch status` and resubmitted alone,
whose result equals `neo prep` on one machine."""

import json
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import NEO
from test_launch import launch, slurm  # noqa: F401

from data_prep.config import STAGES
from data_prep.manifest import Manifest, open_prepared
from launch.prep import array_spec

PREP = ["workers=1", "slice_bytes=3000", "validation_fraction=0.2", "shard_tokens=2000"]


def write_jsonl(path: Path, docs: list[str], source: str) -> None:
    lines = [json.dumps({"text": t, "meta": {"pile_set_name": source}}) for t in docs]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def corpus(tmp_path):
    """Two uncompressed files, several slices each, with exact copies planted within and
    across files (and across sources)."""
    rng = random.Random(7)
    words = [
        "the",
        "a",
        "model",
        "token",
        "data",
        "shard",
        "task",
        "slice",
        "hash",
        "merge",
        "plan",
        "reduce",
    ]
    docs = [" ".join(rng.choices(words, k=rng.randint(20, 60))) + f" {i}" for i in range(60)]
    work = tmp_path / "work dir"
    (work / "in").mkdir(parents=True)
    write_jsonl(work / "in" / "a.jsonl", docs[:35] + docs[3:6], "A")
    write_jsonl(work / "in" / "b.jsonl", docs[35:] + docs[10:14] + docs[40:41], "B")
    return work


def test_array_spec():
    assert array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert array_spec([3]) == "3" and array_spec([]) == ""


def test_dry_run_prints_each_stage_and_its_dependencies(corpus):
    out_dir = corpus / "it's a $(touch x) dir"
    out = launch(
        "prep",
        "launcher=slurm",
        "launch.array=3",
        "launch.partition=cpu",
        f"launch.workdir={corpus}",
        "input=in",
        f"output='{out_dir}'".replace("'s", "\\'s"),
        *PREP,
        "launch.dry_run=true",
        cwd=corpus,
    ).stdout
    scripts = out.split("# submitted in this order")[0]
    for stage in ("plan", "hash", "reduce", "tokenize", "merge"):
        assert f"#SBATCH --job-name=neo-prep-{stage}" in scripts
        assert f" stage={stage}" in scripts
    assert "stage=near" not in scripts  # dedup=exact: no near stage
    assert scripts.count(' "task=$SLURM_ARRAY_TASK_ID"') == 3  # hash, reduce and tokenize
    assert "#SBATCH --partition=cpu" in scripts and " tasks=3 " in scripts
    assert "'output=" in scripts and "$(touch x)" in scripts  # quoted, never run
    commands = out.split("# submitted in this order")[1].splitlines()[1:]
    assert len(commands) == 5 and all("--array=0-2" in commands[i] for i in (1, 2, 3))
    assert "--array" not in commands[0] + commands[4]
    assert all(
        "--dependency=afterok:" in c and "--kill-on-invalid-dep=yes" in c for c in commands[1:]
    )
    assert not (corpus / "runs").exists() and not out_dir.exists()
    plain = launch(
        "prep", "launcher=slurm", "input=in", "dedup=false", "launch.dry_run=true", cwd=corpus
    )
    assert "stage=hash" not in plain.stdout and "stage=reduce" not in plain.stdout
    none = launch(
        "prep", "launcher=slurm", "input=in", "dedup=none", "launch.dry_run=true", cwd=corpus
    ).stdout
    assert "stage=hash" not in none and "stage=reduce" not in none and "stage=merge" in none
    assert " tasks=1 " in plain.stdout, "launch.array defaults to one task"
    near = launch(
        "prep", "launcher=slurm", "input=in", "dedup=near", "launch.dry_run=true", cwd=corpus
    ).stdout
    commands = near.split("# submitted in this order")[1].splitlines()[1:]
    assert [c.split("/")[-1].strip("'") for c in commands] == [f"{s}.sbatch" for s in STAGES]
    assert " dedup=near " in near and " stage=hash " in near and " stage=reduce" in near
    assert " stage=near" in near


@pytest.mark.parametrize(
    "args, message",
    [
        (["launch.array=0"], "launch.array=0 must be >= 1"),
        (["tasks=4"], "tasks= is launch.array= under neo launch prep"),
        (["stage=hash"], "stage= is chosen per job"),
        (["task=1"], "task= is each array element's number"),
        (["dedupe=true"], "neo prep overrides"),
        (["sentencepiece.vocab_size=100"], "sentencepiece.vocab_size=100 is not read"),
        (["output=in/out"], "lies inside input"),
        (["input=nowhere"], "input='nowhere': no such file"),
        (["launcher=hostfile", "launch.hostfile=h"], "neo launch prep runs on launcher=slurm"),
        (["launch.nodes=2"], "each prep task runs on one node"),
        (["slice_bytes=0"], "slice_bytes=0 must be >= 1"),
        (["dedup=fuzzy"], "dedup='fuzzy' is not one of exact, near, none"),
        (["dedup=near", "near.bands=7"], "near.bands=7 does not divide near.num_perm=128"),
        (["output=a\nb"], "control character"),
    ],
)
def test_bad_input_fails_before_anything_is_written(corpus, args, message):
    base = {"launcher": "launcher=slurm", "input": "input=in", "output": "output=out"}
    base |= {a.split("=")[0]: a for a in PREP} | {a.split("=")[0]: a for a in args}
    proc = launch("prep", *base.values(), check=False, cwd=corpus)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert sorted(p.name for p in corpus.iterdir()) == ["in"]


def test_launch_array_is_for_prep_only(corpus):
    proc = launch("train", "launcher=slurm", "launch.array=2", "launch.dry_run=true", check=False)
    assert proc.returncode == 2 and "launch.array=2 is read by neo launch prep only" in proc.stderr


# --------------------------------------------------------------------------------------------
# a real SLURM


def streams(directory: Path) -> dict:
    """Per (split, source): every document's tokens, in shard order."""
    manifest = Manifest.load(directory)
    _, shards = open_prepared(directory, verify=True)
    out = defaultdict(list)
    for split, opened in shards.items():
        for shard in opened:
            for source, r in manifest.shards[shard.prefix.name].sources.items():
                out[(split, source)] += [shard[i].tolist() for i in range(r.start, r.end)]
    return dict(out)


def _queued(ids: list[str]) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True)
    return [j for j in out.stdout.split() if j.split("_")[0] in ids]


def _wait_gone(ids: list[str], timeout=300) -> None:
    deadline = time.time() + timeout
    while _queued(ids):
        assert time.time() < deadline, f"still queued: {_queued(ids)}"
        time.sleep(0.5)


def _submitted(stdout: str) -> dict[str, str]:
    """{stage: job id} from `submitted STAGE [tasks ...]: job ID` lines."""
    return {
        line.split()[1].rstrip(":"): line.split()[-1]
        for line in stdout.splitlines()
        if line.startswith("submitted ")
    }


@pytest.mark.slow
def test_slurm_arrays_with_a_cancelled_element_resubmitted_equal_one_machine(slurm, corpus):  # noqa: F811
    """Two tasks, held at submission so that hash element 1 is cancelled before it starts:
    the stages after it are cancelled, status names task 1, a resubmit runs hash for task 1
    only, and the merged dataset holds the tokens `neo prep` writes on one machine."""
    held = ["launch.sbatch_args=[--hold]", f"launch.workdir='{corpus}'"]
    output = corpus / "it's 100% #1"  # in a workdir with a space: every stage finds both
    args = ["prep", "launcher=slurm", "launch.array=2", "input=in", *PREP, *held]
    args.append("output='it\\'s 100% #1'")
    out = launch(*args, cwd=corpus.parent).stdout
    jobs = _submitted(out)
    assert list(jobs) == ["plan", "hash", "reduce", "tokenize", "merge"]
    launch_dir = Path(out.split("launch dir ")[1].splitlines()[0])
    twice = launch(*args, cwd=corpus.parent, check=False)
    assert twice.returncode == 2 and f"launch {launch_dir} of this workdir" in twice.stderr
    subprocess.run(["scancel", f"{jobs['hash']}_1"], check=True)
    subprocess.run(["scontrol", "release", *jobs.values()], capture_output=True)
    _wait_gone(list(jobs.values()))

    status = launch("status", f"launch_dir={launch_dir}").stdout
    # | stage | done | running | waiting | failed | cancelled | never ran |
    assert "| hash | 0 | - | - | - | 1 | - |" in status, status
    assert "| reduce | - | - | - | - | - | 0-1 |" in status, status
    assert "| tokenize | - | - | - | - | - | 0-1 |" in status, status
    assert "hash task 1 cancelled: before it started" in status, status
    assert "resubmit=true" in status
    assert not (output / "manifest.json").exists()

    again = launch("status", f"launch_dir={launch_dir}", "resubmit=true").stdout
    resubmitted = _submitted(again)
    assert list(resubmitted) == ["hash", "reduce", "tokenize", "merge"], again
    assert "submitted hash tasks 1:" in again and "submitted tokenize tasks 0-1:" in again
    assert "submitted reduce tasks 0-1:" in again
    subprocess.run(["scontrol", "release", *resubmitted.values()], capture_output=True)
    _wait_gone(list(resubmitted.values()))
    logs = "".join(p.read_text() for p in launch_dir.glob("*.err"))
    assert (output / "manifest.json").is_file(), logs
    assert "done: " in launch("status", f"launch_dir={launch_dir}").stdout
    record = json.loads((launch_dir / "launch.json").read_text())
    assert [j["stage"] for j in record["jobs"]][5:] == ["hash", "reduce", "tokenize", "merge"]
    assert record["jobs"][5]["tasks"] == [1]

    one = [*PREP[:1], *PREP[2:]]  # neo prep on one machine: no tasks, no slices
    done = subprocess.run(
        [NEO, "prep", "input=in", "output=classic", *one],
        cwd=corpus,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    merged, classic = Manifest.load(output), Manifest.load(corpus / "classic")
    assert streams(output) == streams(corpus / "classic")
    assert merged.sources == classic.sources and merged.totals == classic.totals
    assert merged.totals["duplicates"] == 3 + 4 + 1
    assert merged.run["tasks"] == 2 and merged.run["slices"] >= 4
    assert all(t["documents"] > 0 for t in merged.run["per_task"]), "both tasks had work"


@pytest.mark.slow
def test_slurm_near_dedup_across_files_equals_one_task_here(slurm, corpus):  # noqa: F811
    """dedup=near as SLURM arrays of 2 tasks: near copies planted across the two files (a few
    words changed, another ending) are dropped, and the tokens equal `neo prep tasks=1` here."""
    rng = random.Random(3)
    words = [f"w{i}" for i in range(400)]
    x, y = rng.choices(words, k=200), rng.choices(words, k=200)
    x2 = list(x)
    x2[50], x2[150] = "changed", "words"
    y2 = y[:190] + ["another", "ending"] * 5
    with open(corpus / "in" / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": " ".join(x), "meta": {"pile_set_name": "A"}}) + "\n")
        f.write(json.dumps({"text": " ".join(y2), "meta": {"pile_set_name": "A"}}) + "\n")
    with open(corpus / "in" / "b.jsonl", "a") as f:
        f.write(json.dumps({"text": " ".join(y), "meta": {"pile_set_name": "B"}}) + "\n")
        f.write(json.dumps({"text": " ".join(x2), "meta": {"pile_set_name": "B"}}) + "\n")
    args = ["prep", "launcher=slurm", "launch.array=2", "input=in", "output=near", "dedup=near"]
    out = launch(*args, *PREP, f"launch.workdir={corpus}", cwd=corpus).stdout
    jobs = _submitted(out)
    assert list(jobs) == ["plan", "hash", "reduce", "near", "tokenize", "merge"]
    _wait_gone(list(jobs.values()))
    launch_dir = Path(out.split("launch dir ")[1].splitlines()[0])
    logs = "".join(p.read_text() for p in launch_dir.glob("*.err"))
    assert (corpus / "near" / "manifest.json").is_file(), logs
    here = [NEO, "prep", "input=in", "output=here", "dedup=near", "tasks=1", *PREP]
    done = subprocess.run(here, cwd=corpus, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    merged, one = Manifest.load(corpus / "near"), Manifest.load(corpus / "here")
    assert streams(corpus / "near") == streams(corpus / "here")
    assert merged.sources == one.sources and merged.totals["near_duplicates"] == 2
    # x and y2 (a.jsonl) come first in input order: y and x2 (b.jsonl) go
    assert [merged.sources[s]["near_duplicates"] for s in "AB"] == [0, 2]
    assert merged.totals["duplicates"] == 3 + 4 + 1


def _fake_slurm(tmp_path, **commands: str) -> dict[str, str]:
    """A PATH holding only these commands (bash scripts), for SLURM answering as told."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in commands.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": str(bin_dir)}


def test_an_array_larger_than_slurm_allows_is_refused_before_submitting(corpus):
    env = _fake_slurm(
        corpus.parent,
        sbatch='echo submitted >> "$0.calls"; echo 1',
        scontrol='echo "MaxArraySize            = 4"',
        squeue="exit 0",
    )
    args = ["prep", "launcher=slurm", "input=in", "output=out", *PREP]
    proc = launch(*args, "launch.array=5", check=False, cwd=corpus, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "launch.array=5: this cluster's MaxArraySize is 4" in proc.stderr, proc.stderr
    assert not (corpus.parent / "bin" / "sbatch.calls").exists()
    assert sorted(p.name for p in corpus.iterdir()) == ["in"]
    launch(*args, "launch.array=4", cwd=corpus, env=env)  # the largest allowed
    assert (corpus.parent / "bin" / "sbatch.calls").read_text().count("submitted") == 5


def test_status_refuses_to_guess_when_squeue_fails(corpus):
    env = _fake_slurm(
        corpus.parent,
        sbatch="echo 7",
        scontrol="exit 1",
        squeue='echo "squeue: error: Unable to contact slurm controller" >&2; exit 1',
    )
    out = launch("prep", "launcher=slurm", "input=in", "output=out", *PREP, cwd=corpus, env=env)
    launch_dir = out.stdout.split("launch dir ")[1].splitlines()[0]
    for extra in ([], ["resubmit=true"]):
        proc = launch("status", f"launch_dir={launch_dir}", *extra, check=False, env=env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "squeue failed" in proc.stderr and "Unable to contact" in proc.stderr
        assert proc.stderr.strip().count("\n") == 0


def test_launching_prep_needs_no_torch(corpus):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from train.cli import main\n"
        "main(['launch', 'prep', 'launcher=slurm', 'launch.array=2', 'input=in', "
        "'launch.dry_run=true'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=corpus)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("#!/bin/bash") == 5


@pytest.mark.slow
def test_local_launcher_runs_every_stage_here(corpus):
    out = launch(
        "prep", "launcher=local", "launch.array=2", "input=in", "output=out", *PREP, cwd=corpus
    )
    manifest = Manifest.load(corpus / "out")
    assert manifest.run["tasks"] == 2 and manifest.totals["duplicates"] == 8, out.stdout
    assert not (corpus / "runs").exists()


def test_an_output_holding_other_files_is_refused_before_submitting(corpus):
    (corpus / "out").mkdir()
    (corpus / "out" / "notes.txt").write_text("mine")
    for extra in ([], ["overwrite=true"]):
        args = ["prep", "launcher=slurm", "input=in", "output=out", *extra, "launch.dry_run=true"]
        proc = launch(*args, check=False, cwd=corpus)
        assert proc.returncode == 2, proc.stdout
        assert "1 entry: notes.txt" in proc.stderr and "not a `neo prep` output" in proc.stderr
    assert (corpus / "out" / "notes.txt").read_text() == "mine"


def test_status_of_a_broken_launch_record_is_one_line(corpus):
    broken = corpus / "runs" / "launch" / "prep-x"
    broken.mkdir(parents=True)
    record = {
        "command_line": "neo launch prep",
        "overrides": ["input=in", "output=out", "tasks=2"],
        "tasks": 2,
        "stages": ["plan", "hash", "reduce", "tokenize", "merge"],
        "output": str(corpus / "out"),
        "workdir": str(corpus),
        "jobs": [{"stage": "plan", "job": "*", "tasks": None}],  # status globs logs by it
    }
    for text, message in [
        ("{", "launch.json is not a neo launch prep record"),
        ('{"tasks": 2}', "launch.json is not a neo launch prep record"),
        (json.dumps(record), "jobs[].job '*' is not a SLURM job id"),
        (
            json.dumps(record | {"jobs": [{"stage": "hash", "job": "9", "tasks": ["../x"]}]}),
            "jobs[].tasks ['../x'] are not task numbers",
        ),
    ]:
        (broken / "launch.json").write_text(text)
        proc = launch("status", f"launch_dir={broken}", check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0
