"""`neo prep` in-process: bad input, dedup, split, worker-independence, resume, tokenizers."""

import contextlib
import errno
import io
import json
import logging
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import zstandard
from rich.console import Console

from data_prep.config import CorpusConfig, PrepConfig, PrepConfigError, SentencePieceConfig
from data_prep.dedup import DigestSet, validation_mask
from data_prep.files import NoSpaceError, OutputExistsError
from data_prep.manifest import open_prepared
from data_prep.prep import PrepError, Progress, Router, prepare
from data_prep.shards import IndexedDataset, IndexedDatasetWriter
from data_prep.tokenizers import load_tokenizer

WORDS = [
    "".join(random.Random(i).choices("abcdefghijklmnoprstuvwy", k=1 + i % 9)) for i in range(3000)
]


def documents(n, seed=0, sources=("Github", "Pile-CC", "Enron Emails")):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lines = [
            " ".join(rng.choices(WORDS, k=rng.randint(3, 15))) for _ in range(rng.randint(1, 8))
        ]
        out.append({"text": "\n".join(lines), "meta": {"pile_set_name": rng.choice(sources)}})
    return out


def write_jsonl(path, records, compress=False):
    data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)
    return path


def run(tmp_path, name="out", **overrides):
    """prepare() with small defaults; returns (manifest, printed text)."""
    values = dict(input=str(tmp_path / "in"), output=str(tmp_path / name), workers=1)
    batch_bytes = overrides.pop("batch_bytes", 1 << 20)
    values.update(overrides)
    out = io.StringIO()
    manifest = prepare(
        PrepConfig(**values), batch_bytes=batch_bytes, console=Console(file=out, width=200)
    )
    return manifest, out.getvalue()


def shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("*-*.*")) if p.is_file()}


def content(manifest):
    data = manifest.to_dict()
    del data["run"]
    return data


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl.zst", documents(300, seed=1), compress=True)
    write_jsonl(tmp_path / "in" / "b.jsonl", documents(200, seed=2))
    return tmp_path


def test_shards_hold_every_document_with_an_eod_grouped_by_source(corpus):
    manifest, printed = run(corpus, validation_fraction=0.1, shard_tokens=10_000)
    tok = load_tokenizer(manifest.tokenizer_dir)
    assert tok.encode("Hello, I'm a language model,")[:2] == [15496, 11] and tok.eod_id == 50256
    records = documents(300, seed=1) + documents(200, seed=2)
    wanted = Counter((r["meta"]["pile_set_name"], r["text"]) for r in records)
    got = Counter()
    _, shards = open_prepared(manifest.directory, verify=True)
    assert len(shards["train"]) > 2, "shard_tokens cut several groups"
    for split, opened in shards.items():
        for shard in opened:
            info = manifest.shards[shard.prefix.name]
            assert info.split == split
            for source, r in info.sources.items():
                for i in range(r.start, r.end):
                    assert shard[i][-1] == tok.eod_id
                    got[(source, tok.decode(shard[i][:-1].tolist()))] += 1
                assert sum(len(shard[i]) for i in range(r.start, r.end)) == r.tokens
    assert got == wanted
    totals = manifest.totals
    assert totals["documents"] == 500 and totals["skipped"] == 0 and totals["duplicates"] == 0
    assert totals["tokens"] == sum(s.tokens for s in manifest.shards.values())
    assert 20 < totals["validation_documents"] < 80
    assert "Pile-CC" in printed and "tokens/s" in printed


def test_output_is_identical_for_any_number_of_workers(corpus):
    options = dict(batch_bytes=3000, shard_tokens=7000, validation_fraction=0.2)
    one, _ = run(corpus, "one", workers=1, **options)
    three, _ = run(corpus, "three", workers=3, **options)
    assert three.run["workers"] == 3
    assert content(one) | {"inputs": 0} == content(three) | {"inputs": 0}
    assert shard_bytes(corpus / "one") == shard_bytes(corpus / "three")
    assert len(one.splits["train"]) >= 4


