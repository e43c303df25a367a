"""`neo prep tasks=N`: slicing by byte range, the staged pipeline (plan, hash, reduce, tokenize,
merge), its independence from the task count, and its relation to the one-machine run."""

import io
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from rich.console import Console
from test_prep import documents, shard_bytes, write_jsonl

from data_prep.config import STAGES, PrepConfig, PrepConfigError
from data_prep.files import OutputExistsError
from data_prep.groups import Router
from data_prep.inputs import InputFile
from data_prep.manifest import open_prepared
from data_prep.plan import Planned
from data_prep.prep import PrepError, prepare
from data_prep.readers import split_lines
from data_prep.slices import Slice, _range_lines, plan_slices, slice_owners, task_slices
from data_prep.stages import run_stages, unfinished

NEO = str(Path(sys.executable).with_name("neo"))


def config(tmp_path, name, **overrides):
    values = dict(input=str(tmp_path / "in"), output=str(tmp_path / name), workers=1)
    values |= dict(tasks=2, slice_bytes=6000, validation_fraction=0.2, shard_tokens=4000)
    return PrepConfig(**(values | overrides))


def staged(tmp_path, name, **overrides):
    out = io.StringIO()
    cfg = config(tmp_path, name, **overrides)
    return run_stages(cfg, batch_bytes=2000, console=Console(file=out, width=200))


def staged_by_1_2_and_3_tasks(tmp_path, run=staged, **overrides):
    """`run` (a `staged`) for 1, 2 and 3 tasks, into one/, two/ and three/; their manifests (all
    but the run record) and shard files must be identical. Returns the three manifests."""
    names = ("one", "two", "three")
    manifests = [run(tmp_path, name, tasks=n, **overrides) for n, name in enumerate(names, 1)]
    assert content(manifests[0]) == content(manifests[1]) == content(manifests[2])
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "three")
    return manifests


def content(manifest):
    data = manifest.to_dict()
    del data["run"]
    return data


@pytest.fixture
def corpus(tmp_path):
    """An uncompressed file many slices long (one line longer than a slice: a slice where no
    line starts), a compressed one (cut too, by its uncompressed size) and a small one, with
    exact copies planted within and across files, and two bad lines."""
    (tmp_path / "in").mkdir()
    a, b, c = documents(120, seed=1), documents(60, seed=2), documents(20, seed=3)
    long = {"text": " ".join(["a long document"] * 1200), "meta": {"pile_set_name": "Long"}}
    big = write_jsonl(tmp_path / "in" / "a.jsonl", a[:60] + [long] + a[60:] + b[:5] + a[:3])
    with open(big, "ab") as f:
        f.write(b"not json\n\n")
        f.write(json.dumps(a[7]).encode() + b"\n")
    write_jsonl(tmp_path / "in" / "b.jsonl.zst", b + a[10:14], compress=True)
    write_jsonl(tmp_path / "in" / "c.jsonl", c + c[:2])
    return tmp_path


def streams(manifest):
    """Per (split, source): every document's tokens, in shard order."""
    _, shards = open_prepared(manifest.directory, verify=True)
    out = defaultdict(list)
    for split, opened in shards.items():
        for shard in opened:
            for source, r in manifest.shards[shard.prefix.name].sources.items():
                out[(split, source)] += [shard[i].tolist() for i in range(r.start, r.end)]
    return dict(out)


# ---------------------------------------------------------------------------------------------
# Slices


def test_byte_ranges_own_the_lines_that_start_in_them(tmp_path):
    lines = [b"first", b"", b"x" * 40, b"a", b"", b"", b"last without a newline"]
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\n".join(lines))
    whole = list(split_lines(iter([path.read_bytes()])))
    size = path.stat().st_size
    file = InputFile(str(path), "jsonl", size, "f")
    for step in range(1, size + 2):
        got = []
        for start in range(0, size, step):
            got += list(_range_lines(file, start, min(start + step, size)))
        assert got == whole, f"slices of {step} bytes"


