"""Corpus readers on real files of every supported format, including broken ones."""

import gzip
import json
import random

import pytest
import zstandard

from data_prep.config import CorpusConfig
from data_prep.inputs import InputError, describe_input, resolve_inputs
from data_prep.readers import BadRecord, Batch, Problem, decode_record, iter_documents, read_batches

PILE = CorpusConfig()
RECORDS = [
    {"text": f"document {i}: " + "word " * i, "meta": {"pile_set_name": "AB"[i % 2]}}
    for i in range(1, 40)
]


def jsonl(records):
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def read_all(files, corpus=PILE, start=(0, 0), batch_bytes=64):
    """(file, record, text, source) of every good record, and the problems, in order."""
    good, problems = [], []
    for batch in read_batches(files, corpus, start, batch_bytes):
        if isinstance(batch, Problem):
            problems.append((batch.file, batch.record, batch.kind))
            continue
        assert isinstance(batch, Batch)
        for i, item in enumerate(batch.items):
            text_field = corpus.text_field.split(".")
            source_field = corpus.source_field.split(".") if corpus.source_field else None
            try:
                text, source = decode_record(batch.kind, item, text_field, source_field)
            except BadRecord as e:
                problems.append((batch.file, batch.first + i, e.kind))
                continue
            good.append((batch.file, batch.first + i, text, source or batch.default_source))
    return good, problems


def expected(records=RECORDS, file=0):
    return [(file, i, r["text"], r["meta"]["pile_set_name"]) for i, r in enumerate(records)]


def write_formats(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl(RECORDS))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(RECORDS)))
    # Two zstd frames, as multi-threaded `zstd` writes: both must be read.
    half = len(RECORDS) // 2
    frames = [
        zstandard.ZstdCompressor().compress(jsonl(part))
        for part in (RECORDS[:half], RECORDS[half:])
    ]
    (tmp_path / "c.jsonl.zst").write_bytes(b"".join(frames))


def test_jsonl_gz_and_multi_frame_zst_read_the_same_records(tmp_path):
    write_formats(tmp_path)
    files = resolve_inputs(str(tmp_path))
    assert [f.format for f in files] == ["jsonl", "jsonl.gz", "jsonl.zst"]
    good, problems = read_all(files)
    assert problems == []
    assert good == expected(file=0) + expected(file=1) + expected(file=2)


def test_a_record_longer_than_the_read_chunk_survives(tmp_path, monkeypatch):
    monkeypatch.setattr("data_prep.readers.CHUNK", 7)  # lines span many chunks
    write_formats(tmp_path)
    good, problems = read_all(resolve_inputs(str(tmp_path / "c.jsonl.zst")))
    assert problems == [] and good == expected()


def test_resume_position_skips_records_and_files(tmp_path):
    write_formats(tmp_path)
    files = resolve_inputs(str(tmp_path / "*.jsonl*"))
    good, _ = read_all(files, start=(1, 5))
    assert good == expected(file=1)[5:] + expected(file=2)


def test_parquet_with_a_struct_source_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(RECORDS + [{"text": None, "meta": {"pile_set_name": "A"}}])
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7)
    files = resolve_inputs(str(tmp_path / "t.parquet"))
    good, problems = read_all(files)
    assert good == expected() and problems == [(0, len(RECORDS), "missing_text")]
    good, _ = read_all(files, start=(0, 10))
    assert good == expected()[10:]
    with pytest.raises(InputError, match="no column 'body'"):
        read_all(files, CorpusConfig(text_field="body"))


def test_hugging_face_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    flat = [{"text": r["text"], "source": r["meta"]["pile_set_name"]} for r in RECORDS]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(flat)}).save_to_disk(tmp_path / "hf")
    files = resolve_inputs(str(tmp_path / "hf"))
    assert [f.format for f in files] == ["hf_disk"]
    corpus = CorpusConfig(source_field="source")
    good, problems = read_all(files, corpus)
    assert good == expected() and problems == []
    assert read_all(files, corpus, start=(0, 30))[0] == expected()[30:]
    with pytest.raises(InputError, match="no split data.hf_split='test'"):
        read_all(files, CorpusConfig(hf_split="test"))
    assert describe_input(files[0])["sha256"]


