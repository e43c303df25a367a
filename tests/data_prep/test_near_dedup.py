"""`dedup=near`: MinHash signatures in the hash stage, LSH + verified pairs + union-find in the
reduce; near duplicates planted across files are removed, unrelated documents kept, and the
decisions (and shards) are the same for any number of tasks."""

import io
import os
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from test_prep import WORDS, documents, shard_bytes, write_jsonl
from test_stages import NEO, content, staged_by_1_2_and_3_tasks

from data_prep.config import NearDedupConfig, PrepConfig, PrepConfigError
from data_prep.near import Signatures, Signer, near_duplicates, shingles
from data_prep.plan import Planned
from data_prep.progress import PrepError
from data_prep.report import print_summary
from data_prep.stages import run_stages, unfinished


def config(tmp_path, name, **overrides):
    values = dict(input=str(tmp_path / "in"), output=str(tmp_path / name), workers=1)
    values |= dict(tasks=2, slice_bytes=6000, validation_fraction=0.2, shard_tokens=4000)
    overrides["near"] = NearDedupConfig(**overrides.get("near", {}))
    return PrepConfig(**(values | {"dedup": "near"} | overrides))


def staged(tmp_path, name, **overrides):
    cfg = config(tmp_path, name, **overrides)
    return run_stages(cfg, batch_bytes=2000, console=Console(file=io.StringIO(), width=200))


def changed(words, at, rng):
    """`words` with the words at positions `at` replaced by other words."""
    out = list(words)
    for i in at:
        out[i] = rng.choice([w for w in WORDS if w != out[i]]) + "x"
    return out


def doc(words, source):
    return {"text": " ".join(words), "meta": {"pile_set_name": source}}


@pytest.fixture
def corpus(tmp_path):
    """Three files; `a.jsonl` many slices long. Planted, each under its own source so that the
    manifest's counts show what happened to it:
      First   x with two words changed, early in a.jsonl: the first of x's cluster, kept;
      Near    x itself (b), x with two other words changed (c): near duplicates of First;
      Ending  y, kept; EndNear: y with a different last 15 words (c), removed;
      Exact   an exact copy of x (c): removed as an exact copy of Near's x, not counted as near;
      Half    x with every other word changed (Jaccard near 0): kept."""
    rng = random.Random(5)
    x, y = rng.choices(WORDS, k=300), rng.choices(WORDS, k=300)
    first = changed(x, [100, 200], rng)
    near_c = changed(x, [50, 250], rng)
    ending = y[:285] + rng.choices(WORDS, k=15)
    half = changed(x, range(0, 300, 2), rng)
    (tmp_path / "in").mkdir()
    a, b, c = documents(80, seed=11), documents(40, seed=12), documents(30, seed=13)
    write_jsonl(tmp_path / "in" / "a.jsonl", a[:5] + [doc(first, "First")] + a[5:] + [doc(y, "Y")])
    write_jsonl(tmp_path / "in" / "b.jsonl.zst", b[:20] + [doc(x, "Near")] + b[20:], compress=True)
    planted = [doc(near_c, "Near"), doc(ending, "EndNear"), doc(x, "Exact"), doc(half, "Half")]
    write_jsonl(tmp_path / "in" / "c.jsonl", c[:10] + planted + c[10:])
    return tmp_path


def test_near_duplicates_across_files_go_the_same_way_for_1_2_and_3_tasks(corpus):
    _, two, three = staged_by_1_2_and_3_tasks(corpus, run=staged)
    assert three.run["slices"] >= 4, "a.jsonl is cut into several slices"
    sources = two.sources
    assert sources["First"]["documents"] == 1 and sources["Y"]["documents"] == 1
    assert sources["Half"]["documents"] == 1
    assert sources["Near"]["documents"] == 0 and sources["Near"]["near_duplicates"] == 2
    assert sources["EndNear"]["near_duplicates"] == 1 and sources["EndNear"]["documents"] == 0
    assert sources["Exact"]["duplicates"] == 1 and sources["Exact"]["near_duplicates"] == 0
    assert two.totals["near_duplicates"] == 3
    assert two.settings["near_dedup"]["threshold"] == 0.8
    # Against exact dedup alone: the same documents but the three near duplicates.
    exact = staged(corpus, "exact", dedup="exact")
    assert exact.totals["near_duplicates"] == 0 and "near_dedup" not in exact.settings
    assert exact.totals["documents"] == two.totals["documents"] + 3
    for name in ("Github", "Pile-CC", "Enron Emails"):  # the unrelated documents all survive
        assert exact.sources[name]["documents"] == two.sources[name]["documents"]
    tables = []
    for manifest in (two, exact):
        out = io.StringIO()
        print_summary(Console(file=out, width=200), manifest)
        tables.append(out.getvalue())
    assert "near dups" in tables[0] and "near dups" not in tables[1]


