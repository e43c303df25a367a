"""data_prep/files.py: outputs apart from inputs, overwrite only of a command's own kind of
output, temporary names owned by host and pid, and a full disk as one line."""

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tmpfs import small_tmpfs

from data_prep.files import (
    NoSpaceError,
    OutputExistsError,
    OutputKind,
    OutputOverlapsInput,
    atomic_dir,
    check_apart,
    is_out_of_space,
    marked_by,
    remove_stale,
    when_full,
)

ROOT = Path(__file__).resolve().parents[2]
EXPORT = OutputKind("a `neo export` output", marked_by("neotrain.json", "checksums.sha256"))


def test_an_output_that_is_holds_or_lies_in_an_input_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("{}\n")
    (tmp_path / "link").symlink_to(corpus)
    for output, given, how in [
        (corpus, corpus, "is"),
        (tmp_path / "link", corpus, "is"),  # the same folder through a link
        (corpus / "out", corpus, "lies inside"),
        (corpus, corpus / "a.jsonl", "contains"),
        (tmp_path, tmp_path / "link" / "a.jsonl", "contains"),
    ]:
        with pytest.raises(OutputOverlapsInput, match=rf"output={output} {how} input {given} "):
            check_apart(output, [given])
    check_apart(tmp_path / "corpus2", [corpus])  # a name that merely starts the same
    check_apart(tmp_path / "out", [corpus / "a.jsonl"])


def test_atomic_dir_refuses_to_replace_an_input(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_text("weights")
    with (
        pytest.raises(OutputOverlapsInput, match="ckpt"),
        atomic_dir(tmp_path / "ckpt", overwrite=True, inputs=[tmp_path / "ckpt"]),
    ):
        pass
    assert (tmp_path / "ckpt" / "model.safetensors").read_text() == "weights"


def test_overwrite_replaces_only_the_commands_own_kind_of_output(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("notes.txt", "b.txt", "c.txt", "d.txt"):
        (out / name).write_text("mine")
    (out / "sub").mkdir()
    with pytest.raises(OutputExistsError) as refused, atomic_dir(out, overwrite=True, kind=EXPORT):
        pass
    message = str(refused.value)
    assert "5 entries: b.txt, c.txt, d.txt, ..." in message, message
    assert "not a `neo export` output" in message and "\n" not in message
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", "c.txt", "d.txt", "notes.txt", "sub"]
    (out / "neotrain.json").write_text("{}")  # now it is one
    with atomic_dir(out, overwrite=True, kind=EXPORT) as tmp:
        (tmp / "neotrain.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["neotrain.json"]
    assert not list(tmp_path.glob(".hf.*"))


def test_without_a_kind_the_refusal_names_what_overwrite_would_delete(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with (
        pytest.raises(OutputExistsError, match=r"1 entry: mine.txt.*overwrite=true to delete"),
        atomic_dir(tmp_path / "out"),
    ):
        pass
    with atomic_dir(tmp_path / "out", True) as tmp:  # the old call form still replaces
        (tmp / "new").write_text("x")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]


def test_temporary_names_carry_host_and_pid(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(".out.tmp-") and tmp.name.endswith(f"-{os.getpid()}")
        assert socket.gethostname().split(".")[0].replace("-", "_") in tmp.name.replace("-", "_")


KILLED_WRITER = """
import os, signal, sys
from data_prep.files import atomic_dir
with atomic_dir(sys.argv[1], overwrite=True) as tmp:
    (tmp / "half").write_text("x")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writers_temporary_directory_is_removed_by_the_next_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "out")], env=env)
    assert proc.returncode == -signal.SIGKILL
    (left,) = tmp_path.glob(".out.tmp-*")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_of_live = left.name.rpartition("-")[0] + f"-{live.pid}"
        (tmp_path / pid_of_live).mkdir()  # same host, a live process
        (tmp_path / ".out.old-otherhost-1").mkdir()  # another host: its pid means nothing here
        (tmp_path / ".out.tmp-123").mkdir()  # an older neotrain's name: owner unknown
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "done").write_text("x")
        remaining = sorted(p.name for p in tmp_path.iterdir())
        assert remaining == sorted([".out.old-otherhost-1", ".out.tmp-123", pid_of_live, "out"])
    finally:
        live.kill()
        live.wait()
    assert remove_stale(tmp_path / "out") == [tmp_path / pid_of_live]


def test_a_full_disk_is_one_line_with_the_numbers(tmp_path):
    with (
        pytest.raises(NoSpaceError) as full,
        when_full(tmp_path / "out", needed=lambda: 12_345_678),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")
    message = str(full.value)
    assert message.startswith(f"{tmp_path / 'out'}: no space left on device (")
    assert "bytes free there, about 12,345,678 needed" in message and "\n" not in message
    assert full.value.exit_code == 2 and full.value.errno == errno.ENOSPC
    with pytest.raises(KeyError), when_full(tmp_path):  # anything else passes through
        raise KeyError("x")


class SafetensorError(Exception):
    """What safetensors raises (its Rust I/O error as text)."""


def test_a_librarys_worded_no_space_error_is_recognised():
    text = "Error while serializing: I/O error: No space left on device (os error 28)"
    assert is_out_of_space(SafetensorError(text))
    assert is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_out_of_space(OSError(errno.EACCES, "Permission denied"))
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as e:
            raise RuntimeError("while writing") from e
    except RuntimeError as wrapped:
        assert is_out_of_space(wrapped)


@pytest.fixture
def full_fs(tmp_path):
    with small_tmpfs(tmp_path / "tmpfs") as path:
        yield path


def test_a_real_full_disk_through_safetensors_is_one_line(full_fs):
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save_file

    with (
        pytest.raises(NoSpaceError, match=r"no space left on device \(\d[\d,]* bytes free"),
        when_full(full_fs / "hf", needed=lambda: 4 << 20),
        atomic_dir(full_fs / "hf") as tmp,
    ):
        save_file({"w": np.zeros(1 << 20, np.float32)}, str(tmp / "model.safetensors"))
    assert list(full_fs.iterdir()) == [], "the temporary directory is gone"
