"""`neo prep tasks=N` on this machine: what the cluster form costs and how it scales (issue 27;
bench/prep.py measures the one-machine form).

    python bench/prep_tasks.py [--input corpus.jsonl] [--slice-mb 4] [--reduce-millions 10]
                               [--near-millions 1]
    python bench/prep_tasks.py --sign [--input corpus.jsonl] [--documents 2000] [--rounds 2]

(d) the staged pipeline with 1 task and with 2, every task its own `neo prep stage=S task=I`
    process with workers=1, the 2 tasks of a stage running at once: two nodes of one core, the
    scaling a node count gives. Wall seconds of each stage (process start included; the best
    of --rounds alternating rounds), and whether both wrote the same shards and manifest;
(e) one reduce task alone, in this process, on random digests (10% copies) in slice files:
    seconds and peak memory, as the only task and as one of 4 (its bucket: a quarter of the
    digests), the 4 buckets' drops checked equal to the one's;
(f) dedup=near: the signature step's documents/s on the input's first 2000 documents (one
    core, data_prep/near.py Signer, 5-grams, 128 permutations), and the near-duplicate reduce
    on random signatures (10% near copies) in .npy files: seconds and peak memory per million
    documents;
then the Pile (825 GB, 30 files, about 210M documents) projected from the measured rates.
The default input is the bundled sample, decompressed (30 MB of JSON lines, so that it slices).

--sign measures only the signing, side by side on the same documents in one process: the
batched Signer against datasketch's own per-document path (what Signer.sign did before it was
batched: one MinHash per document, update_batch on 8192 shingles at a time), alternating for
--rounds rounds, the best of each counting. Documents/s per core count this process's CPU
seconds (wall seconds stretch when other jobs share the cores); both must give the same
signatures. Two lines for scale: SHA-1 alone on the same shingles (the hash both ways must
call once per shingle: the floor of any exact signer in Python), and xxh32 on them (a faster
hash, for comparison only: it would change every signature).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import islice
from operator import methodcaller
from pathlib import Path

import numpy as np
import psutil
import xxhash
import zstandard
from prep import NEO, TreeMonitor

from data_prep.config import STAGES, TASK_STAGES
from data_prep.dedup import bucket_duplicates
from data_prep.inputs import SAMPLE
from data_prep.near import Signatures, Signer, near_duplicates, shingles

PILE_BYTES, PILE_FILES, PILE_DOCUMENTS = 825e9, 30, 210e6
RUN = [s for s in STAGES if s != "near"]  # exact dedup (the default): near has nothing to do
REDUCE_TASKS = (1, 4)  # one reduce task of this many, measured


def staged(input_path: Path, out: Path, tasks: int, slice_bytes: int) -> dict[str, float]:
    """Wall seconds of each stage, the tasks of a stage run side by side."""
    common = [f"input={input_path}", f"output={out}", f"tasks={tasks}", "workers=1"]
    common.append(f"slice_bytes={slice_bytes}")
    seconds = {}
    for stage in RUN:
        tasks_here = [f"task={t}" for t in range(tasks)] if stage in TASK_STAGES else [""]
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [NEO, "prep", *common, f"stage={stage}", *([task] if task else [])],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for task in tasks_here
        ]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"neo prep stage={stage} failed:\n{err}")
        seconds[stage] = time.perf_counter() - start
    return seconds


def reduce_cost(millions: float, scratch: Path, buckets: int) -> tuple[float, float]:
    """(seconds, peak bytes above the start) of one reduce task (bucket 0 of `buckets`) over
    random digests (10% copies) in 8 slice files, as the reduce stage reads them (memory maps);
    every bucket's drops together must equal one bucket's."""
    n = int(millions * 1e6)
    rng = np.random.default_rng(0)
    digests = rng.integers(0, 2**63, n, dtype=np.uint64)
    digests[rng.integers(0, n, n // 10)] = digests[rng.integers(0, n, n // 10)]
    paths = [scratch / f"hash-{i}.npy" for i in range(8)]
    for path, part in zip(paths, np.array_split(digests, 8), strict=True):
        np.save(path, part)
    del digests, part

    def task(bucket: int) -> np.ndarray:
        return bucket_duplicates((np.load(p, mmap_mode="r") for p in paths), buckets, bucket)[0]

    base = psutil.Process().memory_info().rss
    with TreeMonitor(os.getpid()) as monitor:
        start = time.perf_counter()
        first = task(0)
        seconds = time.perf_counter() - start
    if buckets > 1:  # one bucket is the reference itself
        every = np.sort(np.concatenate([first, *(task(b) for b in range(1, buckets))]))
        if not np.array_equal(every, bucket_duplicates((np.load(p) for p in paths), 1, 0)[0]):
            raise SystemExit(f"reduce: {buckets} buckets dropped other copies than one")
    return seconds, monitor.peak - base


def first_texts(corpus: Path, documents: int) -> list[str]:
    with open(corpus, "rb") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(documents), strict=False)]


def sign_rate(corpus: Path, documents: int = 2000) -> float:
    """Documents per second of the MinHash signature step, one core."""
    texts = first_texts(corpus, documents)
    signer = Signer(5, 128, 1)
    signer.sign(texts[:1])  # its one check of datasketch, outside the timing
    start = time.perf_counter()
    signer.sign(texts)
    return len(texts) / (time.perf_counter() - start)


def datasketch_sign(signer: Signer, texts: list[str]) -> np.ndarray:
    """Signatures the way Signer.sign computed them before it was batched."""
    out = np.empty((len(texts), signer.num_perm), np.uint32)
    for row, text in enumerate(texts):
        m = signer.MinHash(
            num_perm=signer.num_perm,
            seed=signer.seed,
            permutations=signer.permutations,
            scheme="affine32",
        )
        stream = shingles(text, signer.ngram)
        while chunk := list(islice(stream, 8192)):
            m.update_batch(chunk)
        out[row] = m.hashvalues
    return out


def compare_signing(corpus: Path, documents: int, rounds: int) -> None:
    texts = first_texts(corpus, documents)
    signer = Signer(5, 128, 1)
    signer.sign(texts[:1])  # its one check of datasketch, outside the timing
    every = [s for text in texts for s in shingles(text, 5)]
    digest = methodcaller("digest")
    ways = {
        "datasketch per document (before)": lambda: datasketch_sign(signer, texts),
        "Signer, batched (now)": lambda: signer.sign(texts),
        "  for scale: SHA-1 alone": lambda: b"".join(map(digest, map(hashlib.sha1, every))),
        "  for scale: xxh32 alone": lambda: list(map(xxhash.xxh32_intdigest, every)),
    }
    best: dict[str, tuple[float, float]] = {}
    results = {}
    for _ in range(rounds):
        for name, way in ways.items():
            wall, cpu = time.perf_counter(), time.process_time()
            results[name] = way()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            best[name] = min(best.get(name, (cpu, wall)), (cpu, wall))
    before, now = (results[name] for name in list(ways)[:2])
    words = len(every) / len(texts)
    print(
        f"{corpus}: first {len(texts):,} documents, {len(every):,} shingles ({words:.0f} per "
        f"document), 5-grams, 128 permutations; {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; best of {rounds} alternating rounds"
    )
    print(f"{'':36}{'docs/s per core':>16}{'docs/s wall':>12}{'ns/shingle':>11}{'vs before':>10}")
    for name, (cpu, wall) in best.items():
        ratio = best[list(ways)[0]][0] / cpu
        print(
            f"{name:36}{len(texts) / cpu:>16,.0f}{len(texts) / wall:>12,.0f}"
            f"{cpu / len(every) * 1e9:>11,.0f}{ratio:>9.2f}x"
        )
    print(f"same signatures: {np.array_equal(before, now)}")


def near_reduce_cost(millions: float, scratch: Path) -> tuple[float, float, int]:
    """(seconds, peak bytes above the start, clusters' dropped documents) of near_duplicates
    over random signatures in 4 slice files, 10% of them near copies (2 of 128 entries off)."""
    n = int(millions * 1e6)
    rng = np.random.default_rng(0)
    signatures = rng.integers(0, 2**32, (n, 128), dtype=np.uint32)
    copies, of = rng.integers(0, n, n // 10), rng.integers(0, n, n // 10)
    signatures[copies] = signatures[of]
    signatures[copies, :2] = rng.integers(0, 2**32, (len(copies), 2), dtype=np.uint32)
    paths = [scratch / f"minhash-{i}.npy" for i in range(4)]
    for path, part in zip(paths, np.array_split(signatures, 4), strict=True):
        np.save(path, part)
    del signatures, part
    base = psutil.Process().memory_info().rss
    with TreeMonitor(os.getpid()) as monitor:
        start = time.perf_counter()
        dropped = near_duplicates(Signatures(paths), np.arange(n), bands=16, threshold=0.8)
        seconds = time.perf_counter() - start
    return seconds, monitor.peak - base, int(dropped.sum())


def content(out: Path) -> tuple[dict, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["run"]
    files = {p.name: p.read_bytes() for p in sorted(out.glob("*-*.*"))}
    return manifest, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", help="an uncompressed .jsonl (default: the sample)")
    parser.add_argument("--slice-mb", type=float, default=4)
    parser.add_argument("--reduce-millions", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--near-millions", type=float, default=1)
    parser.add_argument("--sign", action="store_true", help="compare signers only")
    parser.add_argument("--documents", type=int, default=2000, help="with --sign")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        corpus = Path(args.input) if args.input else scratch / "in" / "sample.jsonl"
        if not args.input:
            corpus.parent.mkdir()
            with open(SAMPLE, "rb") as f, open(corpus, "wb") as out:
                zstandard.ZstdDecompressor().copy_stream(f, out)
        if args.sign:
            return compare_signing(corpus, args.documents, args.rounds)
        size = corpus.stat().st_size
        slice_bytes = int(args.slice_mb * 2**20)
        one: dict[str, float] = {}
        two: dict[str, float] = {}
        same = True
        for round in range(args.rounds):  # alternating; the best time of each stage counts
            for tasks, best in ((1, one), (2, two)):
                times = staged(corpus, scratch / f"{tasks}-{round}", tasks, slice_bytes)
                best |= {s: min(t, best.get(s, t)) for s, t in times.items()}
            same &= content(scratch / f"1-{round}") == content(scratch / f"2-{round}")
        documents = json.loads((scratch / "1-0" / "manifest.json").read_text())["totals"]
        signing = sign_rate(corpus)
        near = near_reduce_cost(args.near_millions, scratch)
        reduces = {b: reduce_cost(args.reduce_millions, scratch, b) for b in REDUCE_TASKS}
    report(corpus, size, one, two, same, documents, args.reduce_millions, reduces)
    report_near(signing, args.near_millions, *near)


def report_near(signing: float, millions: float, seconds: float, peak: float, dropped: int):
    per_doc = peak / (millions * 1e6)
    print(
        f"dedup=near: signatures {signing:,.0f} documents/s per core; reduce over "
        f"{millions:g}M documents ({dropped:,} dropped): {seconds / millions:.1f} s and "
        f"{per_doc:.0f} bytes per document ({per_doc * 1e6 / 2**20:.0f} MiB) per million "
        "(mapped signature pages included)"
    )
    print(
        f"Pile projection, dedup=near: signatures {PILE_DOCUMENTS / signing / 3600:,.0f} "
        f"core-hours (spread over the hash tasks); near reduce "
        f"{seconds / millions * PILE_DOCUMENTS / 1e6 / 3600:.1f} h and "
        f"{per_doc * PILE_DOCUMENTS / 2**30:.0f} GiB on one node"
    )


def report(corpus, size, one, two, same, totals, millions, reduces) -> None:
    mb = size / 1e6
    print(
        f"{corpus}: {mb:.1f} MB, {totals['documents']:,} documents kept, {os.cpu_count()} "
        f"cores, load average {os.getloadavg()[0]:.1f} (other work on the machine stretches times)"
    )
    print(f"{'stage':<10}{'1 task (s)':>12}{'2 tasks (s)':>13}{'speedup':>9}{'MB/s per task':>15}")
    for stage in RUN:
        rate = f"{mb / one[stage]:.2f}" if stage in ("hash", "tokenize") else ""
        print(
            f"{stage:<10}{one[stage]:>12.1f}{two[stage]:>13.1f}"
            f"{one[stage] / two[stage]:>8.2f}x{rate:>15}"
        )
    total1, total2 = sum(one.values()), sum(two.values())
    print(f"{'all':<10}{total1:>12.1f}{total2:>13.1f}{total1 / total2:>8.2f}x")
    print(f"same shards and manifest for 1 and 2 tasks: {same}")
    for buckets, (seconds, peak) in reduces.items():
        per_doc = peak / (millions * 1e6)
        print(
            f"reduce, one task of {buckets} over {millions:g}M documents: {seconds:.2f} s, peak "
            f"{peak / 2**20:.0f} MiB ({per_doc:.1f} bytes per document of the corpus)"
        )
    # The Pile, from the per-core rates of the 1-task run (process starts included).
    core_hours = {s: one[s] / size * PILE_BYTES / 3600 for s in ("hash", "tokenize")}
    cores = PILE_FILES * 32
    seconds, peak = reduces[1]
    per_m, per_doc = seconds / millions, peak / (millions * 1e6)
    print(
        f"Pile projection: hash {core_hours['hash']:,.0f} and tokenize "
        f"{core_hours['tokenize']:,.0f} core-hours; on {PILE_FILES} tasks (one per .zst file, "
        f"the most whole-file slices allow) of 32 cores: "
        f"{(core_hours['hash'] + core_hours['tokenize']) / cores:.1f} h; reduce "
        f"{per_m * PILE_DOCUMENTS / 1e6 / 60:.0f} min and {per_doc * PILE_DOCUMENTS / 2**30:.1f} "
        f"GiB in one task, about 1/N of both in each of N tasks"
    )


if __name__ == "__main__":
    sys.exit(main())