def test_hash_stage_writes_signatures_and_a_changed_threshold_is_refused(corpus):
    staged(corpus, "out", stage="plan")
    state = Planned.load(config(corpus, "out"))
    staged(corpus, "out", stage="hash", task=1)
    assert unfinished(state)["hash"] == [0] and unfinished(state)["reduce"] == [0, 1]
    assert unfinished(state)["near"] == [0]
    signed = sorted((corpus / "out" / ".prep" / "minhash").iterdir())
    hashed = sorted((corpus / "out" / ".prep" / "hash").iterdir())
    assert [p.name for p in signed] == [p.name for p in hashed] and signed
    for s, h in zip(signed, hashed, strict=True):
        assert np.load(s).shape == (len(np.load(h)), 128) and np.load(s).dtype == np.uint32
    with pytest.raises(
        PrepError, match=r"prepared differently: near_dedup: .*0\.8.* before, .*0\.9.* now"
    ):
        staged(corpus, "out", stage="hash", task=0, near={"threshold": 0.9})


def test_a_task_with_another_datasketch_version_is_refused(corpus, monkeypatch):
    """Signatures depend on datasketch's hashing: a task signing with another installed
    version than the plan's would disagree with the others without a word."""
    staged(corpus, "out", stage="plan")
    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "9.9.9" if name == "datasketch" else real(name)
    )
    with pytest.raises(PrepError, match=r"prepared differently: near_dedup: .*9\.9\.9.* now"):
        staged(corpus, "out", stage="hash", task=0)


def test_a_hash_rerun_redoes_a_slice_killed_between_its_files_and_bad_signatures_are_named(
    corpus,
):
    whole = staged(corpus, "whole")
    staged(corpus, "out", stage="plan")
    staged(corpus, "out", stage="hash", task=0)
    staged(corpus, "out", stage="hash", task=1)
    prep = corpus / "out" / ".prep"
    (prep / "minhash" / "00002.npy").unlink()
    staged(corpus, "out", stage="reduce", task=0)
    with pytest.raises(PrepError, match=r"stage=reduce has not finished for task\(s\) 1 of"):
        staged(corpus, "out", stage="near")
    staged(corpus, "out", stage="reduce", task=1)
    with pytest.raises(PrepError, match=r"minhash/00002.npy: is missing, not \(\d+, 128\)"):
        staged(corpus, "out", stage="near")
    np.save(prep / "minhash" / "00001.npy", np.zeros((3, 128), np.uint32))
    with pytest.raises(PrepError, match=r"00001.npy: holds signatures of shape \(3, 128\), not"):
        staged(corpus, "out", stage="near")
    # As a task killed after its signatures, before its digests (the slice's marker):
    (prep / "hash" / "00001.npy").unlink()
    (prep / "hash" / "00002.npy").unlink()
    staged(corpus, "out", stage="hash", task=0)
    staged(corpus, "out", stage="hash", task=1)
    assert content(staged(corpus, "out")) == content(whole)
    assert shard_bytes(corpus / "out") == shard_bytes(corpus / "whole")


def test_signatures_depend_on_the_text_alone():
    texts = ["one two three four five six", "", "Six five four three two one", "word"]
    signer = Signer(5, 64, 1)
    together = signer.sign(texts)
    alone = np.concatenate([Signer(5, 64, 1).sign([t]) for t in reversed(texts)])[::-1]
    assert together.dtype == np.uint32 and np.array_equal(together, alone)
    assert not np.array_equal(together, Signer(5, 64, 2).sign(texts)), "the seed matters"
    assert (together[1] == 0xFFFFFFFF).all(), "no words, no shingles"
    assert list(shingles("A b, c!", 5)) == [b"a b c"]
    assert list(shingles("a b c d E f", 5)) == [b"a b c d e", b"b c d e f"]


