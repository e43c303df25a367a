"""The bundled GPT-2 tokenizer: exact files, exact ids."""

import hashlib

import pytest
from transformers import AutoTokenizer

from data_prep.tokenizers import GPT2_DIR, load_tokenizer, save_hf_tokenizer

SHA256 = {
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


@pytest.mark.parametrize("name", SHA256)
def test_bundled_files_are_the_original_gpt2_files(name):
    assert hashlib.sha256((GPT2_DIR / name).read_bytes()).hexdigest() == SHA256[name]
    assert (GPT2_DIR / "LICENSE").is_file() and (GPT2_DIR / "SOURCE.md").is_file()


def test_gpt2_encodes_like_gpt2():
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert tok.vocab_size == 50257
    assert tok.eod_id == 50256
    text = "  Leading spaces, ünïcödé, tabs\tand\nnewlines <|endoftext|> stay."
    assert tok.decode(tok.encode(text)) == text
    assert tok.eod_id not in tok.encode(text), "a literal <|endoftext|> in text is text"
    assert tok.decode([15496, tok.eod_id]) == "Hello<|endoftext|>"


def test_saved_tokenizer_loads_in_transformers_and_back(tmp_path):
    tok = load_tokenizer("gpt2")
    save_hf_tokenizer(tok, tmp_path, model_max_length=2048)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = "The Pile is an 825 GiB English text corpus."
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.eos_token == "<|endoftext|>" and hf.model_max_length == 2048
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == tok.encode(text) and again.eod_id == 50256


def test_unknown_tokenizer_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
