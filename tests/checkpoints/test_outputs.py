"""Nothing a user made is deleted or replaced without being named: an output never lands on an
input, overwrite=true replaces only the command's own kind of output, a full disk is one line,
and what a killed export left behind is removed by the next one."""

import errno
import os
import shutil
import subprocess
import sys

import pytest
from test_hf import make_checkpoint

import train.checkpoints.hf
from data_prep.files import NoSpaceError, OutputExistsError, owned_name
from train.checkpoints.export import export_hf


@pytest.fixture
def two_models(tmp_path):
    """runs/par/r1 and runs/par/r2: two neotrain checkpoints side by side."""
    for name in ("r1", "r2"):
        make_checkpoint(tmp_path / "runs" / "par" / name)
    return tmp_path / "runs" / "par"


def snapshot(directory):
    return sorted((p.relative_to(directory), p.stat().st_size) for p in directory.rglob("*"))


@pytest.mark.parametrize(
    ("verb", "output", "how"),
    [
        ("export", "runs/par", "contains input"),  # it replaced both runs, the input included
        ("export", "runs/par/r1", "is input"),
        ("export", "runs/par/r1/hf", "lies inside input"),
        ("import", "runs/par/r1", "is input"),
    ],
)
def test_an_output_on_an_input_is_refused_even_with_overwrite(two_models, neo, verb, output, how):
    root = two_models.parent.parent
    before = snapshot(root)
    if verb == "import":  # import reads a Hugging Face directory
        export_hf(two_models / "r1", two_models / "hf")
        shutil.rmtree(two_models / "r1")
        shutil.move(two_models / "hf", two_models / "r1")
        before = snapshot(root)
    proc = neo(verb, "input=runs/par/r1", f"output={output}", "overwrite=true", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert f"output={output} {how} runs/par/r1" in line and "\n" not in line, line
    assert snapshot(root) == before


def test_overwrite_replaces_an_earlier_export_and_nothing_else(tmp_path, neo):
    make_checkpoint(tmp_path / "ckpt")
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("notes.txt", "data.csv", "plots", "draft.md"):
        (mine / name).write_text("keep")
    proc = neo("export", "input=ckpt", "output=mine", "overwrite=true", "usage=false", check=False)
    assert proc.returncode == 2, proc.stderr
    assert (
        "mine holds 4 entries: data.csv, draft.md, notes.txt, ..., and it is not a `neo export`"
        in (proc.stderr)
    )
    assert sorted(p.name for p in mine.iterdir()) == ["data.csv", "draft.md", "notes.txt", "plots"]

    neo("export", "input=ckpt", "output=hf", "usage=false")
    (tmp_path / "hf" / "stale.txt").write_text("from before")
    neo("export", "input=ckpt", "output=hf", "overwrite=true", "usage=false")
    assert not (tmp_path / "hf" / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]


def test_generate_never_writes_over_its_prompts(tmp_path, neo):
    make_checkpoint(tmp_path / "ckpt")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\nThe cat\n")
    proc = neo(
        "generate",
        "checkpoint=ckpt",
        "prompts_file=p.txt",
        "output=p.txt",
        "overwrite=true",
        "max_new_tokens=2",
        check=False,
    )
    assert proc.returncode == 2 and "output=p.txt is prompts_file p.txt" in proc.stderr
    assert prompts.read_text() == "Hello there\nThe cat\n"


def test_eval_results_never_land_on_the_checkpoint(tmp_path, neo):
    make_checkpoint(tmp_path / "ckpt")
    proc = neo("eval", "checkpoint=ckpt", "output=ckpt", "overwrite=true", check=False)
    assert proc.returncode == 2 and "output=ckpt is checkpoint ckpt" in proc.stderr, proc.stderr


def test_sft_never_writes_over_its_base(tmp_path, neo):
    make_checkpoint(tmp_path / "runs" / "x" / "model")
    proc = neo("sft", "base=runs/x/model", "run_dir=runs/x", "max_steps=1", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "run_dir=runs/x holds base=runs/x/model" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs" / "x").iterdir()) == ["model"]


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "ckpt")

    def full(*args, **kwargs):  # what safetensors raises (SafetensorError) when the disk fills
        raise RuntimeError("I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(train.checkpoints.hf, "save_tensors", full)
    with pytest.raises(NoSpaceError) as e:
        export_hf(tmp_path / "ckpt", tmp_path / "hf", usage=False)
    line = str(e.value)
    assert line.startswith(f"{tmp_path / 'hf'}: no space left on device (") and "\n" not in line
    assert "bytes free there, about " in line and " needed" in line
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_what_a_killed_export_left_is_removed_by_the_next(tmp_path):
    """A SIGKILL mid-export leaves `.hf.tmp-HOST-PID` (model-sized); the next export removes
    it, since that pid is gone, and never a live process's."""
    make_checkpoint(tmp_path / "ckpt")
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    mine = owned_name(tmp_path / "hf", "tmp").name  # .hf.tmp-HOST-PID, this process's
    host = mine.removeprefix(".hf.tmp-").rsplit("-", 1)[0]
    left = tmp_path / f".hf.tmp-{host}-{done.stdout.strip()}"  # its process has ended
    left.mkdir()
    (left / "model.safetensors").write_bytes(os.urandom(1024))
    alive = tmp_path / f".hf.old-{host}-1"  # pid 1 runs: never removed
    alive.mkdir()
    export_hf(tmp_path / "ckpt", tmp_path / "hf", usage=False)
    assert not left.exists() and alive.exists()
    with pytest.raises(
        OutputExistsError,
        match=r"hf is a `neo export` directory \(config.json, checksums.sha256\) already",
    ):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", usage=False)