def test_slices_do_not_depend_on_the_task_count(tmp_path):
    files = [
        InputFile("a.jsonl", "jsonl", 25, "a"),
        InputFile("b.jsonl.zst", "jsonl.zst", 100, "b"),
        InputFile("c.jsonl", "jsonl", 10, "c"),
    ]
    slices = plan_slices(files, 10)
    assert slices == [
        Slice(0, 0, 10, 10),
        Slice(0, 10, 20, 10),
        Slice(0, 20, 25, 5),
        Slice(1, 0, None, 100),
        Slice(2, 0, None, 10),
    ]
    small = [InputFile(f"{name}.txt", "txt", 3, "t") for name in "abc"]
    small += [InputFile("d.jsonl.zst", "jsonl.zst", 20, "d"), InputFile("e.txt", "txt", 2, "t")]
    packed = [Slice(0, 0, None, 9, files=3), Slice(3, 0, None, 20), Slice(4, 0, None, 2)]
    assert plan_slices(small, 10) == packed, "small whole files share a slice"
    for tasks in (1, 2, 3, 7):
        owners = slice_owners(slices, tasks)
        assert owners == sorted(owners) and owners[-1] <= tasks - 1
        ranges = [task_slices(slices, t, tasks) for t in range(tasks)]
        assert [n for r in ranges for n in r] == list(range(len(slices)))


# ---------------------------------------------------------------------------------------------
# The pipeline


def test_the_output_is_the_same_for_1_2_and_3_tasks_and_matches_one_machine(corpus):
    one, two, three = staged_by_1_2_and_3_tasks(corpus)
    assert len(one.splits["train"]) > 6, "several slices, some with several shard groups"
    spans = [t["slices"] for t in three.run["per_task"]]
    assert spans[0][0] == 0 and spans[-1][1] == three.run["slices"] == 16
    assert all(a[1] == b[0] < b[1] for a, b in zip(spans, spans[1:], strict=False))
    with_shards = {name.split("-")[1] for name in one.shards}
    # No line starts in slices 3-5 (inside the long line); slices 13 and 15 (the ends of
    # b.jsonl.zst and c.jsonl) hold only copies.
    assert with_shards == {f"{n:05d}" for n in range(16)} - {f"{n:05d}" for n in (3, 4, 5, 13, 15)}
    # The one-machine run keeps the same documents, in the same order per split and source.
    cfg = dict(input=str(corpus / "in"), output=str(corpus / "classic"), workers=1)
    classic = prepare(
        PrepConfig(**cfg, validation_fraction=0.2, shard_tokens=4000),
        batch_bytes=2000,
        console=Console(file=io.StringIO()),
    )
    assert streams(classic) == streams(two)
    assert classic.sources == two.sources and classic.totals == two.totals
    assert two.totals["duplicates"] == 5 + 3 + 1 + 4 + 2 and two.totals["skipped"] == 2
    assert {k: v["count"] for k, v in two.skipped.items()} == {"malformed_json": 1, "blank_line": 1}
    where = two.skipped["malformed_json"]["examples"][0]["where"]
    assert "a.jsonl (the slice from byte" in where and ": line " in where
    assert sum(t["skipped"] for t in two.run["per_task"]) == 2
    assert not (corpus / "two" / ".prep").exists()


def test_dedup_false_keeps_every_copy_without_a_hash_stage(corpus):
    manifest = staged(corpus, "out", dedup=False)
    assert manifest.totals["duplicates"] == 0 and manifest.totals["documents"] == 216


