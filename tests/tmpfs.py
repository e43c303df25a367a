"""A real, small, full-able file system for the tests of a full disk: a tmpfs, where this user
may mount one (root, outside most sandboxes); the test is skipped elsewhere."""

import os
import subprocess
from contextlib import contextmanager

import pytest


@contextmanager
def small_tmpfs(path, size="1m"):
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
