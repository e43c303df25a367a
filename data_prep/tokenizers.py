"""Tokenizers, loaded through Hugging Face `tokenizers`.

`gpt2` is GPT-Neo's tokenizer: the original GPT-2 byte-level BPE files, bundled in
data_prep/assets/gpt2 (see SOURCE.md there for origin, licence and sha256). Any other tokenizer
is a `tokenizer.json` file, a SentencePiece `.model` file, or a directory holding one of them
(or GPT-2 style vocab.json + merges.txt).

SentencePiece models (`train_sentencepiece`, or a user's `.model`) are converted to an
equivalent `tokenizers.Tokenizer`, so everything downstream (prep workers, trainer, exporter)
handles one kind of object; the conversion is tested to encode exactly as `sentencepiece` does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from data_prep.files import sha256_file
from train.errors import ConfigError, NotFound

if TYPE_CHECKING:
    from data_prep.config import SentencePieceConfig

GPT2_DIR = Path(__file__).parent / "assets" / "gpt2"
GPT2_EOD = "<|endoftext|>"
SP_MODEL = "tokenizer.model"
SPACE = "\u2581"  # SentencePiece's visible space, "▁"
# SentencePiece piece types (sentencepiece_model.proto).
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6
SP_UNIGRAM, SP_BPE = 1, 2
UNIGRAM_GRID = 16


@dataclass
class LoadedTokenizer:
    """A tokenizer with the end-of-document token it separates documents with."""

    tokenizer: Tokenizer
    eod_token: str
    name: str
    # The files it was loaded from: their sha256 identify it (see `file_hashes`).
    files: list[Path] = field(default_factory=list)
    # A Hugging Face directory's chat template (tokenizer_config.json), for SFT chat data.
    chat_template: str | None = None

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

    def file_hashes(self) -> dict[str, str]:
        """File name -> sha256 of the files this tokenizer was loaded from."""
        return {path.name: sha256_file(path) for path in self.files}


def byte_level_bpe(vocab_file: Path, merges_file: Path, eod_token: str = GPT2_EOD) -> Tokenizer:
    """GPT-2's tokenizer from its two files: byte-level pre-tokenisation, no prefix space."""
    tok = Tokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([eod_token])
    return tok


def load_tokenizer(spec: str | Path = "gpt2", eod_token: str | None = None) -> LoadedTokenizer:
    """`gpt2` (bundled), a tokenizer.json or SentencePiece .model path, or a directory with
    tokenizer.json, tokenizer.model, or vocab.json + merges.txt. eod_token defaults to
    <|endoftext|>, the directory's eos token, or a SentencePiece model's eos piece."""
    if str(spec) == "gpt2":
        files = [GPT2_DIR / "vocab.json", GPT2_DIR / "merges.txt"]
        tok = byte_level_bpe(*files)
        return LoadedTokenizer(tok, eod_token or GPT2_EOD, "gpt2", files)
    path = Path(spec)
    if path.is_file():
        directory, file = path.parent, path
    elif (path / "tokenizer.json").is_file():
        directory, file = path, path / "tokenizer.json"
    elif (path / SP_MODEL).is_file():
        directory, file = path, path / SP_MODEL
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        directory, file = path, None
    elif path.exists():
        raise NotFound(
            f"{path}: no tokenizer.json, tokenizer.model, or vocab.json + merges.txt, "
            "in this directory"
        )
    else:
        raise NotFound(f"tokenizer {str(spec)!r}: no such file or directory (or use gpt2)")
    eod = eod_token or _eos_token_of(directory)
    if file is None:
        files = [path / "vocab.json", path / "merges.txt"]
        tok = byte_level_bpe(*files, eod or GPT2_EOD)
    elif file.suffix == ".model":
        files = [file]
        tok, sp_eos = sentencepiece_to_tokenizer(file.read_bytes(), str(file))
        eod = eod or sp_eos
    else:
        files = [file]
        tok = Tokenizer.from_file(str(file))
    eod = eod or GPT2_EOD
    if tok.token_to_id(eod) is None:
        raise ConfigError(
            f"tokenizer {path}: end-of-document token {eod!r} is not in its vocabulary"
        )
    return LoadedTokenizer(tok, eod, str(path), files)


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
    """Write tokenizer files that `transformers.AutoTokenizer.from_pretrained` loads offline,
    in transformers 4 as in 5: the class is named PreTrainedTokenizerFast, the name both know
    (transformers 5 writes its own alias, TokenizersBackend, which 4.x cannot resolve)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok.tokenizer,
        bos_token=tok.eod_token,
        eos_token=tok.eod_token,
        unk_token=tok.eod_token,
        model_max_length=model_max_length,
    )
    hf.save_pretrained(str(out_dir))
    config_file = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def save_tokenizer(tok: LoadedTokenizer, directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json (naming the eod token): what load_tokenizer and
    transformers' AutoTokenizer read. A SentencePiece model file already there stays."""
    directory.mkdir(parents=True, exist_ok=True)
    tok.tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eod_token}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# SentencePiece


