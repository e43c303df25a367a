"""Megatron MMIDIDX shards: read files written byte by byte from the format's specification,
write files byte-identical to it, and catch every kind of damage with an error naming the file."""

import json
import struct

import numpy as np
import pytest

from data_prep.files import sha256_file
from data_prep.manifest import (
    Manifest,
    ShardInfo,
    SourceRange,
    TokenizerInfo,
    manifest_digest,
    open_prepared,
)
from data_prep.shards import IndexedDataset, ShardError, token_dtype, write_indexed_dataset

# Megatron-LM's dtype codes (megatron/core/datasets/indexed_dataset.py, class DType).
MEGATRON_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}


def write_megatron_fixture(prefix, sequences, document_starts, dtype):
    """An indexed dataset written field by field from the MMIDIDX specification, without any
    neotrain code: 9-byte magic, u64 version 1, u8 dtype code, u64 sequence count, u64 count of
    document-index entries, then i32 sizes, i64 byte pointers, i64 document index."""
    itemsize = np.dtype(dtype).itemsize
    with open(f"{prefix}.bin", "wb") as f:
        for seq in sequences:
            for token in seq:
                f.write(np.array(token, dtype=dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", MEGATRON_CODES[dtype]))
        f.write(struct.pack("<Q", len(sequences)))
        f.write(struct.pack("<Q", len(document_starts)))
        for seq in sequences:
            f.write(struct.pack("<i", len(seq)))
        pointer = 0
        for seq in sequences:
            f.write(struct.pack("<q", pointer))
            pointer += len(seq) * itemsize
        for start in document_starts:
            f.write(struct.pack("<q", start))


DOCS = [[15496, 11, 314, 50256], [1101, 257, 3303, 2746, 11, 50256], [50256]]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_reads_a_megatron_fixture_written_from_the_spec(tmp_path, dtype):
    write_megatron_fixture(tmp_path / "gpt", DOCS, [0, 1, 2, 3], dtype)
    ds = IndexedDataset(tmp_path / "gpt")
    assert ds.dtype == np.dtype(dtype) and len(ds) == 3 and ds.num_tokens == 11
    assert ds.sizes.tolist() == [4, 6, 1]
    itemsize = np.dtype(dtype).itemsize
    assert ds.pointers.tolist() == [0, 4 * itemsize, 10 * itemsize]
    for i, doc in enumerate(DOCS):
        assert ds[i].tolist() == doc
    assert ds.get(1, offset=2, length=3).tolist() == [3303, 2746, 11]
    assert ds[-1].tolist() == [50256]
    assert isinstance(ds[0].base, np.memmap) or isinstance(ds[0], np.memmap), "a view, no copy"
    with pytest.raises(IndexError):
        ds.get(0, offset=3, length=2)


def test_reads_gpt_neox_sentence_split_documents(tmp_path):
    # GPT-NeoX / Megatron with sentence splitting: 2 documents of 2 and 1 sequences.
    write_megatron_fixture(tmp_path / "neox", DOCS, [0, 2, 3], np.int32)
    ds = IndexedDataset(tmp_path / "neox")
    assert len(ds) == 3 and ds.num_documents == 2
    assert ds.document_indices.tolist() == [0, 2, 3]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_written_shards_are_byte_identical_to_the_spec(tmp_path, dtype):
    write_megatron_fixture(tmp_path / "spec", DOCS, [0, 1, 2, 3], dtype)
    files = write_indexed_dataset(tmp_path / "ours", [np.array(d) for d in DOCS], dtype)
    for suffix in (".bin", ".idx"):
        ours = (tmp_path / f"ours{suffix}").read_bytes()
        assert ours == (tmp_path / f"spec{suffix}").read_bytes(), suffix
    assert files.documents == 3 and files.tokens == 11
    assert files.sha256["bin"] == sha256_file(tmp_path / "ours.bin")
    assert files.bytes["idx"] == (tmp_path / "ours.idx").stat().st_size
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files left"


def test_empty_dataset_round_trips(tmp_path):
    write_indexed_dataset(tmp_path / "empty", [], np.uint16)
    ds = IndexedDataset(tmp_path / "empty")
    assert len(ds) == 0 and ds.num_tokens == 0


def test_dtype_follows_the_vocabulary():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32 and token_dtype(152064) == np.int32


def _damage(path, data):
    path.write_bytes(data)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _damage(p / "s.bin", (p / "s.bin").read_bytes()[:-2]), "s.bin: 20 bytes"),
        (lambda p: _damage(p / "s.bin", (p / "s.bin").read_bytes() + b"\0\0"), "s.bin: 24 bytes"),
        (lambda p: _damage(p / "s.idx", (p / "s.idx").read_bytes()[:-8]), "s.idx"),
        (lambda p: _damage(p / "s.idx", b"MMIDIDX\x00"), "shorter than the 34-byte"),
        (lambda p: _damage(p / "s.idx", b"NOTANIDX\0" + (p / "s.idx").read_bytes()[9:]), "magic"),
        (lambda p: _damage(p / "s.idx", _patch(p / "s.idx", 17, b"\x09")), "dtype code 9"),
        (lambda p: _damage(p / "s.idx", _patch(p / "s.idx", 34 + 12 + 8, b"\x07")), "sequence 1"),
        (lambda p: (p / "s.bin").unlink(), "s.bin: no such file"),
    ],
    ids=[
        "bin-truncated",
        "bin-padded",
        "idx-truncated",
        "idx-stub",
        "magic",
        "dtype",
        "pointer",
        "bin-missing",
    ],
)
def test_damaged_shards_are_named_in_the_error(tmp_path, damage, message):
    write_indexed_dataset(tmp_path / "s", [np.array(d) for d in DOCS], np.uint16)
    damage(tmp_path)
    with pytest.raises(ShardError, match=message):
        IndexedDataset(tmp_path / "s")


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    return bytes(raw)


