"""Tokenization throughput, side by side in one run on the same text (GPT-2 BPE).

    python bench/prep.py [--input /work/corpus/large.jsonl.zst] [--workers 0]

(a) the limit: one `tokenizers` `encode_batch_fast` call (its Rust thread pool on every core)
    over documents already decoded in memory; the fastest of a few batchings;
(b) `neo prep` end to end, as a user runs it: reading, decompressing, decoding JSON, hashing,
    dedup, tokenizing in worker processes, writing shards and manifest;
(c) the common Hugging Face recipe: `datasets.Dataset.map(batched=True, num_proc=cores)`
    calling a `transformers` fast GPT-2 tokenizer on each batch (as transformers' run_clm.py
    does), writing its arrow cache; (c') the same map calling `encode_batch_fast` directly and
    keeping only the ids: a hand-tuned variant, reported alongside.

Each runs `--rounds` times, alternating, and its best time counts. Every rate counts the
text's tokens (end-of-document tokens not included). CPU seconds add up every process involved:
when other jobs share the cores, wall times stretch but the CPU cost of the work shows. Peak
memory is the largest sum of resident memory over the process and its children, sampled every
50 ms; (a) and (c) include the decoded corpus they hold by design, and forked processes count
pages they share. Goals (issue 3): (b) >= 85% of (a) and >= 1.3x (c). The large corpus is built
by `python data_prep/sample/build.py --large PATH`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from data_prep.config import CorpusConfig
from data_prep.inputs import resolve_inputs
from data_prep.readers import iter_documents
from data_prep.tokenizers import load_tokenizer

NEO = str(Path(sys.executable).with_name("neo"))


class TreeMonitor:
    """Samples a process tree every 50 ms in a thread: `.peak` resident bytes (summed over the
    processes), `.cpu` seconds (user + system) the tree spent while monitored. CPU time shows
    the work done even when other jobs share the cores and stretch the wall time."""

    def __init__(self, pid: int):
        self.root, self.peak = psutil.Process(pid), 0
        self._start = self._cpu(self.root)
        self._cpu_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.05)

    def _sample(self) -> None:
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return  # the root ended
        rss = 0
        for process in tree:
            try:
                rss += process.memory_info().rss
                self._cpu_seen[process.pid] = self._cpu(process)
            except psutil.Error:
                pass  # it ended while being read
        self.peak = max(self.peak, rss)

    @property
    def cpu(self) -> float:
        return sum(self._cpu_seen.values()) - self._start

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class Result:
    tokens: int  # text tokens, end-of-document tokens not counted
    seconds: float  # wall
    cpu: float  # CPU seconds of every process involved
    peak: int  # bytes
    inside: float = 0.0  # (b) only: seconds inside prepare(), as its manifest records

    def better(self, other: Result | None) -> Result:
        return self if other is None or self.seconds < other.seconds else other


def limit(texts: list[str]) -> Result:
    """(a): one encode_batch_fast call over all documents, or calls over slices; the best."""
    tok = load_tokenizer("gpt2").tokenizer
    tok.encode_special_tokens = True
    best = None
    for batch in (len(texts), 1024):
        with TreeMonitor(os.getpid()) as monitor:
            start = time.perf_counter()
            tokens = 0
            for i in range(0, len(texts), batch):
                encodings = tok.encode_batch_fast(texts[i : i + batch], add_special_tokens=False)
                tokens += sum(len(e) for e in encodings)
            seconds = time.perf_counter() - start
        best = Result(tokens, seconds, monitor.cpu, monitor.peak).better(best)
    return best


def neo_prep(path: str, workers: int, scratch: Path) -> Result:
    """(b): the `neo prep` command, timed from start to exit."""
    out = scratch / "shards"
    start = time.perf_counter()
    proc = subprocess.Popen(
        [NEO, "prep", f"input={path}", f"output={out}", f"workers={workers}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    with TreeMonitor(proc.pid) as monitor:
        _, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"neo prep failed:\n{err}")
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = manifest["totals"]["tokens"] - manifest["totals"]["documents"]
    return Result(tokens, seconds, monitor.cpu, monitor.peak, manifest["run"]["seconds"])


def hf_map(texts: list[str], cores: int, scratch: Path, recipe: bool) -> Result:
    """(c) the common recipe: a transformers fast tokenizer called on the batch, as in
    transformers' examples/pytorch/language-modeling/run_clm.py; (c') the same map with
    `tokenizers`' encode_batch_fast inside, ids only (hand-tuned)."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_dict({"text": texts})
    tok = load_tokenizer("gpt2").tokenizer
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")

    def common(batch):
        return hf(batch["text"])

    def tuned(batch):
        encodings = tok.encode_batch_fast(batch["text"], add_special_tokens=False)
        return {"input_ids": [e.ids for e in encodings]}

    with TreeMonitor(os.getpid()) as monitor:
        start = time.perf_counter()
        mapped = dataset.map(
            common if recipe else tuned,
            batched=True,
            num_proc=cores,
            remove_columns=["text"],
            cache_file_name=str(scratch / f"hf-{recipe}" / "tokens.arrow"),
        )
        seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in mapped["input_ids"])
    return Result(tokens, seconds, monitor.cpu, monitor.peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default="/work/corpus/large.jsonl.zst")
    parser.add_argument("--workers", type=int, default=0, help="neo prep workers (0: all cores)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the best time counts")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    texts = list(iter_documents(resolve_inputs(args.input), CorpusConfig(), budget=1 << 62))
    text_bytes = sum(len(t.encode()) for t in texts)
    if text_bytes < 50e6:
        print(f"warning: {text_bytes / 1e6:.1f} MB of text; the goal is measured on >= 50 MB")

    # Rounds of (a), (b), (c) one after the other, best time of each: a burst of load from
    # elsewhere then slows one round of a method, not one method.
    a = b = c = c2 = None
    loads = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            a = limit(texts).better(a)
            b = neo_prep(args.input, args.workers, Path(tmp)).better(b)
            c = hf_map(texts, cores, Path(tmp), recipe=True).better(c)
            c2 = hf_map(texts, cores, Path(tmp), recipe=False).better(c2)
        loads.append(os.getloadavg()[0])
    report(args.input, texts, text_bytes, cores, loads, a, b, c, c2)


