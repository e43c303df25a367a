"""`neo prep` as users run it: subprocesses, the bundled sample, crashes, Ctrl-C, memory."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from tmpfs import small_tmpfs

from data_prep.manifest import open_prepared
from data_prep.shards import IndexedDataset

NEO = str(Path(sys.executable).with_name("neo"))
WORDS = [
    "".join(random.Random(i).choices("abcdefghijklmnoprstuvwy", k=2 + i % 8)) for i in range(2000)
]


def write_corpus(path, megabytes, seed=0):
    """JSON lines of about `megabytes` MB: 10 KB documents, every one distinct."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    base = [" ".join(words[rng.integers(0, len(words), 1700)]) for _ in range(50)]
    sources = ["Github", "Pile-CC", "ArXiv"]
    with open(path, "w") as f:
        for i in range(int(megabytes * 100)):
            text = f"document {i}\n{base[i % len(base)]}"
            meta = {"pile_set_name": sources[i % 3]}
            f.write(json.dumps({"text": text, "meta": meta}) + "\n")
    return path


def start(args, cwd):
    """`neo` in its own process group (like a job on a terminal), line-buffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [NEO, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_line(proc, needle, timeout=120):
    seen = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return seen
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError(f"{needle!r} never printed; output:\n{''.join(seen)}")


def shard_hashes(directory):
    manifest, _ = open_prepared(directory, verify=True)
    return {name: info.sha256 for name, info in manifest.shards.items()}


@pytest.mark.slow
def test_prep_with_no_arguments_prepares_the_bundled_sample(neo, tmp_path):
    out = neo("prep").stdout
    for text in ("Github", "Enron Emails", "Gutenberg (PG-19)", "tokens/s", "peak memory"):
        assert text in out, out
    manifest, shards = open_prepared(tmp_path / "data" / "pile_sample", verify=True)
    assert manifest.totals["documents"] == 6444 and manifest.totals["duplicates"] == 3
    assert manifest.inputs[0]["sha256"].startswith("83af5b6c")
    assert manifest.tokenizer.eod_id == 50256 and manifest.dtype == "uint16"
    assert len(shards["train"]) == 1 and len(shards["validation"]) == 1
    assert "nothing to do" in neo("prep").stdout
    other = neo("prep", "seed=5", check=False)
    assert other.returncode == 2 and "seed: 1234 before, 5 now" in other.stderr


@pytest.mark.slow
def test_strict_exits_non_zero_at_the_first_bad_record(neo, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n{"text": "fine too"}\n')
    proc = neo("prep", "input=c.jsonl", "output=o", "strict=true", check=False)
    assert proc.returncode == 2
    assert "c.jsonl:2: the text field is not a string ('text' is int" in proc.stderr
    assert "strict=true" in proc.stderr
    lenient = neo("prep", "input=c.jsonl", "output=p").stdout
    assert "non_string_text" in lenient and "c.jsonl:2" in lenient


@pytest.mark.slow
def test_a_killed_run_leaves_only_complete_shards_and_resumes(neo, tmp_path):
    write_corpus(tmp_path / "c.jsonl", 4)
    args = ["prep", "input=c.jsonl", "shard_tokens=60000", "workers=2", "validation_fraction=0.05"]
    neo(*args, "output=fresh")
    proc = start([*args, "output=out"], tmp_path)
    wait_for_line(proc, "shard group 2 written")
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job dies at once: no cleanup runs
    proc.wait()
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()
    finals = sorted(out.glob("*.idx"))
    assert len(finals) >= 3
    for idx in finals:  # a final name means a complete shard, never a partial one
        IndexedDataset(idx.with_suffix(""))
    resumed = neo(*args, "output=out").stdout
    assert "resuming: " in resumed and "shard group(s) already complete" in resumed
    assert shard_hashes(out) == shard_hashes(tmp_path / "fresh")
    assert not list(out.glob(".*tmp*")) and not (out / ".prep").exists()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_a_rerun_continues(neo, tmp_path):
    write_corpus(tmp_path / "c.jsonl", 3, seed=1)
    args = ["prep", "input=c.jsonl", "output=out", "shard_tokens=50000", "workers=2"]
    proc = start(args, tmp_path)
    wait_for_line(proc, "shard group 0 written")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C on a terminal sends
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest
    assert "interrupted; rerun the same command to continue" in rest
    assert "Traceback" not in rest
    out = neo(*args).stdout
    assert "resuming: " in out
    manifest, _ = open_prepared(tmp_path / "out", verify=True)
    assert manifest.totals["documents"] == 300


def peak_tree_rss(args, cwd):
    """Run `neo` and sample the resident memory of it and all its processes every 20 ms."""
    proc = start(args, cwd)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass  # a process ended between listing and reading it
        time.sleep(0.02)
    output = proc.stdout.read()
    assert proc.returncode == 0, output
    return peak


@pytest.mark.slow
def test_memory_does_not_grow_with_the_corpus(tmp_path):
    write_corpus(tmp_path / "small.jsonl", 2)
    write_corpus(tmp_path / "large.jsonl", 20)
    common = ["prep", "workers=2", "validation_fraction=0.01"]
    small = peak_tree_rss([*common, "input=small.jsonl", "output=s"], tmp_path)
    large = peak_tree_rss([*common, "input=large.jsonl", "output=l"], tmp_path)
    tokens = json.loads((tmp_path / "l" / "manifest.json").read_text())["totals"]["tokens"]
    assert tokens > 4_000_000  # 10x the text, 10x the tokens ...
    growth = (large - small) / 2**20
    # ... but the same memory: holding the tokens alone would add 8+ MB, the text 18 MB.
    assert growth < 16, f"peak RSS {small / 2**20:.0f} MiB -> {large / 2**20:.0f} MiB"


def tree(directory):
    return {
        str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
        for p in sorted(Path(directory).rglob("*"))
    }


def error_line(proc):
    """The one line `neo` prints for a user's mistake (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("neo prep: error: "), proc.stderr
    return line


