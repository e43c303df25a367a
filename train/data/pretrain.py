"""Training samples from token shards: packed, deterministic, resumable, blendable.

A *stream* is the documents of one blend component (a `neo prep` directory, or one source of
it) in one split. Epoch e of a stream shuffles its documents with a seed, concatenates them
(every document already ends with the EOD token) and cuts the result into samples of
seq_len + 1 tokens that overlap by one token (inputs and shifted targets); the samples of the
epoch are then shuffled too. Sample k of a stream is epoch-major, so any k can be fetched
directly: resuming needs only the number of samples consumed.

A *blend* maps global sample index -> (component, index in component) with weights, in
blocks of BLOCK samples drawn from a seeded generator, so it too is random-access.

Step s of training consumes global samples [s * G, (s + 1) * G) for a global batch of G; rank r
takes micro-batch a's slice [s*G + (a*W + r)*m, ... + m). The samples of a step do not depend on
the world size, which is what makes world size 1 and 2 train the same model.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.manifest import Manifest, manifest_digest, open_prepared
from data_prep.shards import IndexedDataset
from data_prep.tokenizers import LoadedTokenizer, load_tokenizer
from train.config.shell import command, override
from train.config.train import BlendComponent, DataConfig
from train.errors import ConfigError

BLOCK = 4096  # blend assignment block


@dataclass
class Documents:
    """Documents of one component and split: (dataset, index) for each, and token counts."""

    datasets: list[IndexedDataset]
    dataset_ids: np.ndarray  # int32 (N,)
    doc_ids: np.ndarray  # int64 (N,)
    lengths: np.ndarray  # int64 (N,)

    def tokens(self, i: int, offset: int, length: int) -> np.ndarray:
        return self.datasets[self.dataset_ids[i]].get(int(self.doc_ids[i]), offset, length)


class SampleStream:
    """Samples of seq_len + 1 tokens from one Documents, epoch after epoch."""

    def __init__(
        self,
        docs: Documents,
        seq_len: int,
        seed: int,
        shuffle: bool = True,
        cache_dir: Path | None = None,
    ):
        if len(docs.lengths) == 0:
            raise ConfigError("a data stream has no documents")
        self.docs, self.seq_len, self.seed, self.shuffle = docs, seq_len, seed, shuffle
        self.cache_dir = cache_dir
        total = int(docs.lengths.sum())
        self.samples_per_epoch = (total - 1) // seq_len
        if self.samples_per_epoch < 1:
            raise ConfigError(
                f"a data stream has {total} tokens, fewer than one sample of seq_len + 1 = "
                f"{seq_len + 1}"
            )

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a stream lives as long as the run)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, token offset where each ordered document starts, sample order),
        built once and cached on disk when a cache directory is given: for a corpus of
        hundreds of millions of documents that is seconds of work and gigabytes per rank,
        which every rank then shares through the page cache (memory-mapped)."""
        if self.cache_dir is None:
            return self._build_epoch(epoch)
        key = hashlib.sha256(
            self.docs.doc_ids.tobytes()
            + self.docs.lengths.tobytes()
            + f"{self.seq_len}/{self.seed}/{self.shuffle}/{epoch}".encode()
        ).hexdigest()[:20]
        files = [
            self.cache_dir / f"epoch-{key}-{name}.npy" for name in ("order", "starts", "samples")
        ]
        if not all(f.exists() for f in files):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for f, array in zip(files, self._build_epoch(epoch), strict=True):
                tmp = f.with_name(f".{f.name}.{os.getpid()}.npy")
                np.save(tmp, array)
                os.replace(tmp, f)  # ranks racing here write identical files
        order, starts, samples = (np.load(f, mmap_mode="r") for f in files)
        return order, starts, samples

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(self.docs.lengths)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            samples = rng.permutation(self.samples_per_epoch)
        else:
            order = np.arange(n)
            samples = np.arange(self.samples_per_epoch)
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(self.docs.lengths[order], out=starts[1:])
        return order, starts, samples

    def __getitem__(self, k: int) -> np.ndarray:
        epoch, j = divmod(int(k), self.samples_per_epoch)
        order, starts, samples = self._epoch(epoch)
        begin = int(samples[j]) * self.seq_len
        end = begin + self.seq_len + 1
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        filled = 0
        d = int(np.searchsorted(starts, begin, side="right")) - 1
        while filled < len(out):
            offset = begin + filled - int(starts[d])
            take = min(int(self.docs.lengths[order[d]]) - offset, end - begin - filled)
            out[filled : filled + take] = self.docs.tokens(int(order[d]), offset, take)
            filled += take
            d += 1
        return out


