"""Long documents: tokenized in pieces that give the whole document's tokens, in bounded
memory; running out of memory is one line naming the document."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import data_prep.encode
from data_prep.config import PrepConfig, SentencePieceConfig
from data_prep.encode import Batch, EncodeSettings, _Worker, cut_points
from data_prep.prep import PrepError, prepare
from data_prep.tokenizers import load_tokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parents[2]
ZH = "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。"


def long_texts():
    rng = np.random.default_rng(0)
    words = np.array(["the", "model", "don't", "42", "x=1;", "naïve", "\n", "  ", "café", "!"])
    english = " ".join(words[rng.integers(0, len(words), 3000)])
    return [english, ZH * 80]


def worker(tok):
    return _Worker(EncodeSettings(tok.tokenizer.to_str(), tok.eod_id, "int32", "text", None))


def tokens(w, text):
    return w.encode(Batch(0, 0, "values", [(text, None)], "x", 0)).tokens


@pytest.fixture(scope="module")
def sentencepiece_bpe(tmp_path_factory):
    texts = [t[i : i + 300] for t in long_texts()[:2] for i in range(0, len(t), 300)]
    cfg = SentencePieceConfig(vocab_size=600, sample_bytes=10**6)
    return train_sentencepiece(texts * 3, tmp_path_factory.mktemp("sp"), cfg)


@pytest.mark.parametrize("name", ["gpt2", "sentencepiece"])
def test_pieces_give_the_whole_documents_tokens(name, sentencepiece_bpe, monkeypatch):
    tok = load_tokenizer("gpt2") if name == "gpt2" else sentencepiece_bpe
    w = worker(tok)
    assert w.space_dropped == (name == "sentencepiece")  # the dummy prefix puts it back
    whole = [tokens(w, text) for text in long_texts()]
    monkeypatch.setattr(data_prep.encode, "PIECE_CHARS", 200)
    for text, expected in zip(long_texts(), whole, strict=True):
        assert len(list(cut_points(text, 200))) > 10
        np.testing.assert_array_equal(tokens(w, text), expected)


def test_a_word_longer_than_a_piece_keeps_its_text(sentencepiece_bpe, monkeypatch):
    """No space or punctuation to cut at: the pieces decode to the same text, and the tokens
    next to each cut may differ from the whole text's."""
    text = "".join(f"{i:x}" for i in range(3000))  # 10k characters, no word boundary
    gpt2 = load_tokenizer("gpt2")
    monkeypatch.setattr(data_prep.encode, "PIECE_CHARS", 200)
    cuts = len(list(cut_points(text, 200)))
    assert cuts > 40
    assert gpt2.decode(tokens(worker(gpt2), text)[:-1].tolist()) == text
    sp = sentencepiece_bpe.decode(tokens(worker(sentencepiece_bpe), text)[:-1].tolist())
    assert sp == text  # no dummy prefix (a space) at a cut inside a word


def test_cuts_fall_where_a_word_begins():
    assert list(cut_points("aaaa bbbb cccc dddd", 8)) == [4, 9, 14]  # before a single space
    assert list(cut_points("aaaa  bbbbbbbb", 8)) == [8]  # not inside a run of spaces
    assert list(cut_points("一二三四。五六七八九十", 8)) == [5]  # after punctuation
    assert list(cut_points("x" * 20, 8)) == [8, 16]  # no such place: a hard cut


MEASURE = """
import json, resource, sys
from data_prep.encode import Batch, EncodeSettings, _Worker
from data_prep.tokenizers import load_tokenizer
tok = load_tokenizer("gpt2")
w = _Worker(EncodeSettings(tok.tokenizer.to_str(), tok.eod_id, "uint16", "text", None))
w.encode(Batch(0, 0, "json", [b'{"text": "warm up"}'], "x", 0))
words = ["model", "data", "token", "the", "of", "shard", "42", "naive", "x=1;"]
line = json.dumps({"text": " ".join(words[i % 9] for i in range(800_000))}).encode()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = w.encode(Batch(0, 0, "json", [line], "x", len(line)))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"bytes": len(line), "tokens": int(out.lengths[0]), "grown_kib": grown}))
"""


@pytest.mark.slow
def test_a_long_document_costs_megabytes_not_gigabytes():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", MEASURE], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["bytes"] > 3_500_000 and result["tokens"] > 800_000
    # One call over the whole text held ~120 bytes per character (480+ MiB here); in pieces
    # what grows is the text's own copies and its tokens.
    assert result["grown_kib"] < 64 << 10, result


def test_running_out_of_memory_names_the_document_and_its_size(tmp_path, monkeypatch):
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "long " * 50_000}) + "\n"
    )

    def no_memory(self, text):
        raise MemoryError

    monkeypatch.setattr(_Worker, "_pieces", no_memory)
    cfg = PrepConfig(input=str(tmp_path / "c.jsonl"), output=str(tmp_path / "out"), workers=1)
    with pytest.raises(PrepError) as refused:
        prepare(cfg, console=Console(file=io.StringIO()))
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'c.jsonl'}:2: out of memory tokenizing this document")
    assert "(250,012 bytes)" in message and "\n" not in message


KILL_A_WORKER = """
import os, signal, threading
import psutil
from data_prep.encode import Batch, Encoder, EncodeSettings, WorkerDied
from data_prep.tokenizers import load_tokenizer
tok = load_tokenizer("gpt2")
settings = EncodeSettings(tok.tokenizer.to_str(), tok.eod_id, "uint16", "text", None)
big = Batch(0, 0, "json", [b'{"text": "%s"}' % (b"word " * 1_500_000)], "x", 0)
with Encoder(settings, 2, 1 << 20) as encoder:
    results = encoder.map([big, Batch(0, 1, "json", [b'{"text": "small"}'], "x", 0)])
    def kill_the_busy_worker():  # as the out-of-memory killer would
        busy = max(psutil.Process().children(recursive=True), key=lambda p: p.cpu_times().user)
        os.kill(busy.pid, signal.SIGKILL)
    threading.Timer(2.0, kill_the_busy_worker).start()
    try:
        list(results)
    except WorkerDied as e:
        print("died", e.item, e.size)
"""


@pytest.mark.slow
def test_a_killed_worker_is_an_error_not_a_hang():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", KILL_A_WORKER], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.split() == ["died", "0", "7500012"], out.stdout + out.stderr
