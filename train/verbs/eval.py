"""`neo eval`: the GPT-Neo model card's benchmark table, from any checkpoint, computed as
lm-evaluation-harness computes it (train/evals/).

    neo eval                                          # the demo run's model, every task found
    neo eval checkpoint=runs/demo tasks=[lambada_openai,wikitext] limit=500
    torchrun --nproc_per_node 2 -m train.cli eval ... # items split over ranks, same numbers

Prints a table (task, metric, value, stderr, items, and the published GPT-Neo numbers for the
same cells where they were measured the same way: zero-shot, `val` on the Pile's validation set)
and writes `results.json` (settings, the model's identity, per-task metrics) and, with
log_samples=true, `samples.jsonl` into `output`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from data_prep.files import OutputKind, atomic_dir, check_apart, check_output_free, marked_by
from train import __version__
from train.checkpoints.load import (
    model_from_state,
    read_any,
    require_checkpoint,
    source_tokenizer,
)
from train.config.evaluation import EvalConfig
from train.config.resolve import Resolved, resolve_eval
from train.distributed import process_group
from train.distributed.collectives import merged
from train.distributed.machine import Host, host
from train.distributed.placement import place
from train.errors import EvalError
from train.evals.published import left_out, references
from train.evals.runner import TaskResult
from train.evals.scoring import Progress, Scorer
from train.evals.suite import prepare_tasks, select_tasks
from train.model.sizes import count_parameters

log = logging.getLogger("neo.eval")
RESULTS_FORMAT, RESULTS_VERSION = "neotrain-eval", 1
RESULTS_KIND = OutputKind("a `neo eval` output (results.json)", marked_by("results.json"))


def main(cfg: EvalConfig) -> None:
    where = host(cfg.accelerator)
    run(resolve_eval(cfg, where.world), where)


def run(resolved: Resolved[EvalConfig], where: Host) -> None:
    cfg, ranks, acc = resolved.cfg, where.ranks, where.acc
    require_checkpoint(cfg.checkpoint, "checkpoint")
    check_apart(cfg.output, [cfg.checkpoint], "output", "checkpoint")  # before hours of work
    check_output_free(Path(cfg.output), cfg.overwrite, RESULTS_KIND)
    selected = select_tasks(cfg, default_set=cfg.tasks is None)  # before the model loads
    model, config, tokenizer, identity = load_for_eval(cfg, acc, ranks.local_rank)
    if ranks.world_size > 1:
        process_group.start(acc, ranks)
    # Inputs go to the rank's device (with device_map=auto, the first device: accelerate's
    # hooks move activations between the blocks' devices from there).
    device = acc.device(0 if cfg.device_map else ranks.local_rank)
    context = config.max_position_embeddings
    max_length = min(cfg.max_length or context, context)
    scorer = Scorer(
        model,
        device,
        max_length,
        batch_size=None if cfg.batch_size == "auto" else int(cfg.batch_size),
        batch_tokens=cfg.batch_tokens,
        rank=ranks.rank,
        world_size=ranks.world_size,
        pad_id=tokenizer.eod_id,
    )
    results: list[TaskResult] = []
    timing = {}
    prepared_tasks = prepare_tasks(
        cfg, selected, tokenizer, max_length, val_tokens=cfg.val_tokens, val_seed=cfg.val_seed
    )
    for prepared in prepared_tasks:
        start = time.perf_counter()
        progress = Progress(prepared.task.name, ranks.is_main)
        result = prepared.run(scorer, merged, progress, cfg.log_samples)
        seconds = time.perf_counter() - start
        timing[result.name] = {"seconds": seconds, "items_per_second": result.items / seconds}
        log.info(
            "%s: %d items (%d requests) in %.1fs, %.1f items/s%s",
            result.name,
            result.items,
            prepared.request_count,
            seconds,
            result.items / seconds,
            f"; {result.skipped} bad records skipped, first: {result.skipped_examples[0]}"
            if result.skipped
            else "",
        )
        require_finite(result, cfg)
        results.append(result)
    if ranks.is_main:
        tokenizer_name = identity["tokenizer"]["name"]
        print(table(results, tokenizer_name))
        for note in filter(None, (left_out(r, tokenizer_name) for r in results)):
            log.info(note)
        write_results(cfg, identity, results, timing, ranks.world_size)
    if ranks.world_size > 1:
        process_group.stop()


def require_finite(result: TaskResult, cfg: EvalConfig) -> None:
    """A NaN or infinite score is a broken model or an overflow, never a result to print."""
    bad = {k: v for k, v in result.metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise EvalError(
            f"{result.name}: {shown}: the model's outputs are not finite on {cfg.checkpoint} "
            f"(dtype {cfg.dtype}): its weights may be damaged (neo verify checks an exported "
            "directory) or the dtype overflows (try dtype=float32)"
        )


def load_for_eval(cfg: EvalConfig, acc, local_rank: int):
    """(model in eval mode, its config, tokenizer, identity) from any checkpoint."""
    path = Path(cfg.checkpoint)
    config, state, tokenizer = read_any(path)
    tokenizer = source_tokenizer(cfg, config, tokenizer)
    identity = {
        "path": str(path.resolve()),
        "name": config.name,
        "parameters": count_parameters(config).total,
        "weights_sha256": state_sha256(state),
        "config": asdict(config),
        "tokenizer": {
            "name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eod_token": tokenizer.eod_token,
            "sha256": tokenizer.file_hashes(),
        },
    }
    model = model_from_state(config, state, dtype=getattr(torch, cfg.dtype)).eval()
    return place(model, acc, local_rank, cfg.device_map), config, tokenizer, identity


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """The weights' identity by content: names, dtypes, shapes and bytes, in name order (the
    same for a checkpoint and its export in the same dtype; lm_head, tied to wte, left out)."""
    h = hashlib.sha256()
    for name in sorted(state):
        if name == "lm_head.weight":
            continue
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


MODELS = ("gpt_neo_125m", "gpt_neo_1.3b", "gpt_neo_2.7b")


def table(results: list[TaskResult], tokenizer: str) -> str:
    """task | metric | value | stderr | items | the published GPT-Neo numbers, where they were
    measured as these were (train/evals/published.py)."""
    header = ["task", "metric", "value", "stderr", "items", *MODELS]
    rows = []
    for r in results:
        comparable = references(r, tokenizer)
        for metric, value in r.metrics.items():
            published = comparable.get(metric, {})
            stderr = r.stderr.get(metric)
            rows.append(
                [
                    r.name + (f" ({r.num_fewshot}-shot)" if r.num_fewshot else ""),
                    metric,
                    f"{value:.4f}",
                    f"{stderr:.4f}" if stderr is not None else "",
                    str(r.items),
                    *(f"{published[m]:.4f}" if m in published else "" for m in MODELS),
                ]
            )
        for source, values in r.per_source.items():
            for metric in ("bits_per_byte", "perplexity"):
                rows.append(
                    [
                        f"  {source}",
                        metric,
                        f"{values[metric]:.4f}",
                        "",
                        str(values["documents"]),
                        "",
                        "",
                        "",
                    ]
                )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def write_results(cfg: EvalConfig, identity: dict, results, timing: dict, world_size: int):
    settings = asdict(cfg)
    settings["world_size"] = world_size
    document = {
        "format": RESULTS_FORMAT,
        "format_version": RESULTS_VERSION,
        "neotrain_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": identity,
        "settings": settings,
        "results": {r.name: r.as_dict() for r in results},
        "published": {
            r.name: numbers
            for r in results
            if (numbers := references(r, identity["tokenizer"]["name"]))
        },
        "timing": timing,
    }
    with atomic_dir(cfg.output, cfg.overwrite, kind=RESULTS_KIND, inputs=[cfg.checkpoint]) as tmp:
        (tmp / "results.json").write_text(json.dumps(document, indent=1))
        if cfg.log_samples:
            with open(tmp / "samples.jsonl", "w") as f:
                for r in results:
                    for s in r.samples:
                        f.write(json.dumps(s) + "\n")
    log.info("wrote %s", Path(cfg.output) / "results.json")