def test_stages_one_by_one_refuse_while_a_task_is_missing_and_name_it(corpus):
    whole = staged(corpus, "whole", tasks=3)

    def run(stage, task=None):
        return staged(corpus, "steps", tasks=3, stage=stage, task=task)

    with pytest.raises(PrepError, match="no .prep/plan.json; run `neo prep stage=plan`"):
        run("hash", 0)
    run("plan")
    state = Planned.load(config(corpus, "steps", tasks=3))
    everything = {"hash": [0, 1, 2], "reduce": [0, 1, 2], "tokenize": [0, 1, 2], "merge": [0]}
    assert unfinished(state) == {"plan": [], "near": []} | everything
    run("hash", 0)
    run("hash", 2)
    assert unfinished(state)["hash"] == [1]
    with pytest.raises(PrepError, match=r"stage=hash has not finished for task\(s\) 1 of tasks=3"):
        run("reduce", 0)
    run("hash", 1)
    run("reduce", 2)
    run("reduce", 0)
    assert unfinished(state)["reduce"] == [1]
    with pytest.raises(PrepError, match=r"stage=reduce has not finished for task\(s\) 1 of tasks"):
        run("tokenize", 1)
    run("reduce", 1)
    run("tokenize", 1)
    assert unfinished(state) | {"merge": []} == dict.fromkeys(STAGES, []) | {"tokenize": [0, 2]}
    with pytest.raises(PrepError, match=r"stage=tokenize has not finished for task\(s\) 0, 2 of"):
        run("merge")
    run("tokenize", 0)
    run("tokenize", 2)
    merged = run("merge")
    assert content(merged) == content(whole)
    assert shard_bytes(corpus / "steps") == shard_bytes(corpus / "whole")


def test_a_finished_stage_is_not_redone(corpus, monkeypatch):
    staged(corpus, "out", stage="plan")
    staged(corpus, "out", stage="hash", task=0)
    hashed = sorted((corpus / "out" / ".prep" / "hash").iterdir())
    stamps = [p.stat().st_mtime_ns for p in hashed]

    def no_reading(*args, **kwargs):
        raise AssertionError("read again")

    monkeypatch.setattr("data_prep.stages.read_slice", no_reading)
    staged(corpus, "out", stage="hash", task=0)
    assert [p.stat().st_mtime_ns for p in hashed] == stamps
    monkeypatch.undo()
    manifest = staged(corpus, "out")
    monkeypatch.setattr("data_prep.stages.read_slice", no_reading)
    again = staged(corpus, "out")
    assert content(again) == content(manifest)


def test_a_task_killed_midway_leaves_no_shard_and_its_rerun_redoes_only_its_slice(
    corpus, monkeypatch
):
    small = dict(shard_tokens=1000)  # several shard groups in one slice
    whole = staged(corpus, "whole", **small)
    staged(corpus, "out", **small, stage="plan")
    staged(corpus, "out", **small, stage="hash", task=0)
    staged(corpus, "out", **small, stage="hash", task=1)
    staged(corpus, "out", **small, stage="reduce", task=0)
    staged(corpus, "out", **small, stage="reduce", task=1)
    batch = Router.batch

    def killed(self, *args):
        if self.groups:  # the task dies inside a slice, after one of its groups was written
            raise KeyboardInterrupt
        return batch(self, *args)

    monkeypatch.setattr(Router, "batch", killed)
    with pytest.raises(KeyboardInterrupt):
        staged(corpus, "out", **small, stage="tokenize", task=1)
    monkeypatch.undo()
    plan = json.loads((corpus / "out" / ".prep" / "plan.json").read_text())
    mine = task_slices([Slice.from_dict(d) for d in plan["slices"]], 1, 2)
    done = sorted(int(p.stem) for p in (corpus / "out" / ".prep" / "slices").iterdir())
    killed_at = done[-1] + 1 if done else mine.start
    assert done == list(range(mine.start, killed_at)) and killed_at in mine
    assert (corpus / "out" / f"train-{killed_at:05d}-000.bin").is_file(), "a killed group"
    missing = len(plan["slices"]) - len(done)
    with pytest.raises(PrepError, match=rf"task\(s\) 0, 1 of tasks=2 \({missing} of 16 slices"):
        staged(corpus, "out", **small, stage="merge")
    staged(corpus, "out", **small, stage="tokenize", task=0)
    staged(corpus, "out", **small, stage="tokenize", task=1)
    merged = staged(corpus, "out", **small, stage="merge")
    assert content(merged) == content(whole)
    assert shard_bytes(corpus / "out") == shard_bytes(corpus / "whole")
    names = {p.name for p in (corpus / "out").iterdir()}
    assert names == {p.name for p in (corpus / "whole").iterdir()}, "nothing left over"