def test_exact_duplicates_are_dropped_and_counted(tmp_path):
    (tmp_path / "in").mkdir()
    docs = documents(50)
    write_jsonl(tmp_path / "in" / "a.jsonl", docs + docs[:10])
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[5:15])
    manifest, _ = run(tmp_path)
    assert manifest.totals["documents"] == 50 and manifest.totals["duplicates"] == 20
    assert sum(s["duplicates"] for s in manifest.sources.values()) == 20
    kept, _ = run(tmp_path, "kept", dedup=False)
    assert kept.totals["documents"] == 70 and kept.totals["duplicates"] == 0


def test_validation_split_is_seeded_and_follows_the_text():
    digests = np.random.default_rng(0).integers(0, 2**63, 100_000, dtype=np.int64).astype(np.uint64)
    a = validation_mask(digests, seed=1, fraction=0.05)
    assert 0.045 < a.mean() < 0.055
    assert (a == validation_mask(digests, seed=1, fraction=0.05)).all()
    assert (a != validation_mask(digests, seed=2, fraction=0.05)).any()
    assert not validation_mask(digests, seed=1, fraction=0.0).any()


def test_digest_set_finds_first_occurrences_across_calls():
    seen = DigestSet()
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**63, 5000, dtype=np.int64).astype(np.uint64)
    reference: set[int] = set()
    for _ in range(40):
        batch = rng.choice(pool, 300)
        new = seen.add(batch)
        expected = []
        for value in batch.tolist():
            expected.append(value not in reference)
            reference.add(value)
        assert new.tolist() == expected
    assert len(seen) == len(reference)


BAD_LINES = [
    b'{"text": "unterminated',  # malformed_json, line 2
    b'{"meta": {"pile_set_name": "A"}}',  # missing_text
    b'{"text": ["not", "a", "string"]}',  # non_string_text
    b'{"text": "bad \xff byte"}',  # invalid_utf8
    b'{"text": "lone \\ud800 surrogate"}',  # invalid_utf8 too
    b'{"text": "   "}',  # empty_document
    b"",  # blank_line
    b"[1, 2]",  # malformed_json again: warned once only
]