def _prepared(tmp_path, checksums=True):
    """A prepared directory built by hand: two train shards, one validation shard (without
    checksums: as an older neo prep wrote it)."""
    shards, splits = {}, {"train": [], "validation": []}
    rng = np.random.default_rng(0)
    for name, split, n in [
        ("train-00000", "train", 5),
        ("train-00001", "train", 3),
        ("validation-00000", "validation", 2),
    ]:
        docs = [np.append(rng.integers(0, 50000, rng.integers(1, 20)), 50256) for _ in range(n)]
        files = write_indexed_dataset(tmp_path / name, docs, np.uint16)
        sources = {
            "A": SourceRange(0, 2, int(sum(map(len, docs[:2])))),
            "B": SourceRange(2, n, int(sum(map(len, docs[2:])))),
        }
        shards[name] = ShardInfo(split, n, files.tokens, files.sha256, files.bytes, sources)
        if checksums:
            shards[name].xxh3, shards[name].max_token = files.xxh3, files.max_token
        splits[split].append(name)
    tok = TokenizerInfo("gpt2", 50257, 50256, "<|endoftext|>", None, {})
    manifest = Manifest("0.1.0", tok, "uint16", splits, shards, {}, {}, {}, [], {})
    manifest.save(tmp_path)
    return manifest


def test_open_prepared_returns_every_split(tmp_path):
    _prepared(tmp_path)
    manifest, shards = open_prepared(tmp_path, verify=True)
    assert [len(s) for s in shards["train"]] == [5, 3] and len(shards["validation"][0]) == 2
    assert manifest.source_documents(shards["train"][0], "B").tolist() == [2, 3, 4]
    assert manifest.source_documents(shards["train"][1], "C").tolist() == []
    assert manifest.tokenizer.eod_id == 50256 and manifest.tokenizer_dir is None
    assert len(manifest_digest(manifest)) == 64
    again = Manifest.load(tmp_path)
    assert again == manifest and manifest_digest(again) == manifest_digest(manifest)


def test_open_prepared_names_a_missing_truncated_or_corrupt_shard(tmp_path):
    _prepared(tmp_path)
    bin1 = tmp_path / "train-00001.bin"
    good = bin1.read_bytes()

    bin1.write_bytes(good[:-2])
    with pytest.raises(ShardError, match="train-00001.bin: .* bytes, the manifest says"):
        open_prepared(tmp_path)

    flipped = bytearray(good)
    flipped[0] ^= 1
    bin1.write_bytes(bytes(flipped))
    with pytest.raises(ShardError, match=r"train-00001.bin: xxh3 \w+ differs .*corrupt"):
        open_prepared(tmp_path)  # same size: the checksum tells
    with pytest.raises(ShardError, match="train-00001.bin: sha256 differs"):
        open_prepared(tmp_path, verify=True)

    bin1.unlink()
    with pytest.raises(ShardError, match="train-00001.bin: missing"):
        open_prepared(tmp_path)


