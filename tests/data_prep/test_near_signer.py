"""dedup=near's batched signer (data_prep/near.py Signer) computes exactly datasketch's MinHash
of each text's shingles, one document at a time, whatever the texts, their number, their
length, and where the chunks of shingles and the pieces of a long text are cut."""

import random
import re
from itertools import chain

import numpy as np
import pytest
from datasketch import MinHash

from data_prep import near
from data_prep.near import Signer, shingles
from data_prep.progress import PrepError

# Characters whose words or lower case are special: Greek capital sigma (a final sigma lowers
# to ς), dotted capital I (lowers to i + a combining dot, which is not a word character),
# ß and capital ẞ, a combining mark, CJK, digits of other scripts, underscore, an emoji, the
# curly apostrophe and dashes (not word characters), a lone surrogate (JSON's "\ud800").
ODD = "ΣσςΑΒΓİıßẞ\u0307\u02b0東京٣_😀’—…\u00a0\t\n\x00\ud800"
TEXTS = [
    "",
    "   \n\t ",
    "...!?",
    "One",
    "a b",
    "a B c d",  # fewer words than the n-gram: one shingle of all of them
    "A b, c!",
    "one two three four five",  # exactly one n-gram
    "one two three four five six",
    "Ωμέγα ΟΔΟΣ ΟΔΟΣ. ΑΣ ʰΣ ΣΑ İstanbul STRASSE straße ẞ 東京 x_1 y2 ٣٤ 😀 it’s",
    "word " * 3000,  # one shingle repeated: duplicates change nothing
    "a b c d e f g " * 500,
]


def datasketch(text: str, ngram: int, num_perm: int, seed: int) -> np.ndarray:
    """The reference: datasketch's own MinHash, updated one shingle at a time."""
    m = MinHash(num_perm=num_perm, seed=seed, scheme="affine32")
    for shingle in shingles(text, ngram):
        m.update(shingle)
    return m.hashvalues


def random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcXYZ019 ,.-'" + ODD
    words = ["the", "Quick", "ΟΔΟΣ", "İi", "straße", "東京", "x_1", "a’b", "ΣΑΣ", "sʰΣ"]
    texts = []
    for _ in range(count):
        if rng.random() < 0.5:
            texts.append("".join(rng.choices(alphabet, k=rng.randrange(0, 120))))
        else:
            seps = [" ", " ", ", ", "\n", "—", "’", "\u0307", "\u00a0"]
            n = rng.randrange(0, 40)
            texts.append("".join(rng.choice(words) + rng.choice(seps) for _ in range(n)))
    return texts


@pytest.mark.parametrize("ngram,num_perm,seed", [(5, 128, 1), (1, 16, 7), (3, 64, 2**32 - 1)])
def test_the_signer_equals_datasketch_text_by_text(ngram, num_perm, seed):
    texts = TEXTS + random_texts(150, seed=ngram)
    expected = np.array([datasketch(t, ngram, num_perm, seed) for t in texts])
    signed = Signer(ngram, num_perm, seed).sign(texts)
    assert signed.dtype == np.uint32 and signed.shape == (len(texts), num_perm)
    assert np.array_equal(signed, expected)


def test_chunks_of_shingles_and_pieces_of_a_text_cut_anywhere_sign_the_same(monkeypatch):
    """A long document crosses chunks (its shingles permuted in several goes, beside other
    documents') and pieces (its text cut where no word is cut, the n-gram carried over)."""
    rng = random.Random(5)
    texts = random_texts(40, seed=9) + [
        " ".join(rng.choices(["alpha", "Beta", "ΓΑΣ", "İ", "d_4", "東"], k=2000)),
        "x" * 100 + " end",  # a word longer than a piece
        "a b",  # shorter than the n-gram after a long document
        "".join(rng.choices("ab ,Σ", k=5000)),
    ]
    expected = np.array([datasketch(t, 5, 32, 3) for t in texts])
    for chunk, piece in [(7, 1 << 20), (1 << 13, 9), (3, 4), (1, 1)]:
        monkeypatch.setattr(near, "CHUNK_SHINGLES", chunk)
        monkeypatch.setattr(near, "PIECE_CHARS", piece)
        assert np.array_equal(Signer(5, 32, 3).sign(texts), expected), (chunk, piece)
        for ngram in (1, 2, 5, 6):
            for text in texts:
                pieces = chain.from_iterable(near._shingle_pieces(text, ngram))
                assert list(pieces) == list(shingles(text, ngram)), (chunk, piece, ngram, text)


def test_a_long_text_is_cut_into_pieces_of_bounded_size(monkeypatch):
    """What bounds a huge document's memory: each piece is PIECE_CHARS characters and the rest
    of the word it would cut (nothing bounds one word, as before batching)."""
    monkeypatch.setattr(near, "PIECE_CHARS", 10)
    text = "alpha, Beta ΓΑΣ—delta epsilon " * 50
    pieces = list(near._text_pieces(text))
    assert len(pieces) >= len(text) // 18 and max(map(len, pieces)) <= 10 + len("epsilon")
    assert list(near._text_pieces("x" * 50)) == ["x" * 50]


def test_a_signature_does_not_depend_on_its_batch():
    texts = random_texts(60, seed=4)
    signer = Signer(5, 64, 1)
    together = signer.sign(texts)
    alone = np.concatenate([signer.sign([t]) for t in texts])
    assert np.array_equal(together, alone)
    assert signer.sign([]).shape == (0, 64)


def test_no_word_lowers_to_anything_the_fast_path_would_split_on():
    """_words lowers words joined by spaces and splits on ASCII whitespace: right only if no
    word character's lower case holds ASCII whitespace; and its ASCII table must be `\\w`."""
    word = re.compile(r"\w")
    for code in range(0x110000):
        c = chr(code)
        if word.match(c):
            assert not set(c.lower()) & set(" \t\n\r\x0b\x0c"), hex(code)
    for code in range(128):
        for text in (f"x{chr(code)}Y", f"x{chr(code)}Y\u00e9"):  # the ASCII path, the other
            expected = [w.lower().encode() for w in re.findall(r"\w+", text)]
            assert near._words(text) == expected, hex(code)


def test_a_datasketch_that_computes_other_signatures_is_refused(monkeypatch):
    """The plan names the datasketch version; a version whose MinHash differs from the
    batched formula (here: another default hash) is refused in one line, not signed silently."""
    monkeypatch.setattr("datasketch.minhash.sha1_hash32", lambda data: len(data))
    with pytest.raises(PrepError, match=r"datasketch \S+ computes other MinHash signatures"):
        Signer(5, 16, 1).sign(["some text"])
