"""`neo train` on prepared data damaged after `neo prep` wrote it: one line naming the shard and
document (or the manifest key), exit 2, before the first step."""

import json
import shutil

import numpy as np
import pytest
from runs import train


def damaged(corpus, tmp_path):
    """A copy of the session's prepared corpus, to damage."""
    copy = tmp_path / "data"
    shutil.copytree(corpus, copy)
    return copy, copy / "train-00000.bin"


def error_line(proc):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("neo train: error: "), proc.stderr[-4000:]
    return line


@pytest.mark.slow
def test_a_shard_of_0xff_bytes_is_named_not_an_index_error(tmp_path, corpus):
    data, shard = damaged(corpus, tmp_path)
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    line = error_line(train(tmp_path / "run", data, check=False))
    assert f"shard {shard}: document 0 holds token id 65535 (its token 0), outside the " in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_flipped_bytes_are_found_and_a_hand_edited_range_is_named(tmp_path, corpus):
    data, shard = damaged(corpus, tmp_path)
    good = shard.read_bytes()
    tokens = np.frombuffer(good, np.uint16).copy()
    rng = np.random.default_rng(0)
    for i in rng.choice(np.flatnonzero(tokens < 50000), size=100, replace=False):
        tokens[i] ^= 1  # 100 bytes changed, every id still in the vocabulary
    shard.write_bytes(tokens.tobytes())
    line = error_line(train(tmp_path / "flipped", data, check=False))
    assert f"shard {shard}: xxh3 " in line and "changed since neo prep wrote it" in line

    shard.write_bytes(good)
    manifest = json.loads((data / "manifest.json").read_text())
    ranges = manifest["shards"]["train-00000"]["sources"]
    name = sorted(ranges)[-1]
    ranges[name]["end"] += 1000
    (data / "manifest.json").write_text(json.dumps(manifest))
    blend = f"data.blend=[{{path:{data},source:'{name}'}}]"
    line = error_line(train(tmp_path / "edited", data, blend, check=False))
    assert f"manifest.json: shards.train-00000.sources.{name}: documents [" in line
    assert "(a corrupt or hand-edited manifest)" in line
