"""`neo prep tasks=N` over `.jsonl.zst` and `.jsonl.gz` files larger than a slice: byte ranges
of the uncompressed stream (data_prep/slices.py), their sizes measured by the plan
(data_prep/sizes.py), damaged and lying streams, and the result against the one-machine run."""

import gzip
import io
import json
import logging
from pathlib import Path

import pytest
import zstandard
from rich.console import Console
from test_prep import documents
from test_stages import config, content, staged, staged_by_1_2_and_3_tasks, streams

from data_prep import slices
from data_prep.config import CorpusConfig, PrepConfig
from data_prep.inputs import InputFile
from data_prep.plan import Planned
from data_prep.prep import PrepError, prepare
from data_prep.readers import Batch, Problem, read_file
from data_prep.sizes import measure, with_decoded_sizes, zstd_content_size
from data_prep.slices import Slice, plan_slices, read_slice


def jsonl(records):
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def streamed_zstd(data):
    """A zstd stream written as streaming writers do: no content size in the header; a block
    per 2000 bytes (a big file's are 128 KiB), so that a truncated one still holds lines."""
    compressor = zstandard.ZstdCompressor().compressobj()
    blocks = [
        compressor.compress(data[at : at + 2000])
        + compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        for at in range(0, len(data), 2000)
    ]
    return b"".join(blocks) + compressor.flush()


def sized_zstd(data):
    """One zstd frame recording its content size, a block per 2000 bytes."""
    compressor = zstandard.ZstdCompressor().compressobj(size=len(data))
    blocks = [
        compressor.compress(data[at : at + 2000])
        + compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        for at in range(0, len(data), 2000)
    ]
    return b"".join(blocks) + compressor.flush()


def with_content_size(frame, size):
    """The frame with its header's content size field replaced by `size` (same width)."""
    descriptor = frame[4]
    single = descriptor >> 5 & 1
    width = [1 if single else 0, 2, 4, 8][descriptor >> 6]
    at = 5 + (0 if single else 1) + [0, 1, 2, 4][descriptor & 3]
    value = size - 256 if width == 2 else size
    return frame[:at] + value.to_bytes(width, "little") + frame[at + width :]


def whole_lines(file):
    """The lines the one-machine reader reads from the file."""
    batches = read_file(0, file, CorpusConfig())
    return [line for b in batches if isinstance(b, Batch) for line in b.items]


def lines_and_problems(files, slices):
    """Every line the slices read, in order, and their Problems' kinds."""
    lines, problems = [], []
    for piece in slices:
        for item in read_slice(files, piece, CorpusConfig(), batch_bytes=300):
            if isinstance(item, Problem):
                problems.append(item.kind)
            else:
                lines += item.items
    return lines, problems


@pytest.fixture
def text():
    """JSON lines with a line longer than the slices below, an empty line, and a last line
    without a newline."""
    records = documents(40, seed=5)
    records[20] = {"text": " ".join(["spanning"] * 300)}
    return jsonl(records[:30]) + b"\n" + jsonl(records[30:]) + b'{"text": "no newline"}'