def test_manifest_of_another_shape_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished `neo prep` output"):
        open_prepared(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ShardError, match="not ours"):
        open_prepared(tmp_path)


def test_a_shard_overwritten_with_0xff_is_named_with_its_document(tmp_path):
    _prepared(tmp_path)
    bin0 = tmp_path / "train-00000.bin"
    bin0.write_bytes(b"\xff" * bin0.stat().st_size)
    with pytest.raises(ShardError) as corrupt:
        open_prepared(tmp_path)
    assert str(corrupt.value) == (
        f"shard {bin0}: document 0 holds token id 65535 (its token 0), outside the "
        "vocabulary [0, 50257) of the manifest's tokenizer: the shard is corrupt"
    )


def test_flipped_bytes_that_keep_ids_in_the_vocabulary_are_found(tmp_path):
    _prepared(tmp_path)
    shard = tmp_path / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    ids = np.frombuffer(bytes(data), np.uint16)
    below = np.flatnonzero(ids < 50000)  # flipping the lowest bit keeps these in the vocabulary
    for token in np.random.default_rng(1).choice(below, size=min(100, len(below)), replace=False):
        data[2 * token] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-00000.bin: xxh3 \w+ differs from the manifest"):
        open_prepared(tmp_path)
    _prepared(tmp_path)
    idx = tmp_path / "validation-00000.idx"
    raw = bytearray(idx.read_bytes())
    raw[-16] ^= 1  # document index [0, 1, 2] -> [0, 0, 2]: still a valid index
    idx.write_bytes(bytes(raw))
    IndexedDataset(tmp_path / "validation-00000")
    with pytest.raises(ShardError, match=r"validation-00000.idx: xxh3 \w+ differs"):
        open_prepared(tmp_path)


def test_a_hand_edited_source_range_names_the_manifest_key(tmp_path):
    _prepared(tmp_path)
    path = tmp_path / "manifest.json"
    good = json.loads(path.read_text())
    for edit, message in [
        ({"start": 2, "end": 9}, r"sources.B: documents \[2, 9\) but the shard has 5"),
        ({"start": 1, "end": 5}, r"sources.B: documents \[1, 5\) overlap another source's"),
        ({"start": 3, "end": 5}, r"sources.B: \d+ tokens, but its documents \[3, 5\) hold \d+"),
        ({"end": "5"}, "sources.B.end is '5', not an integer"),
    ]:
        edited = json.loads(json.dumps(good))
        edited["shards"]["train-00000"]["sources"]["B"].update(edit)
        path.write_text(json.dumps(edited))
        with pytest.raises(ShardError, match=rf"manifest.json: shards.train-00000.{message}"):
            open_prepared(tmp_path)
    good["splits"]["validation"].append("train-00000")
    path.write_text(json.dumps(good))
    with pytest.raises(ShardError, match="splits list shard train-00000 more than once"):
        open_prepared(tmp_path)


def test_a_manifest_of_format_version_1_is_still_read(tmp_path, caplog):
    _prepared(tmp_path, checksums=False)
    path = tmp_path / "manifest.json"
    old = json.loads(path.read_text())
    old["format_version"] = 1
    for info in old["shards"].values():
        del info["xxh3"], info["max_token"]
    path.write_text(json.dumps(old))
    manifest, shards = open_prepared(tmp_path)
    assert manifest.format_version == 1 and len(shards["train"]) == 2
    assert "older neo prep (no xxh3 checksums)" in caplog.text
    bin0 = tmp_path / "train-00000.bin"
    bin0.write_bytes(b"\xff" * bin0.stat().st_size)  # token ids: checked all the same
    with pytest.raises(ShardError, match="document 0 holds token id 65535"):
        open_prepared(tmp_path)


def test_written_shards_record_their_largest_token_and_checksums(tmp_path):
    files = write_indexed_dataset(tmp_path / "s", [np.array(d) for d in DOCS], np.uint16)
    assert files.max_token == max(max(d) for d in DOCS)
    scan = IndexedDataset(tmp_path / "s").scan()
    assert (scan.high, scan.xxh3) == (files.max_token, files.xxh3["bin"])
