"""`val`: loss, perplexity and bits per byte of a split of our own data, overall and per source.

Each document is scored whole, as the harness scores the Pile's subsets (rolling windows of the
model's context, the first conditioned on the end-of-document token; the separator itself is not
scored), and every sum is kept per source (the manifest's `pile_set_name` ranges). Over a token
budget, a seeded sample of documents stands for the split: each source keeps its share of the
split's tokens, so the overall number weighs sources as the split does.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from data_prep.config import CorpusConfig
from data_prep.inputs import resolve_inputs
from data_prep.manifest import MANIFEST_FILE, open_prepared
from data_prep.readers import UNKNOWN_SOURCE, BadRecord, Problem, decode_record, read_batches
from data_prep.tokenizers import LoadedTokenizer
from train.data.records import Skipped
from train.errors import ConfigError, NotFound
from train.evals.items import Item
from train.evals.tasks import SPECS, VAL, LoadedTask


def load_val(
    name: str,
    path: str,
    split: str,
    tokenizer: LoadedTokenizer,
    max_tokens: int | None,
    seed: int,
    strict: bool,
) -> LoadedTask:
    """A prepared directory's split, or a corpus file tokenized here, as val items."""
    if not Path(path).exists():
        raise NotFound(
            f"task {name}: {path} does not exist; expected a `neo prep` output directory "
            "(run neo prep) or a corpus file (JSON lines with text and meta.pile_set_name)"
        )
    skipped = Skipped()
    if (Path(path) / MANIFEST_FILE).is_file():
        items = _prepared_items(path, split, tokenizer)
    else:
        items = _corpus_items(path, tokenizer, skipped, strict)
    if not items:
        raise NotFound(f"task {name}: {path} has no {split!r} documents")
    return val_task(name, items, max_tokens, seed, skipped, path)


def load_blend_val(
    components: list[tuple[str, str | None]],
    tokenizer: LoadedTokenizer,
    max_tokens: int | None,
    seed: int,
) -> LoadedTask | None:
    """`neo train`'s validation: the validation documents of every (prepared directory,
    source or None) of its data, as one val task; None when there are none."""
    items: list[Item] = []
    for path in dict.fromkeys(p for p, _ in components):  # each directory once, in order
        sources = {s for p, s in components if p == path}
        found = _prepared_items(path, "validation", tokenizer, missing_ok=True)
        items += [i for i in found if None in sources or i.source in sources]
    if not items:
        return None
    source = ", ".join(dict.fromkeys(p for p, _ in components))
    return val_task("val", items, max_tokens, seed, Skipped(), source)


def val_task(
    name: str, items: list[Item], max_tokens: int | None, seed: int, skipped: Skipped, source: str
) -> LoadedTask:
    """The documents (a seeded sample of them over max_tokens) as a val task; `split_tokens`
    and `split_documents` say what the sample stands for."""
    for i, item in enumerate(items):
        item.index = i
    chosen = sample_documents(items, max_tokens, seed)
    task = LoadedTask(name, VAL, SPECS[VAL].metrics, chosen, None, skipped, source)
    task.split_documents, task.split_tokens = len(items), sum(len(i.tokens) for i in items)
    return task


def _prepared_items(
    path: str, split: str, tokenizer: LoadedTokenizer, missing_ok: bool = False
) -> list[Item]:
    manifest, shards = open_prepared(path)
    if split not in manifest.splits and missing_ok:
        return []
    if split not in manifest.splits:
        raise ConfigError(
            f"{path}: no split {split!r} (it has {', '.join(sorted(manifest.splits))})"
        )
    if manifest.tokenizer.vocab_size != tokenizer.vocab_size or (
        manifest.tokenizer_dir is not None and not _same_vocab(manifest, tokenizer)
    ):
        raise ConfigError(
            f"{path} was tokenized with {manifest.tokenizer.name} ({manifest.tokenizer.vocab_size} "
            f"tokens), not the model's tokenizer {tokenizer.name} ({tokenizer.vocab_size})"
        )
    eod = manifest.tokenizer.eod_id
    items = []
    for shard in shards[split]:
        info = manifest.shards[Path(shard.prefix).name]
        for source, r in info.sources.items():
            for d in range(r.start, r.end):
                tokens = shard.get(d).astype(np.int64).tolist()
                if tokens and tokens[-1] == eod:
                    tokens = tokens[:-1]
                if tokens:
                    text_bytes = len(tokenizer.decode(tokens).encode("utf-8"))
                    items.append(_item(f"{shard.prefix}[{d}]", tokens, text_bytes, source))
    return items


def _same_vocab(manifest, tokenizer: LoadedTokenizer) -> bool:
    from data_prep.tokenizers import load_tokenizer

    theirs = load_tokenizer(manifest.tokenizer_dir, eod_token=manifest.tokenizer.eod_token)
    return theirs.tokenizer.get_vocab() == tokenizer.tokenizer.get_vocab()


def _corpus_items(
    path: str, tokenizer: LoadedTokenizer, skipped: Skipped, strict: bool
) -> list[Item]:
    """Documents of a corpus `neo prep` reads (the Pile's JSON lines by default)."""
    corpus = CorpusConfig()
    files = resolve_inputs(path)
    text_field, source_field = corpus.text_field.split("."), corpus.source_field.split(".")
    items = []
    for batch in read_batches(files, corpus):
        if isinstance(batch, Problem):
            where = f"{files[batch.file].path}: record {batch.record + 1}"
            skipped.add(f"{where}: {batch.detail}", strict)
            continue
        for k, raw in enumerate(batch.items):
            where = f"{files[batch.file].path}:{batch.first + k + 1}"
            try:
                text, source = decode_record(batch.kind, raw, text_field, source_field)
            except BadRecord as e:
                skipped.add(f"{where}: {e}", strict)
                continue
            tokens = tokenizer.encode(text)
            items.append(
                _item(where, tokens, len(text.encode("utf-8")), source or batch.default_source)
            )
    return items


def _item(where: str, tokens: list[int], text_bytes: int, source: str) -> Item:
    return Item(0, where, tokens=tokens, bytes=text_bytes, source=source or UNKNOWN_SOURCE)


def sample_documents(items: list[Item], max_tokens: int | None, seed: int) -> list[Item]:
    """Every document when they fit max_tokens; otherwise, per source, documents in a seeded
    order until the source has its share (its tokens / all tokens) of max_tokens - at least
    one document per source."""
    total = sum(len(i.tokens) for i in items)
    if max_tokens is None or total <= max_tokens:
        return items
    by_source: dict[str, list[Item]] = {}
    for item in items:
        by_source.setdefault(item.source, []).append(item)
    chosen = []
    for n, source in enumerate(sorted(by_source)):
        docs = by_source[source]
        share = max_tokens * sum(len(d.tokens) for d in docs) / total
        order = np.random.default_rng([seed, n]).permutation(len(docs))
        taken = 0
        for k in order:
            if taken and taken + len(docs[k].tokens) > share:
                continue  # a smaller document may still fit the share
            chosen.append(docs[k])
            taken += len(docs[k].tokens)
    return sorted(chosen, key=lambda i: i.index)


def val_metrics(lls: list[float], tokens: list[int], text_bytes: list[int]) -> dict[str, float]:
    """Sums over documents: loss per token, its exp, and bits per UTF-8 byte."""
    nll, n, b = -math.fsum(lls), sum(tokens), sum(text_bytes)
    return {
        "loss": nll / n,
        "perplexity": math.exp(min(nll / n, 700.0)),
        "bits_per_byte": nll / b / math.log(2),
        "tokens": n,
        "bytes": b,
    }
