"""Which tasks a config names, loaded and turned into requests once; `neo eval` runs them once,
`neo train` at every validation (eval.tasks=[...])."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_prep.tokenizers import LoadedTokenizer
from train.config.evaluation import BenchmarkConfig, EvalTaskConfig
from train.data.records import HUB_PREFIX
from train.errors import NotFound
from train.evals.runner import TaskResult, build_requests, run_task
from train.evals.scoring import Request, Score, Scorer
from train.evals.tasks import SPECS, VAL, LoadedTask, load_task, missing_file, task_path
from train.evals.val import load_val

log = logging.getLogger("neo.eval")
NOTHING_FETCHED = (
    "neo eval downloads nothing: the README's Benchmark files say where each file is "
    "published and under which name it goes into data_dir; or set task.NAME.path=FILE"
)


@dataclass
class PreparedTask:
    task: LoadedTask
    requests: list[list[Request]]  # per item
    num_fewshot: int

    @property
    def request_count(self) -> int:
        return sum(map(len, self.requests))

    def run(
        self,
        scorer: Scorer,
        gather: Callable[[dict[int, Score]], dict[int, Score]],
        progress: Callable[[int, int], None] | None = None,
        log_samples: bool = False,
    ) -> TaskResult:
        return run_task(
            self.task, scorer, self.requests, gather, self.num_fewshot, progress, log_samples
        )


def select_tasks(cfg: BenchmarkConfig, default_set: bool) -> dict[str, EvalTaskConfig]:
    """Task name -> its settings. default_set: val and each benchmark whose published file is
    in data_dir (the others are named and left out); otherwise every task in cfg.tasks (each a
    known type: resolve checked), each of which must be found."""
    chosen, missing = {}, []
    if default_set:
        for name in ["val"] + [n for n, s in SPECS.items() if s.default_file]:
            settings = cfg.task_settings(name)
            path = _path(cfg, name, settings)
            if path.startswith(HUB_PREFIX) or Path(path).exists():
                chosen[name] = settings
            else:
                missing.append(f"{name} ({path})")
        if not chosen:
            raise NotFound(f"no task data found: {', '.join(missing)}; {NOTHING_FETCHED}")
        if missing:
            log.info("left out, not found: %s; %s", ", ".join(missing), NOTHING_FETCHED)
        return chosen
    for name in cfg.tasks or []:
        settings = cfg.task_settings(name)
        task_type = settings.type or name
        path = _path(cfg, name, settings)
        if not path.startswith(HUB_PREFIX) and not Path(path).exists():
            raise missing_file(name, task_type, path)
        chosen[name] = settings
    return chosen


def _path(cfg: BenchmarkConfig, name: str, settings: EvalTaskConfig) -> str:
    return task_path(name, settings.type or name, settings.path, cfg.data_dir)


def prepare_tasks(
    cfg: BenchmarkConfig,
    selected: dict[str, EvalTaskConfig],
    tokenizer: LoadedTokenizer,
    max_length: int,
    val_tokens: int | None = None,
    val_seed: int = 0,
) -> list[PreparedTask]:
    """Each selected task loaded, cut to `limit` and turned into requests. val tasks score
    every document up to val_tokens, else a sample seeded by val_seed."""
    out = []
    for name, settings in selected.items():
        task_type = settings.type or name
        path = _path(cfg, name, settings)
        if task_type == VAL:
            split = settings.split or "validation"
            task = load_val(name, path, split, tokenizer, val_tokens, val_seed, cfg.strict)
        else:
            task = load_task(name, task_type, path, cfg.strict, settings.split)
        if cfg.limit is not None:
            task.items = task.items[: cfg.limit]
        out.append(prepare_task(task, tokenizer, max_length, cfg.num_fewshot, cfg.fewshot_seed))
    return out


def prepare_task(
    task: LoadedTask, tokenizer: LoadedTokenizer, max_length: int, num_fewshot: int, seed: int
) -> PreparedTask:
    requests = build_requests(
        task, tokenizer.encode, tokenizer.eod_id, max_length, num_fewshot, seed
    )
    return PreparedTask(task, requests, num_fewshot)