def report(path, texts, text_bytes, cores, loads, a, b, c, c2: Result) -> None:
    table = Table(
        title=f"{path}: {len(texts):,} documents, {text_bytes / 1e6:.1f} MB of text, "
        f"{a.tokens:,} GPT-2 tokens; {cores} cores; load average after each round "
        + ", ".join(f"{x:.1f}" for x in loads),
        title_justify="left",
    )
    for name in ("", "seconds", "tokens/s", "CPU seconds", "tokens per CPU s", "peak memory"):
        table.add_column(name, justify="left" if not name else "right")
    rows = [
        ("(a) limit: encode_batch_fast, all cores, text in memory", a),
        ("(b) neo prep, end to end", b),
        ("(c) datasets.map(batched, num_proc), tokenizer(batch)", c),
        ("(c') datasets.map(batched, num_proc), encode_batch_fast", c2),
    ]
    for label, r in rows:
        table.add_row(
            label,
            f"{r.seconds:.1f}",
            f"{r.tokens / r.seconds / 1e6:.2f}M",
            f"{r.cpu:.1f}",
            f"{r.tokens / r.cpu / 1e6:.2f}M",
            f"{r.peak / 2**20:,.0f} MiB",
        )
    console = Console(width=160)
    console.print(table)
    rate = {name: r.tokens / r.seconds for name, r in zip("abcd", (a, b, c, c2), strict=True)}
    console.print(
        f"(b) / (a) = {rate['b'] / rate['a']:.0%} (goal >= 85%); (b) / (c) = "
        f"{rate['b'] / rate['c']:.2f}x (goal >= 1.3x); (b) / (c') = {rate['b'] / rate['d']:.2f}x; "
        f"(b) spent {b.inside:.1f} s of its {b.seconds:.1f} s inside prepare(), the rest "
        "starting the `neo` command",
        highlight=False,
    )
    counts = {a.tokens, c.tokens, c2.tokens}
    if len(counts) > 1 or abs(b.tokens - a.tokens) > 0.001 * a.tokens:
        console.print(f"token counts differ: {a.tokens:,} {b.tokens:,} {c.tokens:,} {c2.tokens:,}")


if __name__ == "__main__":
    main()
