"""The plan of a staged `neo prep` (tasks>=1; data_prep/stages.py): the first stage checks
the inputs and the output, sets up the tokenizer and cuts the input into slices, recorded in
`.prep/plan.json`; every later stage loads it with Planned.load, which refuses a task run with
other settings or inputs than the plan's."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.config import PrepConfig
from data_prep.encode import Encoder, EncodeSettings
from data_prep.files import atomic_write_text, owned_name
from data_prep.inputs import InputFile, describe_input, resolve_inputs
from data_prep.manifest import MANIFEST_FILE, Manifest
from data_prep.output import TOKENIZER_DIR, open_inputs
from data_prep.prep import BATCH_BYTES, WINDOW_BATCHES, load_or_train_tokenizer
from data_prep.progress import (
    PLAN_FILE,
    STATE_DIR,
    PrepError,
    manifest_identity,
    require_same,
    run_identity,
)
from data_prep.shards import token_dtype
from data_prep.sizes import with_decoded_sizes
from data_prep.slices import Slice, plan_slices, slice_owners, task_slices
from data_prep.tokenizers import LoadedTokenizer, save_tokenizer

log = logging.getLogger("neo.prep")


def state_directory(cfg: PrepConfig) -> Path:
    path = Path(cfg.output).expanduser()
    return path.resolve() if path.is_symlink() and path.is_dir() else path


# ---------------------------------------------------------------------------------------------
# plan


def plan(cfg: PrepConfig) -> None:
    """Check the inputs and the output, set up the tokenizer and write the slices' plan. A
    rerun with the same inputs and settings does nothing; with others, it is refused."""
    files, output = open_inputs(cfg.input, cfg.output)
    directory = output.path
    inputs = [describe_input(f) for f in files]
    finished = (directory / MANIFEST_FILE).is_file()
    planned = read_json(directory / STATE_DIR / PLAN_FILE)
    if cfg.overwrite or (not finished and planned is None):
        output.start_empty(cfg.overwrite)
        tokenizer = load_or_train_tokenizer(cfg, files, directory, reuse=False)
        save_tokenizer(tokenizer, directory / TOKENIZER_DIR)
        files = with_decoded_sizes(files, cfg.workers or len(os.sched_getaffinity(0)))
        slices = plan_slices(files, cfg.slice_bytes)
        (directory / STATE_DIR).mkdir(exist_ok=True)
        write_json(
            directory / STATE_DIR / PLAN_FILE,
            {
                "identity": run_identity(cfg, inputs, tokenizer),
                "inputs": inputs,
                "files": [asdict(f) for f in files],
                "slices": [s.to_dict() for s in slices],
                "created": output.created,
                "aside": str(output.aside) if output.aside else None,
            },
        )
        log.info(
            "planned %d slice(s) of %d input file(s) for %d task(s)",
            len(slices),
            len(files),
            cfg.tasks,
        )
        if len(slices) < cfg.tasks:
            log.warning(
                "tasks=%d but only %d slice(s): %d task(s) have nothing to do (a smaller "
                "slice_bytes cuts .jsonl[.zst|.gz] files finer)",
                cfg.tasks,
                len(slices),
                cfg.tasks - len(slices),
            )
        return
    tokenizer = load_or_train_tokenizer(cfg, files, directory, reuse=True)
    old = manifest_identity(Manifest.load(directory)) if finished else planned["identity"]
    require_same(directory, old, run_identity(cfg, inputs, tokenizer))
    log.info("%s is already planned from these inputs and settings", directory)


@dataclass
class Planned:
    """What every stage after the plan reads: the plan, checked against this task's config."""

    cfg: PrepConfig
    directory: Path
    plan: dict[str, Any]
    files: list[InputFile]
    slices: list[Slice]
    tokenizer: LoadedTokenizer

    @property
    def state(self) -> Path:
        return self.directory / STATE_DIR

    @classmethod
    def load(cls, cfg: PrepConfig) -> Planned | None:
        """The plan (None: the output is finished). Refused: no plan, or a config or an input
        that differs from the plan's (a task submitted with other settings)."""
        directory = state_directory(cfg)
        plan = read_json(directory / STATE_DIR / PLAN_FILE)
        if plan is None:
            if (directory / MANIFEST_FILE).is_file():
                return None
            raise PrepError(
                f"{directory}: no {STATE_DIR}/{PLAN_FILE}; run `neo prep stage=plan` with the "
                "same settings first"
            )
        files = [InputFile(**f) for f in plan["files"]]
        now = [f.path for f in resolve_inputs(cfg.input)]
        if now != [f.path for f in files]:
            raise PrepError(
                f"input={cfg.input} names {len(now)} file(s), the plan in {directory} "
                f"{len(files)} others; give every stage the same input="
            )
        for f in files:
            if f.format.startswith("hf_"):  # a folder or the hub: its identity is the plan's
                continue
            size = os.path.getsize(f.path) if os.path.exists(f.path) else 0
            if size != f.bytes:
                raise PrepError(
                    f"{f.path}: {size} bytes, {f.bytes} when planned: the input changed; "
                    "rerun from stage=plan with overwrite=true"
                )
        tokenizer = load_or_train_tokenizer(cfg, files, directory, reuse=True)
        require_same(directory, plan["identity"], run_identity(cfg, plan["inputs"], tokenizer))
        slices = [Slice.from_dict(s) for s in plan["slices"]]
        return cls(cfg, directory, plan, files, slices, tokenizer)

    def task_range(self, task: int) -> range:
        return task_slices(self.slices, task, self.cfg.tasks)

    def require(self, stage: str, done: list[bool]) -> None:
        """Refuse while a slice has not finished `stage`, naming the tasks that owe it."""
        missing = [number for number, ok in enumerate(done) if not ok]
        if not missing:
            return
        owners = slice_owners(self.slices, self.cfg.tasks)
        tasks = sorted({owners[number] for number in missing})
        first = self.slices[missing[0]]
        shown = ", ".join(map(str, tasks[:10])) + (", ..." if len(tasks) > 10 else "")
        raise PrepError(
            f"stage={stage} has not finished for task(s) {shown} of tasks={self.cfg.tasks} "
            f"({len(missing)} of {len(self.slices)} slices missing, the first: slice "
            f"{missing[0]}, {self.files[first.file].path} from byte {first.start}); run "
            f"`neo prep stage={stage} task=I tasks={self.cfg.tasks}` for each, same settings"
        )

    def require_tasks(self, stage: str, missing: list[int]) -> None:
        """Refuse while tasks of a per-bucket stage (reduce) have not finished, naming them."""
        if not missing:
            return
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise PrepError(
            f"stage={stage} has not finished for task(s) {shown} of tasks={self.cfg.tasks}; "
            f"run `neo prep stage={stage} task=I tasks={self.cfg.tasks}` for each, same settings"
        )

    def _minhash(self) -> tuple[int, int, int] | None:
        near = self.cfg.near
        return (near.ngram, near.num_perm, near.seed) if self.cfg.dedup_mode == "near" else None

    def encoder(self, hash_only: bool) -> Encoder:
        workers = self.cfg.workers or len(os.sched_getaffinity(0))
        settings = EncodeSettings(
            self.tokenizer.tokenizer.to_str(),
            self.tokenizer.eod_id,
            token_dtype(self.tokenizer.vocab_size).name,
            self.cfg.data.text_field,
            self.cfg.data.source_field,
            hash_only,
            minhash=self._minhash() if hash_only else None,
        )
        return Encoder(settings, workers, WINDOW_BATCHES * workers * BATCH_BYTES)


# ---------------------------------------------------------------------------------------------
# Files


def optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save under a temporary name, renamed into place: the file is its own marker."""
    tmp = owned_name(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
