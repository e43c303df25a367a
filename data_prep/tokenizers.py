"""Tokenizers, loaded through Hugging Face `tokenizers`.

`gpt2` is GPT-Neo's tokenizer: the original GPT-2 byte-level BPE files, bundled in
data_prep/assets/gpt2 (see SOURCE.md there for origin, licence and sha256). Any other tokenizer
is a `tokenizer.json` file, or a directory holding one (or GPT-2 style vocab.json + merges.txt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

GPT2_DIR = Path(__file__).parent / "assets" / "gpt2"
GPT2_EOD = "<|endoftext|>"


@dataclass
class LoadedTokenizer:
    """A tokenizer with the end-of-document token it separates documents with."""

    tokenizer: Tokenizer
    eod_token: str
    name: str

    @property
    def eod_id(self) -> int:
        return self.tokenizer.token_to_id(self.eod_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __post_init__(self) -> None:
        # Document text is data: a literal "<|endoftext|>" inside a document must not become
        # the end-of-document token. Only the code that joins documents inserts eod_id.
        self.tokenizer.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def byte_level_bpe(vocab_file: Path, merges_file: Path, eod_token: str = GPT2_EOD) -> Tokenizer:
    """GPT-2's tokenizer from its two files: byte-level pre-tokenisation, no prefix space."""
    tok = Tokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([eod_token])
    return tok


def load_tokenizer(spec: str | Path = "gpt2", eod_token: str | None = None) -> LoadedTokenizer:
    """`gpt2` (bundled), a tokenizer.json path, or a directory with tokenizer.json or
    vocab.json + merges.txt. eod_token defaults to <|endoftext|> or the directory's eos token."""
    if str(spec) == "gpt2":
        tok = byte_level_bpe(GPT2_DIR / "vocab.json", GPT2_DIR / "merges.txt")
        return LoadedTokenizer(tok, eod_token or GPT2_EOD, "gpt2")
    path = Path(spec)
    if path.is_file():
        directory, file = path.parent, path
    elif (path / "tokenizer.json").is_file():
        directory, file = path, path / "tokenizer.json"
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        directory, file = path, None
    elif path.exists():
        raise FileNotFoundError(
            f"{path}: no tokenizer.json, and no vocab.json + merges.txt, in this directory"
        )
    else:
        raise FileNotFoundError(f"tokenizer {str(spec)!r}: no such file or directory (or use gpt2)")
    eod = eod_token or _eos_token_of(directory) or GPT2_EOD
    if file is None:
        tok = byte_level_bpe(path / "vocab.json", path / "merges.txt", eod)
    else:
        tok = Tokenizer.from_file(str(file))
    if tok.token_to_id(eod) is None:
        raise ValueError(
            f"tokenizer {path}: end-of-document token {eod!r} is not in its vocabulary"
        )
    return LoadedTokenizer(tok, eod, str(path))


def _eos_token_of(directory: Path) -> str | None:
    """The eos token named by a Hugging Face tokenizer directory, if it names one."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                return eos
    return None


def save_hf_tokenizer(tok: LoadedTokenizer, out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer files that `transformers.AutoTokenizer.from_pretrained` loads offline."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok.tokenizer,
        bos_token=tok.eod_token,
        eos_token=tok.eod_token,
        unk_token=tok.eod_token,
        model_max_length=model_max_length,
    )
    hf.save_pretrained(str(out_dir))