def train_sentencepiece(
    texts: Iterable[str],
    directory: Path,
    cfg: SentencePieceConfig,
    eod_token: str = GPT2_EOD,
    threads: int | None = None,
) -> LoadedTokenizer:
    """Train a SentencePiece model on `texts` and save tokenizer.model, an equivalent
    tokenizer.json and tokenizer_config.json in `directory`.

    Settings for lossless pretraining text: no normalization and no whitespace folding (code
    keeps its indentation), byte fallback (no <unk>: a newline or a rare character becomes its
    UTF-8 bytes), a dummy-prefix space so a word encodes the same at the start of a document as
    inside it. The eod token is the model's only control symbol besides <unk>."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    model = directory / SP_MODEL
    tmp = directory / f".{SP_MODEL}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_lines(texts),
                model_writer=f,
                model_type=cfg.model_type,
                vocab_size=cfg.vocab_size,
                byte_fallback=cfg.byte_fallback,
                character_coverage=cfg.character_coverage,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=True,
                unk_id=0,
                eos_id=1,
                bos_id=-1,
                pad_id=-1,
                eos_piece=eod_token,
                # A small sample may not support the full vocabulary: take what it supports.
                hard_vocab_limit=False,
                max_sentence_length=1 << 16,
                num_threads=threads or os.cpu_count() or 1,
                minloglevel=2,
            )
    except RuntimeError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"sentencepiece training failed (sentencepiece.vocab_size={cfg.vocab_size}, "
            f"model_type={cfg.model_type}): {e}"
        ) from e
    if cfg.model_type == "unigram":
        _round_unigram_scores(tmp)
    os.replace(tmp, model)
    tok = load_tokenizer(model, eod_token)
    save_tokenizer(tok, directory)
    return LoadedTokenizer(tok.tokenizer, eod_token, "sentencepiece", [model])


def _round_unigram_scores(path: Path) -> None:
    """Round piece scores to multiples of 1/16. sentencepiece sums path scores in float32,
    `tokenizers` in float64: on near-ties the two picked different segmentations. With scores
    on a 1/16 grid every path sum is exact in both (up to ~10^5 pieces per word), so both pick
    the same path; a log-probability moves by at most 1/32."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    for piece in proto.pieces:
        piece.score = round(piece.score * UNIGRAM_GRID) / UNIGRAM_GRID
    path.write_bytes(proto.SerializeToString())


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on lines ("sentences"); newlines themselves are left to bytes."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def sentencepiece_to_tokenizer(model: bytes, name: str = "") -> tuple[Tokenizer, str | None]:
    """An equivalent `tokenizers.Tokenizer` of a serialized SentencePiece BPE or unigram model,
    and the model's eos piece (None if it has none)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type not in (SP_UNIGRAM, SP_BPE) or spec.treat_whitespace_as_suffix:
        raise ConfigError(
            f"{name}: only SentencePiece BPE and unigram models with whitespace as prefix "
            f"can be converted (model_type {spec.model_type})"
        )
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    tok = Tokenizer(_sp_model(pieces, spec))
    tok.normalizer = _sp_normalizer(norm)
    # sentencepiece cuts text into words before each "▁" (split_by_whitespace), then segments
    # each word alone; Metaspace with split=True makes the same cut.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="never", split=bool(spec.split_by_whitespace)
    )
    if spec.model_type == SP_UNIGRAM:
        tok.pre_tokenizer = pre_tokenizers.Sequence([tok.pre_tokenizer, _unmatchable(pieces)])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    control = [p for p, _, kind in pieces if kind in (SP_CONTROL, SP_UNKNOWN)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in control])
    eos = pieces[spec.eos_id][0] if 0 <= spec.eos_id < len(pieces) else None
    return tok, eos


def _unmatchable(pieces: list[tuple[str, float, int]]) -> pre_tokenizers.PreTokenizer:
    """sentencepiece never segments text into control, unknown or byte pieces; `tokenizers`'
    Unigram matches every vocabulary string, so a literal "<|endoftext|>" in a document would
    become the end-of-document id. Cutting such literals after their first character keeps
    them text (they then encode as sentencepiece does unless a learned piece spans the cut)."""
    literal = [p for p, _, kind in pieces if kind in (SP_CONTROL, SP_UNKNOWN) and len(p) > 1]
    alternatives = [f"{re.escape(p[0])}(?={re.escape(p[1:])})" for p in literal]
    if any(kind == SP_BYTE for _, _, kind in pieces):
        alternatives.append("<(?=0x[0-9A-F]{2}>)")
    pattern = "|".join(alternatives) or "(?!)"
    return pre_tokenizers.Split(Regex(pattern), behavior="merged_with_previous")


def _sp_model(pieces: list[tuple[str, float, int]], spec) -> models.Model:
    if spec.model_type == SP_UNIGRAM:
        scores = [(p, score) for p, score, _ in pieces]
        return models.Unigram(scores, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    return models.BPE(
        vocab,
        _bpe_merges(pieces),
        unk_token=pieces[spec.unk_id][0],
        byte_fallback=spec.byte_fallback,
        fuse_unk=True,
    )


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """SentencePiece BPE stores pieces with scores, not merges: at each step it joins the
    adjacent pair whose concatenation is the best-scoring piece. Every split of a piece into
    two pieces is therefore a merge, ranked by that piece's score."""
    ids = {p: i for i, (p, _, kind) in enumerate(pieces) if kind in (SP_NORMAL, SP_USER_DEFINED)}
    ranked = []
    for piece, score, kind in pieces:
        if kind != SP_NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-score, ids[piece], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sp_normalizer(norm) -> normalizers.Normalizer:
    """sentencepiece's normalization order: character map, whitespace folding, dummy prefix,
    spaces made visible as "▁"."""
    steps: list[normalizers.Normalizer] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [
            normalizers.Strip(left=True, right=True),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)