def compressed_files(tmp_path, data):
    """The same content as zstd with a size, streamed zstd, two zstd frames, gzip, and the
    zstd stream truncated or corrupted in its second half, the gzip stream truncated."""
    frame = zstandard.ZstdCompressor().compress(data)
    half = len(data) // 2
    variants = {
        "sized.jsonl.zst": frame,
        "streamed.jsonl.zst": streamed_zstd(data),
        "frames.jsonl.zst": zstandard.ZstdCompressor().compress(data[:half])
        + zstandard.ZstdCompressor().compress(data[half:]),
        "members.jsonl.gz": gzip.compress(data[:half]) + gzip.compress(data[half:]),
        "truncated.jsonl.zst": (a := streamed_zstd(data))[: len(a) * 3 // 4],
        "gztruncated.jsonl.gz": (g := gzip.compress(data))[: len(g) * 3 // 4],
        "corrupt.jsonl.zst": a[:-40] + bytes(b ^ 0x5A for b in a[-40:-20]) + a[-20:],
    }
    files = []
    for name, blob in variants.items():
        (tmp_path / name).write_bytes(blob)
        fmt = name.split(".", 1)[1]
        files.append(InputFile(str(tmp_path / name), fmt, len(blob), name.split(".")[0]))
    return with_decoded_sizes(files, workers=1)


# ---------------------------------------------------------------------------------------------
# Slices of a compressed stream


def test_compressed_ranges_read_the_file_exactly_once_whatever_the_slice_size(
    tmp_path, text, monkeypatch
):
    # Read 500 compressed bytes at a time, so that the output decoded before damage is kept
    # (a decoder call that fails yields nothing) and the lines cross chunks.
    monkeypatch.setattr("data_prep.readers.CHUNK", 500)
    for file in compressed_files(tmp_path, text):
        whole, whole_problems = [], []
        for item in read_file(0, file, CorpusConfig()):
            if isinstance(item, Batch):
                whole += item.items
            else:
                whole_problems.append(item.kind)
        damaged = file.name in ("truncated", "corrupt", "gztruncated")
        assert bool(whole_problems) == damaged and len(whole) > 20, file.name
        for slice_bytes in (1, 7, 100, 1000, file.decoded - 1):
            slices = plan_slices([file], slice_bytes)
            assert len(slices) > 1 and all(s.end is not None for s in slices)
            got = lines_and_problems([file], slices)
            assert got == (whole, whole_problems), f"{file.name}, slices of {slice_bytes}"


def test_sizes_come_from_zstd_headers_where_they_are_believable(tmp_path, text, monkeypatch):
    monkeypatch.setattr("data_prep.readers.CHUNK", 500)
    files = {f.name: f for f in compressed_files(tmp_path, text)}
    assert {f.decoded for n, f in files.items() if n in ("sized", "frames", "members")} == {
        len(text)
    }
    assert zstd_content_size(files["sized"].path) == len(text)
    assert zstd_content_size(files["frames"].path) == len(text), "frames add up"
    assert zstd_content_size(files["streamed"].path) is None, "no size recorded: decoded"
    assert zstd_content_size(files["truncated"].path) is None
    assert measure(files["truncated"])[1].startswith("truncated_stream")
    assert measure(files["corrupt"])[1].startswith("corrupt_stream")
    skippable = (0x184D2A5E).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    (tmp_path / "skip.jsonl.zst").write_bytes(skippable + Path(files["sized"].path).read_bytes())
    assert zstd_content_size(str(tmp_path / "skip.jsonl.zst")) == len(text)
    # A header claiming more than its blocks can hold (one block: 128 KiB) is not believed.
    frame = zstandard.ZstdCompressor().compress(b"\n" * 70000)
    (tmp_path / "lie.jsonl.zst").write_bytes(with_content_size(frame, 1 << 31))
    assert zstd_content_size(str(tmp_path / "lie.jsonl.zst")) is None
    (tmp_path / "empty.jsonl.zst").write_bytes(b"")
    empty = InputFile(str(tmp_path / "empty.jsonl.zst"), "jsonl.zst", 0, "empty")
    assert measure(empty) == (0, None)
    monkeypatch.setattr("data_prep.sizes.decoded_chunks", None)  # the header alone suffices
    assert measure(files["sized"]) == (len(text), None)


def test_plan_slices_cut_compressed_files_by_their_uncompressed_size():
    files = [
        InputFile("a.jsonl.zst", "jsonl.zst", 10, "a", decoded=25),
        InputFile("b.jsonl.gz", "jsonl.gz", 4, "b", decoded=6),
        InputFile("c.jsonl.gz", "jsonl.gz", 3, "c", decoded=3),
    ]
    assert plan_slices(files, 10) == [
        Slice(0, 0, 10, 10),
        Slice(0, 10, 20, 10),
        Slice(0, 20, 25, 5),
        Slice(1, 0, None, 9, files=2),
    ]


# ---------------------------------------------------------------------------------------------
# The pipeline


@pytest.fixture
def corpus(tmp_path):
    """A streamed .jsonl.zst many slices long with a line longer than a slice, a .jsonl.gz
    of two members, a sized .jsonl.zst, with copies planted within and across files."""
    (tmp_path / "in").mkdir()
    a, b = documents(100, seed=11), documents(50, seed=12)
    long = {"text": " ".join(["a long document"] * 900), "meta": {"pile_set_name": "Long"}}
    big = jsonl(a[:50] + [long] + a[50:] + b[:4]) + b"not json\n"
    (tmp_path / "in" / "a.jsonl.zst").write_bytes(streamed_zstd(big))
    half = jsonl(b[:25])
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(gzip.compress(half) + gzip.compress(jsonl(b)))
    small = jsonl(a[:3] + documents(10, seed=13))
    (tmp_path / "in" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(small))
    return tmp_path


def one_machine(corpus, name="classic"):
    cfg = dict(input=str(corpus / "in"), output=str(corpus / name), workers=1)
    return prepare(
        PrepConfig(**cfg, validation_fraction=0.2, shard_tokens=4000),
        batch_bytes=2000,
        console=Console(file=io.StringIO()),
    )


def test_compressed_inputs_give_the_same_output_for_1_2_and_3_tasks_as_one_machine(corpus):
    one, two, _ = staged_by_1_2_and_3_tasks(corpus)
    assert one.run["slices"] >= 8, "the compressed files are cut into several slices each"
    classic = one_machine(corpus)
    assert streams(classic) == streams(two)
    assert classic.sources == two.sources and classic.totals == two.totals
    assert two.totals["duplicates"] == 4 + 25 + 3 and two.totals["skipped"] == 1
    where = two.skipped["malformed_json"]["examples"][0]["where"]
    assert "a.jsonl.zst (the slice from uncompressed byte" in where


def test_a_damaged_stream_is_one_skip_as_on_one_machine(corpus, caplog):
    data = (corpus / "in" / "a.jsonl.zst").read_bytes()
    (corpus / "in" / "a.jsonl.zst").write_bytes(data[: len(data) * 2 // 3])
    with caplog.at_level(logging.WARNING, logger="neo.prep"):
        two = staged(corpus, "two", tasks=2)
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "a.jsonl.zst: truncated_stream" in m]) == 1, "by the plan"
    classic = one_machine(corpus)
    assert streams(classic) == streams(two) and classic.totals == two.totals
    assert {k: v["count"] for k, v in two.skipped.items()} == {"truncated_stream": 1}
    assert content(staged(corpus, "three", tasks=3)) == content(two)


def test_empty_and_unreadable_compressed_files_are_read_as_on_one_machine(corpus):
    (corpus / "in" / "d-empty.jsonl.zst").write_bytes(b"")
    (corpus / "in" / "e-empty-frame.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b"")
    )
    (corpus / "in" / "f-not-zstd.jsonl.zst").write_bytes(bytes(range(256)) * 40)
    (corpus / "in" / "g-not-gzip.jsonl.gz").write_bytes(b"\x1f\x8b" + bytes(range(256)) * 40)
    two = staged(corpus, "two", tasks=2)
    classic = one_machine(corpus)
    assert streams(classic) == streams(two) and classic.totals == two.totals
    skipped = {k: v["count"] for k, v in two.skipped.items()}
    assert skipped == {"malformed_json": 1, "unreadable_file": 2}
    assert skipped == {k: v["count"] for k, v in classic.skipped.items()}


def test_strict_stops_at_a_damaged_stream_naming_the_file(corpus):
    data = (corpus / "in" / "a.jsonl.zst").read_bytes()
    (corpus / "in" / "a.jsonl.zst").write_bytes(data[: len(data) // 2])
    message = r"a.jsonl.zst \(the slice from uncompressed byte \d+\): line \d+: .*ends inside"
    with pytest.raises(PrepError, match=message):
        staged(corpus, "out", strict=True)


@pytest.mark.parametrize("change", [+300, -300])
def test_a_zstd_header_that_misstates_the_size_loses_nothing(corpus, change, monkeypatch):
    """The plan cuts by the header's size; what the stream holds is read all the same. libzstd
    refuses a frame holding more than its header says (corrupt: the rest of the file is lost),
    and reads one holding less to its end: in the one-machine run and the tasks alike."""
    monkeypatch.setattr("data_prep.readers.CHUNK", 100)  # keep what decodes before the error
    path = corpus / "in" / "c.jsonl.zst"
    data = zstandard.ZstdDecompressor().decompress(path.read_bytes())
    path.write_bytes(with_content_size(sized_zstd(data), len(data) + change))
    assert zstd_content_size(str(path)) == len(data) + change, "a believable header"
    two = staged(corpus, "two", tasks=2, slice_bytes=1000)
    classic = one_machine(corpus)
    assert streams(classic) == streams(two) and classic.totals == two.totals
    skipped = {k: v["count"] for k, v in two.skipped.items()}
    assert skipped == {k: v["count"] for k, v in classic.skipped.items()}
    damage = {"corrupt_stream": 1} if change < 0 else {}
    assert skipped == {"malformed_json": 1} | damage


def test_a_files_last_range_reads_to_the_end_of_the_stream(tmp_path, text):
    """Whatever size the plan was given (a header may understate it), nothing is lost."""
    (tmp_path / "f.jsonl.zst").write_bytes(streamed_zstd(text))
    file = InputFile(str(tmp_path / "f.jsonl.zst"), "jsonl.zst", 1, "f", decoded=len(text) - 900)
    whole = [line for b in read_file(0, file, CorpusConfig()) for line in b.items]
    assert lines_and_problems([file], plan_slices([file], 1000)) == (whole, [])


def test_a_compressed_input_changed_after_the_plan_is_refused(corpus):
    staged(corpus, "out", stage="plan")
    state = Planned.load(config(corpus, "out"))
    assert [f.decoded is not None for f in state.files] == [True, True, True]
    (corpus / "in" / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(documents(5, seed=1))))
    with pytest.raises(PrepError, match="b.jsonl.gz: .* when planned: the input changed"):
        staged(corpus, "out", stage="hash", task=0)


def test_the_plan_measures_several_files_in_a_pool_of_processes(tmp_path, text, caplog):
    files = compressed_files(tmp_path, text)
    plain = [InputFile(f.path, f.format, f.bytes, f.name) for f in files]
    with caplog.at_level(logging.INFO, logger="neo.prep"):
        assert with_decoded_sizes(plain, workers=2) == files
    assert "measuring the uncompressed size of 7 compressed file(s)" in caplog.text
    assert "(2 process(es))" in caplog.text


def test_a_tasks_consecutive_slices_decode_the_file_once(tmp_path, text, monkeypatch):
    opened = []
    original = slices.decoded_chunks
    monkeypatch.setattr(slices, "decoded_chunks", lambda *a: opened.append(a) or original(*a))
    files = compressed_files(tmp_path, text)
    for file in files:
        assert lines_and_problems([file], plan_slices([file], 500))[0] == whole_lines(file)
    cut = [f for f in files if len(plan_slices([f], 500)) > 1]
    assert len(cut) == 6 and len(opened) == len(cut), "one decode per file, not one per slice"
    # A file rewritten since (another size) is decoded anew, not served from the kept stream.
    lines_and_problems(files[:1], plan_slices(files[:1], 500)[:3])
    (tmp_path / "sized.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text * 2))
    file = with_decoded_sizes([InputFile(files[0].path, "jsonl.zst", 1, "sized")], 1)[0]
    assert lines_and_problems([file], plan_slices([file], 500))[0] == whole_lines(file)


def test_a_zstd_file_of_tiny_blocks_is_decoded_not_walked(tmp_path):
    """Walking costs a Python step per block: a file whose blocks average under 1 KB (a real
    one's hold tens of KB) is decoded instead, in C, so that no file stalls the plan."""
    empty_blocks = b"\0\0\0" * 1999 + b"\1\0\0"  # 2000 empty raw blocks, the last marked
    frame = (0xFD2FB528).to_bytes(4, "little") + bytes([0x20, 0]) + empty_blocks
    (tmp_path / "tiny.jsonl.zst").write_bytes(frame)
    assert zstd_content_size(str(tmp_path / "tiny.jsonl.zst")) is None
    (tmp_path / "few.jsonl.zst").write_bytes(frame[:6] + empty_blocks[-300:])
    assert zstd_content_size(str(tmp_path / "few.jsonl.zst")) == 0, "100 blocks: walked"
    file = InputFile(str(tmp_path / "tiny.jsonl.zst"), "jsonl.zst", len(frame), "tiny")
    assert measure(file) == (0, None)