def test_a_long_document_is_signed_in_chunks_to_the_same_signature(monkeypatch):
    rng = random.Random(3)
    text = " ".join(rng.choices(WORDS, k=3000))
    whole = Signer(5, 32, 1).sign([text])
    monkeypatch.setattr("data_prep.near.CHUNK_SHINGLES", 7)
    assert np.array_equal(Signer(5, 32, 1).sign([text]), whole)


def signature_files(tmp_path, rows):
    """Two slices' signature files (the first holds 3 documents) from rows of integers."""
    rows = np.array(rows, np.uint32)
    paths = [tmp_path / "0.npy", tmp_path / "1.npy"]
    np.save(paths[0], rows[:3])
    np.save(paths[1], rows[3:])
    return Signatures(paths)


def test_clusters_join_through_chains_and_keep_their_first_document(tmp_path):
    a = list(range(1, 9))
    b = a[:7] + [100]  # a ~ b: 7/8
    c = [200] + b[1:]  # b ~ c: 7/8, a !~ c: 6/8
    empty = [0xFFFFFFFF] * 8
    unrelated = list(range(50, 58))
    signatures = signature_files(tmp_path, [c, unrelated, empty, b, a, empty])
    # c (0) and a (4) meet only through b (3); the empty documents (2, 5) match nothing.
    dropped = near_duplicates(signatures, np.arange(6), bands=8, threshold=0.8)
    assert dropped.tolist() == [False, False, False, True, True, False]
    # Only candidates take part: without b the chain breaks.
    dropped = near_duplicates(signatures, np.array([0, 1, 2, 4, 5]), bands=8, threshold=0.8)
    assert not dropped.any()
    assert near_duplicates(signatures, np.arange(6), bands=8, threshold=0.9).sum() == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dedup="fuzzy"), "dedup='fuzzy' is not one of exact, near, none"),
        (dict(tasks=0), "dedup=near needs the staged pipeline: add tasks=1"),
        (dict(near={"bands": 7}), "near.bands=7 does not divide near.num_perm=128"),
        (dict(near={"threshold": 0.0}), r"near.threshold=0.0 must be in \(0, 1\]"),
        (dict(near={"ngram": 0}), "near.ngram=0, near.num_perm=128 and near.bands=16 must be"),
        (dict(dedup="exact", near={"ngram": 3}), "near.ngram=3 is not read: dedup=exact"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, overrides, message):
    cfg = config(tmp_path, "out", **overrides)
    with pytest.raises(PrepConfigError, match=message):
        cfg.validate()


def test_true_and_false_still_mean_exact_and_none(tmp_path):
    for value, mode in [(True, "exact"), ("false", "none"), ("True", "exact"), ("none", "none")]:
        cfg = config(tmp_path, "out", dedup=value).validate()
        assert cfg.dedup_mode == mode and cfg.deduplicates == (mode != "none")


@pytest.mark.slow
def test_the_cli_refuses_a_bad_dedup_in_one_line(tmp_path):
    for args, message in [
        (["dedup=fuzzy"], "dedup='fuzzy' is not one of exact, near, none"),
        (["dedup=near"], "dedup=near needs the staged pipeline: add tasks=1"),
    ]:
        proc = subprocess.run(
            [NEO, "prep", f"output={tmp_path / 'out'}", *args], capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().startswith("neo prep: error: ") and message in proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
        assert not (tmp_path / "out").exists()


def test_prep_does_not_import_datasketch_until_it_signs():
    """datasketch imports scipy (1.7 s): every `neo prep` and each encode worker (the
    forkserver preloads data_prep.encode) paid it, and the slower worker start made
    test_a_killed_worker_is_an_error_not_a_hang fail."""
    code = "import sys, data_prep.stages, data_prep.encode; print('datasketch' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
