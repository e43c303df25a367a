"""What `neo prep` prints: progress while it runs, the summary tables when it is done."""

from __future__ import annotations

import logging
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from data_prep.manifest import Manifest
from data_prep.readers import SKIP_KINDS

log = logging.getLogger("neo.prep")
LOG_EVERY = 10.0  # seconds between progress lines when stdout is not a terminal


class ProgressDisplay:
    """A live bar (share of input bytes read, tokens/s, ETA) on a terminal; elsewhere (CI logs,
    pipes) a progress line every LOG_EVERY seconds."""

    def __init__(self, console: Console, total_bytes: int):
        self.console, self.total = console, total_bytes or None
        self.start = self.last_log = time.perf_counter()
        self.bar: Progress | None = None
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("prep"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self.task = self.bar.add_task("prep", total=self.total, rate="")

    def update(self, input_bytes: int, tokens: int) -> None:
        now = time.perf_counter()
        rate = tokens / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, completed=input_bytes, rate=f"{rate / 1e6:.2f}M tokens/s")
        elif now - self.last_log >= LOG_EVERY:
            self.last_log = now
            share = f"{100 * input_bytes / self.total:.0f}% of the input, " if self.total else ""
            eta = ""
            if self.total and input_bytes:
                eta = f", ETA {(now - self.start) * (self.total / input_bytes - 1):.0f} s"
            log.info("%s%s tokens, %.2fM tokens/s%s", share, f"{tokens:,}", rate / 1e6, eta)

    def __enter__(self) -> ProgressDisplay:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_summary(console: Console, manifest: Manifest) -> None:
    console.print(_sources_table(manifest))
    if manifest.skipped:
        console.print(_skipped_table(manifest))
    for line in _summary_lines(manifest):
        console.print(line, highlight=False)


def _sources_table(m: Manifest) -> Table:
    table = Table(title=f"neo prep: {m.directory}", title_justify="left")
    keys = ["documents", "tokens", "text_bytes", "duplicates", "validation_documents"]
    names = ["source", "documents", "tokens", "text bytes", "duplicates", "validation docs"]
    if "near_dedup" in m.settings:  # dedup=near: its own column
        keys.insert(4, "near_duplicates")
        names.insert(5, "near dups")
    for name in names:
        table.add_column(name, justify="left" if name == "source" else "right")
    rows = sorted(m.sources.items(), key=lambda kv: -kv[1]["tokens"])
    for name, c in rows:
        table.add_row(name, *_counts(c, keys))
    table.add_section()
    table.add_row("total", *_counts(m.totals, keys), style="bold")
    return table


def _counts(c: dict[str, int], keys: list[str]) -> list[str]:
    return [f"{c.get(k, 0):,}" for k in keys]  # .get: manifests from before near_duplicates


def _skipped_table(m: Manifest) -> Table:
    table = Table(title="skipped records (also in manifest.json)", title_justify="left")
    for name in ("kind", "count", "why", "first example"):
        table.add_column(name, justify="right" if name == "count" else "left")
    for kind, entry in sorted(m.skipped.items()):
        first = entry["examples"][0] if entry["examples"] else {"where": "", "reason": ""}
        table.add_row(
            kind,
            f"{entry['count']:,}",
            SKIP_KINDS.get(kind, ""),
            f"{first['where']}: {first['reason']}",
        )
    return table


def _summary_lines(m: Manifest) -> list[str]:
    lines = []
    run = m.run
    if run.get("per_task"):  # a staged run (tasks>=1): its tasks ran apart, timed by the job
        lines.append(f"{run['tasks']} task(s) over {run['slices']} slice(s) of the input")
    elif run:
        peak = run.get("peak_rss_bytes", {})
        memory = f"peak memory {peak.get('main', 0) / 2**20:,.0f} MiB (main process)"
        if peak.get("worker"):
            memory += f", {peak['worker'] / 2**20:,.0f} MiB (largest worker)"
        lines.append(
            f"tokenized {run['tokens_this_run']:,} tokens ({run['documents_this_run']:,} "
            f"documents) in {run['seconds']:.1f} s: {run['tokens_per_second'] / 1e6:.2f}M "
            f"tokens/s with {run['workers']} worker(s); {memory}"
        )
    shards = ", ".join(
        f"{split} {len(prefixes)} shard(s) ({sum(m.shards[p].tokens for p in prefixes):,} tokens)"
        for split, prefixes in m.splits.items()
    )
    lines.append(
        f"{shards}, {m.dtype}; EOD {m.tokenizer.eod_id} after every document; "
        f"manifest {m.directory}/manifest.json, tokenizer {m.tokenizer_dir}"
    )
    return lines