class Blend:
    """Global sample index -> a sample from one of several streams, in proportion to weights."""

    def __init__(self, streams: list[SampleStream], weights: list[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)  # positive: train/config/train.py checks them
        self.streams, self.weights, self.seed = streams, w / w.sum(), seed
        self._choices: list[np.ndarray] = []  # component of each sample, per block
        # samples per component before each block
        self._counts = [np.zeros(len(streams), dtype=np.int64)]

    def _block(self, b: int) -> np.ndarray:
        while len(self._choices) <= b:
            i = len(self._choices)
            rng = np.random.default_rng([self.seed, 7, i])
            choice = rng.choice(len(self.streams), size=BLOCK, p=self.weights).astype(np.int32)
            self._choices.append(choice)
            self._counts.append(self._counts[-1] + np.bincount(choice, minlength=len(self.streams)))
        return self._choices[b]

    def __getitem__(self, k: int) -> np.ndarray:
        if len(self.streams) == 1:
            return self.streams[0][k]
        b, i = divmod(int(k), BLOCK)
        choice = self._block(b)
        c = int(choice[i])
        index = int(self._counts[b][c]) + int(np.count_nonzero(choice[:i] == c))
        return self.streams[c][index]


def micro_batch(
    blend: Blend, step: int, micro: int, rank: int, world: int, micro_size: int, accum: int
):
    """The (micro_size, seq_len + 1) token array rank `rank` trains on at (step, micro)."""
    global_batch = micro_size * accum * world
    first = step * global_batch + (micro * world + rank) * micro_size
    return np.stack([blend[first + i] for i in range(micro_size)])


@dataclass
class PretrainBatches:
    """The loop's view of pretraining data: this rank's micro-batches, inputs and targets."""

    blend: Blend
    rank: int
    world_size: int
    micro_size: int
    accumulation: int
    seq_len: int

    def micro_batch(self, step: int, micro: int) -> dict[str, np.ndarray]:
        tokens = micro_batch(
            self.blend, step, micro, self.rank, self.world_size, self.micro_size, self.accumulation
        )
        return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}

    def targets_in_step(self, step: int) -> int:
        """Targets the loss counts in step `step`, over all ranks: every one."""
        return self.micro_size * self.accumulation * self.world_size * self.seq_len

    def tokens_in_step(self, step: int) -> int:
        return self.targets_in_step(step)


@dataclass
class TrainingData:
    train: Blend
    validation: Blend | None
    manifests: list[Manifest]
    tokenizer: LoadedTokenizer
    identity: dict  # what decides the sample order, for resume checks

    @property
    def vocab_size(self) -> int:
        return self.manifests[0].tokenizer.vocab_size

    @property
    def eod_id(self) -> int:
        return self.manifests[0].tokenizer.eod_id


def load(cfg: DataConfig, seq_len: int, cache_dir: Path | None = None) -> TrainingData:
    """Open the prepared directories named by the config and build the train/validation blends."""
    components = cfg.blend or [_single(cfg.path)]
    opened = {}
    for comp in components:
        if comp.path not in opened:
            if not Path(comp.path).exists():
                prep = command("neo", "prep", "input=CORPUS", override("output", comp.path))
                raise ConfigError(f"data: {comp.path} does not exist (make it with `{prep}`)")
            opened[comp.path] = open_prepared(comp.path, verify=cfg.verify_shards)
    manifests = [m for m, _ in opened.values()]
    vocab = {m.tokenizer.vocab_size for m in manifests}
    eod = {m.tokenizer.eod_id for m in manifests}
    if len(vocab) > 1 or len(eod) > 1:
        raise ConfigError(
            f"data.blend mixes tokenizers (vocab sizes {sorted(vocab)}, EOD ids {sorted(eod)})"
        )

    def blend_for(split: str, shuffle: bool) -> Blend | None:
        streams, weights = [], []
        for i, comp in enumerate(components):
            manifest, shards = opened[comp.path]
            docs = _documents(manifest, shards.get(split, []), comp.source, comp.path)
            if docs is None:
                if split == "train":
                    raise ConfigError(
                        f"data: {comp.path} has no {split!r} documents"
                        + (f" from source {comp.source!r}" if comp.source else "")
                    )
                return None
            streams.append(
                SampleStream(
                    docs, seq_len, cfg.seed + 1000 * i, shuffle=shuffle, cache_dir=cache_dir
                )
            )
            weights.append(comp.weight)
        return Blend(streams, weights, cfg.seed)

    # The prepared data by content (manifest digest), not by path: a moved directory resumes.
    identity = {
        "components": [
            {"manifest": manifest_digest(opened[c.path][0]), "source": c.source, "weight": c.weight}
            for c in components
        ],
        "seq_len": seq_len,
        "seed": cfg.seed,
    }
    return TrainingData(
        train=blend_for("train", shuffle=True),
        validation=blend_for("validation", shuffle=False),
        manifests=manifests,
        tokenizer=_tokenizer(manifests[0]),
        identity=identity,
    )


def _tokenizer(manifest: Manifest) -> LoadedTokenizer:
    """The tokenizer saved beside the shards (the bundled GPT-2 one if the manifest says so)."""
    info = manifest.tokenizer
    if manifest.tokenizer_dir is not None:
        return load_tokenizer(manifest.tokenizer_dir, eod_token=info.eod_token)
    if info.name == "gpt2":
        return load_tokenizer("gpt2")
    raise ConfigError(f"{manifest.directory}: the manifest names no tokenizer directory")


def _single(path: str) -> BlendComponent:
    return BlendComponent(path=path)


def _documents(
    manifest: Manifest, shards: list[IndexedDataset], source: str | None, path: str
) -> Documents | None:
    ids, docs = [], []
    for s, shard in enumerate(shards):
        if source is None:
            d = np.arange(len(shard), dtype=np.int64)
        else:
            d = manifest.source_documents(shard, source)
        ids.append(np.full(len(d), s, dtype=np.int32))
        docs.append(d)
    if not docs or sum(len(d) for d in docs) == 0:
        return None
    dataset_ids, doc_ids = np.concatenate(ids), np.concatenate(docs)
    lengths = np.concatenate([shards[s].sizes[d].astype(np.int64) for s, d in enumerate(docs)])
    return Documents(shards, dataset_ids, doc_ids, lengths)