def test_txt_folder_one_document_per_file_source_per_folder(tmp_path):
    (tmp_path / "zh").mkdir()
    (tmp_path / "en").mkdir()
    (tmp_path / "zh" / "1.txt").write_text("你好，世界。\n第二行。", encoding="utf-8")
    (tmp_path / "en" / "1.txt").write_text("Hello, world.\n")
    (tmp_path / "en" / "2.txt").write_bytes(b"bad \xff byte")
    (tmp_path / "en" / "notes.md").write_text("not an input")
    files = resolve_inputs(str(tmp_path))
    good, problems = read_all(files, CorpusConfig(source_field=None))
    assert [(t, s) for _, _, t, s in good] == [
        ("Hello, world.\n", "en"),
        ("你好，世界。\n第二行。", "zh"),
    ]
    assert problems == [(1, 0, "invalid_utf8")]


def test_bad_records_each_have_a_kind():
    def kind(line, corpus=PILE):
        text_field = corpus.text_field.split(".")
        with pytest.raises(BadRecord) as e:
            decode_record("json", line, text_field, ["meta", "pile_set_name"])
        return e.value.kind

    assert kind(b'{"text": "unterminated') == "malformed_json"
    assert kind(b'["a", "list"]') == "malformed_json"
    assert kind(b"   ") == "blank_line"
    assert kind(b'{"meta": {}}') == "missing_text"
    assert kind(b'{"text": null}') == "missing_text"
    assert kind(b'{"text": 42}') == "non_string_text"
    assert kind(b'{"text": "\xff\xfe bad"}') == "invalid_utf8"
    assert kind(b'{"text": " \\n\\t "}') == "empty_document"
    assert kind(b'{"text": ""}') == "empty_document"
    text, source = decode_record("json", b'{"text": "ok", "meta": {}}', ["text"], ["meta", "x"])
    assert (text, source) == ("ok", None)


def test_truncated_zst_and_gz_streams_are_problems_not_silence(tmp_path):
    rng = random.Random(0)
    records = [
        {"text": " ".join(str(rng.random()) for _ in range(50)), "meta": {"pile_set_name": "A"}}
        for _ in range(500)
    ]  # ~500 KB that compresses poorly: half the stream holds many whole lines
    data = jsonl(records)
    zst = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[: len(zst) // 2])
    gz = gzip.compress(data)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    for name in ("cut.jsonl.zst", "cut.jsonl.gz"):
        good, problems = read_all(resolve_inputs(str(tmp_path / name)), batch_bytes=1 << 20)
        assert 0 < len(good) < len(records), name
        assert good == expected(records)[: len(good)], "the partial last line is not a record"
        assert problems == [(0, len(good), "truncated_stream")], name


def test_unreadable_files_are_problems(tmp_path):
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "nowhere")
    (tmp_path / "fake.jsonl.zst").write_bytes(b"this is not zstd data")
    (tmp_path / "ok.jsonl").write_bytes(jsonl(RECORDS[:3]))
    files = resolve_inputs(str(tmp_path / "*.jsonl*"))
    good, problems = read_all(files)
    assert problems == [(0, 0, "unreadable_file"), (1, 0, "unreadable_file")]
    assert good == expected(RECORDS[:3], file=2)
    assert "error" in describe_input(files[1]) and describe_input(files[1])["sha256"] is None


def test_inputs_that_match_nothing_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        resolve_inputs(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match="no .jsonl.zst"):
        resolve_inputs(str(tmp_path / "*.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown format"):
        resolve_inputs(str(tmp_path / "data.csv"))


def test_the_bundled_sample_and_its_sha256():
    (sample,) = resolve_inputs("sample")
    assert sample.format == "jsonl.zst" and sample.bytes == 7_319_273
    assert describe_input(sample)["sha256"] == (
        "83af5b6cc4d2c03332656b33bb8a36e5dfcff1aa7cc2dc3e3b8eafc5dd52f39f"
    )


def test_training_sample_is_spread_over_files(tmp_path):
    (tmp_path / "en.jsonl").write_bytes(jsonl([{"text": "english " * 50}] * 100))
    (tmp_path / "zh.jsonl").write_bytes(jsonl([{"text": "中文" * 50}] * 100))
    texts = list(iter_documents(resolve_inputs(str(tmp_path)), PILE, budget=2000))
    assert any("english" in t for t in texts) and any("中文" in t for t in texts)
    assert sum(len(t.encode()) for t in texts) < 3000


def test_hub_dataset_that_cannot_be_reached_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (hub,) = resolve_inputs("hf:some-org/some-corpus")
    assert hub.format == "hf_hub" and describe_input(hub)["sha256"] is None
    with pytest.raises(InputError, match="hf:some-org/some-corpus: cannot stream it"):
        read_all([hub])