@pytest.mark.slow
def test_an_output_that_is_holds_or_lies_in_the_input_is_refused(neo, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "link").symlink_to("corpus")
    before = tree(tmp_path)
    for input, output, how in [  # the other cases: tests/data_prep/test_files.py
        ("corpus", "corpus", "is"),  # the reported command: it deleted the corpus
        ("link", "corpus/prepared", "lies inside"),
        ("corpus/a.jsonl", ".", "contains"),
    ]:
        proc = neo("prep", f"input={input}", f"output={output}", "overwrite=true", check=False)
        line = error_line(proc)
        assert f"output={output} {how} input " in line and "choose another output" in line, line
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_overwrite_refuses_a_folder_that_is_not_a_prep_output(neo, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "out" / "notes").mkdir(parents=True)
    (tmp_path / "out" / "thesis.tex").write_text("years of work")
    before = tree(tmp_path)
    for extra in ([], ["overwrite=true"]):
        line = error_line(neo("prep", "input=c.jsonl", "output=out", *extra, check=False))
        assert "out holds 2 entries: notes/, thesis.tex, and it is not a `neo prep` output" in line
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_a_prep_that_keeps_no_document_exits_2_and_marks_nothing_prepared(neo, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n{"body": "three"}\n')
    (tmp_path / "junk.jsonl").write_text("not json\n{also not\n")
    line = error_line(neo("prep", "input=c.jsonl", "output=out", check=False))
    assert "input=c.jsonl: 3 record(s) read, every one skipped (3 missing_text;" in line, line
    assert "data.text_field=text" in line
    line = error_line(neo("prep", "input=junk.jsonl", "output=out", check=False))
    assert "2 record(s) read, every one skipped (2 malformed_json;" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "junk.jsonl"]
    out = neo("prep", "input=c.jsonl", "output=out", "data.text_field=body").stdout
    assert "tokenized" in out and json.loads((tmp_path / "out" / "manifest.json").read_text())


@pytest.mark.slow
def test_a_killed_overwrite_leaves_the_old_output_aside_until_a_rerun_removes_it(neo, tmp_path):
    write_corpus(tmp_path / "c.jsonl", 2)
    args = ["prep", "input=c.jsonl", "output=out", "shard_tokens=40000", "workers=2"]
    neo(*args, "validation_fraction=0.5")
    proc = start([*args, "overwrite=true"], tmp_path)
    wait_for_line(proc, "shard group 0 written")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (aside,) = tmp_path.glob(".out.old-*")
    assert aside.name.endswith(f"-{proc.pid}") and (aside / "manifest.json").is_file()
    assert "resuming: " in neo(*args).stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_output_and_the_space(neo, tmp_path):
    write_corpus(tmp_path / "c.jsonl", 6)
    with small_tmpfs(tmp_path / "disk", size="4m") as disk:
        proc = neo("prep", "input=c.jsonl", f"output={disk}/out", "workers=2", check=False)
        line = error_line(proc)
        assert f"{disk}/out: no space left on device (" in line and "bytes free there" in line
