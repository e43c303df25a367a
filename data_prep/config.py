"""`neo prep` configuration schema (registered in Hydra's ConfigStore by train/config/).

It lives here rather than in train/config/ because data_prep must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from train.errors import NeoError

MODEL_TYPES = ("bpe", "unigram")
# `tasks>=1`: the stages a SLURM array runs (data_prep/stages.py), in this order; `all` runs
# every stage for every task here, one task after another.
STAGES = ("plan", "hash", "reduce", "near", "tokenize", "merge")
# the stages that run once per task (array elements): hash and tokenize a share of the slices,
# reduce a share of the digests (a bucket); `near` runs once, and only with dedup=near
TASK_STAGES = ("hash", "reduce", "tokenize")
# `dedup=`: exact copies, exact copies then near duplicates (tasks>=1), or none; the booleans
# of earlier versions still mean exact (true) and none (false).
DEDUP_MODES = ("exact", "near", "none")
_DEDUP_ALIASES = {"true": "exact", "false": "none"}


class PrepConfigError(NeoError, ValueError):
    """A `neo prep` setting breaks a rule; the message names the key and the value."""


@dataclass
class CorpusConfig:
    """`data=` group: where a record keeps its text and the name of its source."""

    # Dotted path into each JSON record / column of a table, e.g. `text` or `content`.
    text_field: str = "text"
    # Dotted path to the source name (the Pile: meta.pile_set_name). Records without it count
    # as source "unknown"; null makes every input file (a txt file's folder) its own source.
    source_field: str | None = "meta.pile_set_name"
    # Hugging Face datasets only: the split to read and the hub config name.
    hf_split: str = "train"
    hf_config: str | None = None


@dataclass
class SentencePieceConfig:
    """`tokenizer=sentencepiece`: train a SentencePiece model on a sample of the input first."""

    model_type: str = "bpe"
    vocab_size: int = 32000
    # Characters outside the vocabulary become their UTF-8 bytes instead of <unk>: lossless.
    byte_fallback: bool = True
    # Share of characters the vocabulary must cover; 0.9995 suits Chinese and mixed text.
    character_coverage: float = 0.9995
    # Text taken for training, spread evenly over the input files.
    sample_bytes: int = 20_000_000


@dataclass
class NearDedupConfig:
    """`dedup=near`: MinHash signatures of word shingles, LSH bands to find candidate pairs,
    each pair verified (data_prep/near.py). The defaults follow Lee et al. 2022 ("Deduplicating
    Training Data Makes Language Models Better": 5-gram words, Jaccard 0.8) and datatrove's
    MinhashConfig (5-grams, ~8 rows per band), with 128 permutations (datasketch's default)."""

    ngram: int = 5  # words per shingle
    num_perm: int = 128  # MinHash permutations (signature length)
    # LSH bands (rows per band = num_perm / bands): 16 x 8 makes pairs at Jaccard 0.8 candidates
    # with probability 1 - (1 - 0.8^8)^16 = 0.93, at 0.5 with probability 0.06.
    bands: int = 16
    threshold: float = 0.8  # estimated Jaccard at or above which a candidate pair is a duplicate
    seed: int = 1  # of the permutations: fixed, so that signatures never depend on the task


@dataclass
class PrepConfig:
    data: CorpusConfig = field(default_factory=CorpusConfig)
    # A file, a folder, a glob, `sample` (the bundled Pile-like sample corpus), a Hugging Face
    # `save_to_disk` folder, or `hf:NAME` (a hub dataset, streamed).
    input: str = "sample"
    output: str = "data/pile_sample"
    # `gpt2` (bundled), a tokenizer.json / SentencePiece .model / tokenizer directory, or
    # `sentencepiece` to train one (see `sentencepiece`) and save it beside the shards.
    tokenizer: str = "gpt2"
    sentencepiece: SentencePieceConfig = field(default_factory=SentencePieceConfig)
    # `exact`: drop exact duplicate documents (same text), keeping the first. `near` (tasks>=1):
    # then also near duplicates (MinHash + LSH, settings in `near`), keeping the first of each
    # cluster. `none`: keep every copy. true/false mean exact/none.
    dedup: str = "exact"
    near: NearDedupConfig = field(default_factory=NearDedupConfig)
    # Share of documents held out for validation, chosen by a seeded hash of the text.
    validation_fraction: float = 0.01
    seed: int = 1234
    # A shard group (one shard per split) closes after this many tokens; the unit of resume.
    shard_tokens: int = 100_000_000
    # Tokenizing processes; 0 means one per CPU core.
    workers: int = 0
    # Stop at the first bad record (exit code 2) instead of skipping and counting it.
    strict: bool = False
    # Replace an existing output directory instead of refusing (or resuming).
    overwrite: bool = False
    # 0: the one-machine pipeline. N >= 1: the staged pipeline a cluster runs (plan, hash,
    # reduce, near, tokenize, merge), its per-task stages split into N tasks; the output does
    # not depend on N (data_prep/stages.py).
    tasks: int = 0
    # With tasks >= 1: `all`, or one of STAGES; `hash`, `reduce` and `tokenize` run one task
    # (`task=`).
    stage: str = "all"
    task: int | None = None
    # With tasks >= 1: a .jsonl[.zst|.gz] file is cut into slices of this many bytes of its
    # uncompressed content (a slice owns the lines that start in it); any other input file is
    # one slice.
    slice_bytes: int = 1 << 30

    def validate(self) -> PrepConfig:
        """Raise PrepConfigError for the first rule this config breaks; return self otherwise."""
        for key in ("input", "output", "tokenizer"):
            if not getattr(self, key):
                raise PrepConfigError(f"{key}= must not be empty")
        if not self.data.text_field:
            raise PrepConfigError("data.text_field= must not be empty")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise PrepConfigError(
                f"validation_fraction={self.validation_fraction} must be in [0, 1)"
            )
        if self.shard_tokens < 1:
            raise PrepConfigError(f"shard_tokens={self.shard_tokens} must be >= 1")
        if self.workers < 0:
            raise PrepConfigError(f"workers={self.workers} must be >= 0 (0: one per core)")
        self._validate_tasks()
        self._validate_dedup()
        sp = self.sentencepiece
        if sp.model_type not in MODEL_TYPES:
            raise PrepConfigError(
                f"sentencepiece.model_type={sp.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
            )
        if sp.vocab_size < 1 or sp.sample_bytes < 1:
            raise PrepConfigError(
                f"sentencepiece.vocab_size={sp.vocab_size} and "
                f"sentencepiece.sample_bytes={sp.sample_bytes} must be >= 1"
            )
        if not 0.0 < sp.character_coverage <= 1.0:
            raise PrepConfigError(
                f"sentencepiece.character_coverage={sp.character_coverage} must be in (0, 1]"
            )
        if self.tokenizer != "sentencepiece":
            for f in fields(sp):
                if getattr(sp, f.name) != getattr(SentencePieceConfig(), f.name):
                    raise PrepConfigError(
                        f"sentencepiece.{f.name}={getattr(sp, f.name)} is not read: "
                        f"tokenizer={self.tokenizer} (tokenizer=sentencepiece trains one)"
                    )
        return self

    @property
    def dedup_mode(self) -> str:
        """`dedup=` as one of DEDUP_MODES (true/false read as exact/none)."""
        value = str(self.dedup).strip().lower()
        return _DEDUP_ALIASES.get(value, value)

    @property
    def deduplicates(self) -> bool:
        """Whether the hash and reduce stages have work: any dedup at all (near: dedup=near)."""
        return self.dedup_mode != "none"

    def _validate_dedup(self) -> None:
        mode = self.dedup_mode
        if mode not in DEDUP_MODES:
            raise PrepConfigError(
                f"dedup={self.dedup!r} is not one of {', '.join(DEDUP_MODES)} (true: exact, "
                "false: none)"
            )
        near = self.near
        if mode != "near":
            for f in fields(near):
                if getattr(near, f.name) != getattr(NearDedupConfig(), f.name):
                    raise PrepConfigError(
                        f"near.{f.name}={getattr(near, f.name)} is not read: dedup={self.dedup} "
                        "(dedup=near removes near duplicates)"
                    )
            return
        if self.tasks == 0:
            # The one-machine run decides each document as it streams by; a near-duplicate
            # cluster can be joined by a later document, so its survivor is only known once
            # every signature is in: the staged reduce.
            raise PrepConfigError(
                "dedup=near needs the staged pipeline: add tasks=1 (or more); its near stage "
                "sees every document's MinHash signature before deciding"
            )
        if near.ngram < 1 or near.num_perm < 1 or near.bands < 1:
            raise PrepConfigError(
                f"near.ngram={near.ngram}, near.num_perm={near.num_perm} and "
                f"near.bands={near.bands} must be >= 1"
            )
        if near.num_perm % near.bands:
            raise PrepConfigError(
                f"near.bands={near.bands} does not divide near.num_perm={near.num_perm} "
                "(each band is num_perm / bands rows of the signature)"
            )
        if not 0.0 < near.threshold <= 1.0:
            raise PrepConfigError(f"near.threshold={near.threshold} must be in (0, 1]")
        if not 0 <= near.seed < 2**32:
            raise PrepConfigError(f"near.seed={near.seed} must be in [0, 2^32)")

    def _validate_tasks(self) -> None:
        if self.tasks < 0:
            raise PrepConfigError(f"tasks={self.tasks} must be >= 0 (0: one machine, no stages)")
        if self.slice_bytes < 1:
            raise PrepConfigError(f"slice_bytes={self.slice_bytes} must be >= 1")
        if self.stage != "all" and self.stage not in STAGES:
            raise PrepConfigError(f"stage={self.stage!r} is not one of all, {', '.join(STAGES)}")
        if self.tasks == 0 and (self.stage != "all" or self.task is not None):
            raise PrepConfigError(
                f"stage={self.stage} task={self.task} needs tasks= (the number of tasks, >= 1)"
            )
        if self.stage in TASK_STAGES:
            if self.task is None or not 0 <= self.task < self.tasks:
                raise PrepConfigError(
                    f"task={self.task} must be in [0, {self.tasks}) for stage={self.stage} "
                    f"with tasks={self.tasks}"
                )
        elif self.task is not None:
            raise PrepConfigError(
                f"task={self.task} is not read by stage={self.stage} "
                f"(only by {', '.join(TASK_STAGES)})"
            )