def test_a_task_with_other_settings_than_the_plan_is_refused(corpus):
    staged(corpus, "out", stage="plan")
    with pytest.raises(PrepError, match="seed: 1234 before, 7 now"):
        staged(corpus, "out", stage="hash", task=0, seed=7)
    with pytest.raises(PrepError, match="slice_bytes: 6000 before, 9000 now"):
        staged(corpus, "out", stage="hash", task=0, slice_bytes=9000)
    (corpus / "in" / "c.jsonl").write_bytes(b'{"text": "changed"}\n')
    with pytest.raises(PrepError, match="c.jsonl: 20 bytes, .* when planned: the input changed"):
        staged(corpus, "out", stage="hash", task=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tasks=-1), "tasks=-1 must be >= 0"),
        (dict(stage="hash"), "stage=hash task=None needs tasks="),
        (dict(tasks=2, stage="map"), "stage='map' is not one of all, plan, hash"),
        (dict(tasks=2, stage="hash"), r"task=None must be in \[0, 2\) for stage=hash"),
        (dict(tasks=2, stage="tokenize", task=2), r"task=2 must be in \[0, 2\)"),
        (dict(tasks=2, stage="merge", task=0), "task=0 is not read by stage=merge"),
        (dict(tasks=2, stage="reduce"), r"task=None must be in \[0, 2\) for stage=reduce"),
        (dict(tasks=2, stage="near", task=0), "task=0 is not read by stage=near"),
        (dict(tasks=2, slice_bytes=0), "slice_bytes=0 must be >= 1"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(PrepConfigError, match=message):
        PrepConfig(**overrides).validate()


def test_strict_stops_at_the_hash_stage_naming_the_line(corpus):
    with pytest.raises(PrepError, match=r"a.jsonl \(the slice from byte \d+\): line \d+: the line"):
        staged(corpus, "out", strict=True)
    assert not (corpus / "out" / ".prep" / "reduce").exists()


def test_nothing_kept_leaves_nothing_behind(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"not json\n" * 50)
    with pytest.raises(PrepError, match="every one skipped"):
        staged(tmp_path, "out", slice_bytes=100)
    assert not (tmp_path / "out").exists()


def test_a_plan_under_way_is_not_replaced_by_a_one_machine_run(corpus):
    staged(corpus, "out", stage="plan")
    with pytest.raises(OutputExistsError):
        prepare(
            PrepConfig(input=str(corpus / "in"), output=str(corpus / "out"), workers=1),
            console=Console(file=io.StringIO()),
        )
    assert (corpus / "out" / ".prep" / "plan.json").is_file()


@pytest.mark.slow
def test_neo_prep_tasks_from_the_command_line(corpus):
    out = corpus / "cli"
    command = [NEO, "prep", f"input={corpus / 'in'}", f"output={out}", "workers=1", "tasks=2"]
    done = subprocess.run([*command, "slice_bytes=6000"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "2 task(s) over 16 slice(s)" in done.stdout
    assert len(list(out.glob("train-*.bin"))) > 1
    bad = subprocess.run([*command, "stage=hash", "task=5"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "task=5 must be in [0, 2)" in bad.stderr


def test_training_reads_a_staged_output_and_blends_its_sources(corpus):
    from train.config.train import BlendComponent, DataConfig
    from train.data.pretrain import load

    manifest = staged(corpus, "out")
    data = load(DataConfig(path=str(corpus / "out")), seq_len=32)
    assert data.vocab_size == 50257 and data.validation is not None
    source = next(iter(manifest.sources))
    blend = [BlendComponent(path=str(corpus / "out"), weight=1.0, source=source)]
    assert load(DataConfig(blend=blend), seq_len=32).train is not None


def test_overwrite_keeps_the_old_output_aside_until_the_merge(corpus):
    old = staged(corpus, "out")
    staged(corpus, "out", stage="plan", seed=7, overwrite=True)
    aside = list(corpus.glob(".out.old-*"))
    assert len(aside) == 1 and (aside[0] / "manifest.json").is_file()
    with pytest.raises(PrepError, match="seed: 7 before, 1234 now"):
        staged(corpus, "out", stage="hash", task=0)
    new = staged(corpus, "out", seed=7)
    assert new.settings["seed"] == 7 and new.totals["documents"] == old.totals["documents"]
    assert not list(corpus.glob(".out.*")), "the old output is removed once the new one is done"