def write_bad_corpus(tmp_path):
    (tmp_path / "in").mkdir()
    good = [json.dumps(r).encode() for r in documents(20)]
    lines = [good[0], *BAD_LINES, *good[1:]]
    (tmp_path / "in" / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    data = b"".join(json.dumps(r).encode() + b"\n" for r in documents(2000, seed=5))
    zst = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "in" / "truncated.jsonl.zst").write_bytes(zst[: len(zst) // 2])
    (tmp_path / "in" / "unreadable.jsonl").symlink_to(tmp_path / "missing-target")


def test_bad_input_is_skipped_counted_and_reported_once_per_kind(tmp_path, caplog):
    write_bad_corpus(tmp_path)
    with caplog.at_level(logging.WARNING, logger="neo.prep"):
        manifest, printed = run(tmp_path)
    counts = {kind: entry["count"] for kind, entry in manifest.skipped.items()}
    assert counts == {
        "malformed_json": 2,
        "missing_text": 1,
        "non_string_text": 1,
        "invalid_utf8": 2,
        "empty_document": 1,
        "blank_line": 1,
        "truncated_stream": 1,
        "unreadable_file": 1,
    }
    mixed = str(tmp_path / "in" / "mixed.jsonl")
    assert manifest.skipped["malformed_json"]["examples"][0]["where"] == f"{mixed}:2"
    assert manifest.skipped["malformed_json"]["examples"][1]["where"] == f"{mixed}:9"
    assert manifest.skipped["invalid_utf8"]["examples"][1]["reason"].startswith(
        "unpaired surrogate"
    )
    assert manifest.skipped["unreadable_file"]["examples"][0]["where"].endswith("unreadable.jsonl")
    truncated = manifest.skipped["truncated_stream"]["examples"][0]
    assert truncated["where"].startswith(str(tmp_path / "in" / "truncated.jsonl.zst:"))
    assert 20 < manifest.totals["documents"] < 20 + 2000
    warnings = Counter(r.getMessage().split("skipped: ")[1].split(" (")[0] for r in caplog.records)
    assert len(warnings) == 8 and set(warnings.values()) == {1}, "one warning per kind"
    assert "unterminated" not in printed and "malformed_json" in printed


def test_strict_stops_at_the_first_bad_record_naming_it(tmp_path):
    write_bad_corpus(tmp_path)
    with pytest.raises(PrepError, match=r"mixed.jsonl:2: the line is not a JSON object .*strict"):
        run(tmp_path, strict=True)


def test_rerun_is_a_noop_and_a_different_run_is_refused(corpus):
    first, _ = run(corpus)
    again, printed = run(corpus)
    assert "already prepared" in printed and "nothing to do" in printed
    assert content(again) == content(first) and again.run == first.run
    with pytest.raises(PrepError, match=r"seed: 1234 before, 7 now.*overwrite=true"):
        run(corpus, seed=7)
    with pytest.raises(PrepError, match=r"tokenizer: gpt2 .* before, .*tok.json"):
        load_tokenizer("gpt2").tokenizer.save(str(corpus / "tok.json"))
        run(corpus, tokenizer=str(corpus / "tok.json"))
    with pytest.raises(PrepError, match="made with another tokenizer"):
        run(corpus, tokenizer="sentencepiece")
    assert load_tokenizer(first.tokenizer_dir).encode("Hello,") == [15496, 11], "untouched"
    write_jsonl(corpus / "in" / "b.jsonl", documents(201, seed=2))
    with pytest.raises(PrepError, match=r"inputs: .*b.jsonl .* before"):
        run(corpus)
    replaced, _ = run(corpus, overwrite=True)
    assert replaced.totals["documents"] == 501


def test_an_unrelated_output_directory_is_not_touched(corpus):
    (corpus / "out").mkdir()
    (corpus / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="overwrite=true"):
        run(corpus)
    assert (corpus / "out" / "precious.txt").read_text() == "keep me"


def tree(directory):
    """Every path under `directory` with its bytes (None for a folder): what a test asserts
    nothing touched."""
    return {
        str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
        for p in sorted(Path(directory).rglob("*"))
    }


def test_overwrite_replaces_the_old_output_only_once_the_new_one_is_complete(corpus):
    first, _ = run(corpus, shard_tokens=6000)
    before = tree(corpus / "out")
    with ctrl_c_at_batch(1):  # stops before any shard group of the new output is complete
        run(corpus, overwrite=True, seed=7, batch_bytes=2000, shard_tokens=6000)
    assert tree(corpus / "out") == before, "the old output is back, untouched"
    with ctrl_c_at_batch(25):  # stops with groups complete: the new output stays, resumable
        run(corpus, overwrite=True, seed=7, batch_bytes=2000, shard_tokens=6000)
    (aside,) = corpus.glob(".out.old-*")
    assert tree(aside) == before, "the old output waits aside until the new one is done"
    # As if this process had died (SIGKILL): the next run removes what it left.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()
    aside.rename(aside.with_name(aside.name.rpartition("-")[0] + "-" + dead))
    resumed, _ = run(corpus, seed=7, batch_bytes=2000, shard_tokens=6000)
    assert resumed.settings["seed"] == 7 and not (corpus / "out" / ".prep").exists()
    assert sorted(p.name for p in corpus.iterdir()) == ["in", "out"]
    replaced, _ = run(corpus, overwrite=True, shard_tokens=6000)
    assert content(replaced) | {"inputs": 0} == content(first) | {"inputs": 0}
    assert sorted(p.name for p in corpus.iterdir()) == ["in", "out"]


def test_zero_documents_is_an_error_that_leaves_nothing_behind(tmp_path):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "c.jsonl", [{"content": "one"}, {"content": "two"}])
    with pytest.raises(PrepError) as refused:
        run(tmp_path)
    message = str(refused.value)
    assert "2 record(s) read, every one skipped (2 missing_text;" in message, message
    assert "no 'text' field" in message and "data.text_field=text" in message
    assert not (tmp_path / "out").exists(), "nothing is marked prepared"
    manifest, _ = run(tmp_path, data=CorpusConfig(text_field="content"))  # no overwrite needed
    assert manifest.totals["documents"] == 2


def test_a_full_disk_names_the_output_and_the_space_it_needs(corpus, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IndexedDatasetWriter, "_write", full)
    with pytest.raises(NoSpaceError) as refused:
        run(corpus, batch_bytes=2000, shard_tokens=6000)
    message = str(refused.value)
    assert message.startswith(f"{corpus / 'out'}: no space left on device (")
    assert re.search(r"\d[\d,]* bytes free there, about \d[\d,]* needed\)", message), message
    assert not list((corpus / "out").glob(".*.tmp-*")), "the partial shard is removed"
    monkeypatch.undo()
    resumed, _ = run(corpus, batch_bytes=2000, shard_tokens=6000)  # room again: it goes on
    assert resumed.totals["documents"] > 0


def test_config_errors_name_the_key(corpus):
    with pytest.raises(PrepConfigError, match=r"validation_fraction=1.5 must be in \[0, 1\)"):
        run(corpus, validation_fraction=1.5)
    with pytest.raises(PrepConfigError, match="sentencepiece.model_type='wordpiece'"):
        run(corpus, sentencepiece=SentencePieceConfig(model_type="wordpiece"))
    with pytest.raises(PrepConfigError, match="sentencepiece.vocab_size=512 is not read"):
        run(corpus, sentencepiece=SentencePieceConfig(vocab_size=512))  # a GPT-2 prep


# --- resume -----------------------------------------------------------------------------------

RESUME = dict(batch_bytes=2000, shard_tokens=6000, validation_fraction=0.1)


def test_resume_after_a_crash_between_writing_shards_and_recording_them(corpus, monkeypatch):
    reference, _ = run(corpus, "reference", **RESUME)
    save = Progress.save
    calls = []

    def crash_on_third_save(self, directory):
        calls.append(1)
        if len(calls) == 3:  # start, group 0, then group 1's shards are in place unrecorded
            raise SystemExit("killed")
        save(self, directory)

    monkeypatch.setattr(Progress, "save", crash_on_third_save)
    with pytest.raises(SystemExit):
        run(corpus, **RESUME)
    out = corpus / "out"
    assert (out / "train-00001.bin").is_file(), "the crash left a complete but unrecorded shard"
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(Progress, "save", save)
    resumed, _ = run(corpus, **RESUME)
    assert resumed.run["tokens_this_run"] < reference.totals["tokens"]
    assert content(resumed) | {"inputs": 0} == content(reference) | {"inputs": 0}
    assert shard_bytes(out) == shard_bytes(corpus / "reference")
    assert not (out / ".prep").exists()


@contextlib.contextmanager
def ctrl_c_at_batch(n: int):
    """Inside the block, the n-th batch handed to the workers raises KeyboardInterrupt (a
    Ctrl-C mid-run), which the block must end with."""
    batch, calls = Router.batch, []

    def interrupt(self, *args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        batch(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Router, "batch", interrupt)
        with pytest.raises(KeyboardInterrupt):
            yield


def test_resume_after_ctrl_c_in_the_middle_of_a_group(corpus, caplog):
    reference, _ = run(corpus, "reference", **RESUME)
    with ctrl_c_at_batch(12):
        run(corpus, workers=2, **RESUME)
    out = corpus / "out"
    for idx in out.glob("*.idx"):  # whatever has a final name is complete
        IndexedDataset(idx.with_suffix(""))
    with caplog.at_level(logging.INFO, logger="neo.prep"):
        resumed, _ = run(corpus, workers=2, **RESUME)
    assert any("resuming: " in r.getMessage() for r in caplog.records)
    assert shard_bytes(out) == shard_bytes(corpus / "reference")
    assert content(resumed) | {"inputs": 0} == content(reference) | {"inputs": 0}


# --- tokenizers -------------------------------------------------------------------------------

ZH = [
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "今天天气很好，我们去公园散步吧！",
    "深度学习模型需要大量的训练数据和计算资源。",
    "北京是中华人民共和国的首都，有三千多年的历史。",
    "他说：“这本书非常有意思，我已经读了三遍。”",
    "自然语言处理包括分词、词性标注、句法分析等任务。",
    "上海的夜景很美，黄浦江两岸灯火辉煌。",
    "请把这段代码提交到仓库，然后运行测试。",
]


def mixed_documents(n, seed):
    """Chinese sentences, English words, digits, code-like lines and emoji, mixed."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(2, 12)):
            kind = rng.random()
            if kind < 0.45:
                parts.append("".join(rng.choices(ZH, k=rng.randint(1, 3))))
            elif kind < 0.85:
                parts.append(" ".join(rng.choices(WORDS[:400], k=rng.randint(3, 12))) + ".")
            else:
                parts.append(f"    x_{rng.randint(0, 99)} = {rng.random():.3f}  # 注释 😀")
        docs.append({"text": "\n".join(parts), "meta": {"pile_set_name": rng.choice("AB")}})
    return docs


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_trained_beside_the_shards_encodes_like_sentencepiece(tmp_path, model_type):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "mixed.jsonl", mixed_documents(600, seed=0))
    sp_cfg = SentencePieceConfig(model_type=model_type, vocab_size=800, sample_bytes=10**6)
    manifest, _ = run(tmp_path, tokenizer="sentencepiece", sentencepiece=sp_cfg)
    assert manifest.tokenizer.name == "sentencepiece" and manifest.dtype == "uint16"
    model_file = manifest.tokenizer_dir / "tokenizer.model"
    assert set(manifest.tokenizer.sha256) == {"tokenizer.model"}
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    ours = load_tokenizer(manifest.tokenizer_dir)  # loads the tokenizer.json beside it
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()
    assert (
        ours.eod_token == "<|endoftext|>"
        and ours.eod_id == sp.eos_id() == manifest.tokenizer.eod_id
    )
    unseen = [d["text"] for d in mixed_documents(200, seed=99)]
    unseen += [
        "<|endoftext|> is text, and so are <unk> and <0x41>",
        "  两个空格 and\ttabs\n\n末尾 ",
    ]
    from_model = load_tokenizer(model_file)  # a .model converted on load: the same tokenizer
    for text in unseen:
        assert ours.encode(text) == sp.encode(text) == from_model.encode(text), text
        assert ours.decode(ours.encode(text)) == text, "byte fallback makes it lossless"
    assert ours.eod_id not in ours.encode(unseen[-2])
    # The shards hold exactly what both tokenizers give, then the EOD.
    _, shards = open_prepared(manifest.directory)
    first = shards["train"][0]
    texts = {d["text"] for d in mixed_documents(600, seed=0)}
    decoded = ours.decode(first[0][:-1].tolist())
    assert decoded in texts and first[0].tolist() == sp.encode(decoded) + [sp.eos_id()]


def test_sentencepiece_run_resumes_with_the_model_it_trained(tmp_path):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "mixed.jsonl", mixed_documents(300, seed=1))
    options = dict(
        tokenizer="sentencepiece",
        sentencepiece=SentencePieceConfig(vocab_size=700, sample_bytes=10**6),
        batch_bytes=4000,
        shard_tokens=5000,
    )
    with ctrl_c_at_batch(10):
        run(tmp_path, **options)
    model = (tmp_path / "out" / "tokenizer" / "tokenizer.model").read_bytes()
    manifest, _ = run(tmp_path, **options)
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.model").read_bytes() == model
    assert manifest.run["tokens_this_run"] < manifest.totals["tokens"], "it resumed"
    with pytest.raises(PrepError, match="sentencepiece: .*'vocab_size': 700.* before"):
        run(tmp_path, **options | {"sentencepiece": SentencePieceConfig(vocab_size=900)})


def test_large_vocabulary_shards_are_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(sorted(set(WORDS)))}
    vocab |= {f"filler{i}": len(vocab) + i for i in range(70_000)}
    vocab["[UNK]"], vocab["</doc>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</doc>"])
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "</doc>"}')
    (tmp_path / "in").mkdir()
    docs = documents(30)
    write_jsonl(tmp_path / "in" / "a.jsonl", docs)
    manifest, _ = run(tmp_path, tokenizer=str(tmp_path / "tok"), validation_fraction=0.0)
    eod = vocab["</doc>"]
    assert manifest.dtype == "int32" and manifest.tokenizer.eod_id == eod > 1 << 16
    _, shards = open_prepared(manifest.directory)
    ids = np.concatenate([shards["train"][0][i] for i in range(len(shards["train"][0]))])
    assert ids.dtype == np.int32 and (ids == eod).sum() == 30
    assert sorted(ids[ids != eod].tolist()) == sorted(
        vocab[w] for d in docs for w in d["text"].split()
    )


def test_data_group_files_makes_each_file_a_source(tmp_path):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "news.jsonl", [{"text": "one"}, {"text": "two"}])
    write_jsonl(tmp_path / "in" / "code.jsonl", [{"text": "x = 1"}])
    manifest, _ = run(tmp_path, data=CorpusConfig(source_field=None), validation_fraction=0.0)
    assert {s: c["documents"] for s, c in manifest.sources.items()} == {"news": 2, "code": 1}
