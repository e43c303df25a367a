"""`neo prep`'s output directory: what counts as one (so that overwrite=true replaces nothing
else), starting it empty, and putting things back when a run ends with nothing to keep.

overwrite=true moves the old output aside (`.NAME.old-HOST-PID`, data_prep/files.py) rather
than deleting it: it is removed once the new manifest is written; if the run fails before its
first shard group is complete, the old output is put back. A run that dies with groups complete
leaves the new, resumable output in place and the old one aside, which the next `neo prep` of
that output removes (its owner is dead).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from data_prep.files import OutputKind, check_apart, check_output_free, move_aside, remove_stale
from data_prep.inputs import (
    HUB_PREFIX,
    SAMPLE,
    SAMPLE_NAME,
    InputFile,
    ignored_files,
    resolve_inputs,
)
from data_prep.manifest import MANIFEST_FILE, MANIFEST_FORMAT
from data_prep.progress import PLAN_FILE, PROGRESS_FILE, STATE_DIR
from data_prep.tokenizers import SP_MODEL

log = logging.getLogger("neo.prep")

TOKENIZER_DIR = "tokenizer"
# What a run writes into tokenizer/ (plus SentencePiece's temporary model file).
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", SP_MODEL}


def is_prep_output(path: Path) -> bool:
    """A finished prep (manifest.json of our format) or one under way (.prep/progress.json,
    or a staged run's .prep/plan.json)."""
    if any((path / STATE_DIR / name).is_file() for name in (PROGRESS_FILE, PLAN_FILE)):
        return True
    try:
        return json.loads((path / MANIFEST_FILE).read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


PREP_OUTPUT = OutputKind(f"a `neo prep` output ({MANIFEST_FILE})", is_prep_output)


def open_inputs(input_spec: str, output: str) -> tuple[list[InputFile], OutputDir]:
    """The input files `input_spec` names (the files it skips warned about), and the output
    directory, refused if it is, holds or lies inside an input."""
    files = resolve_inputs(input_spec)
    check_apart(output, input_paths(input_spec, files))
    directory = OutputDir.at(output)
    for path in ignored_files(input_spec):
        log.warning("%s: ignored (not a .jsonl[.zst|.gz], .parquet or .txt file)", path)
    return files, directory


def input_paths(spec: str, files: list[InputFile]) -> list[Path]:
    """Every local path the input names: the folder or file given, and each file found."""
    if spec.startswith(HUB_PREFIX):
        return []
    given = SAMPLE if spec == SAMPLE_NAME else Path(spec).expanduser()
    found = [Path(f.path) for f in files if f.format != "hf_hub"]
    return ([given] if given.exists() else []) + found


def _only_leftovers(path: Path) -> bool:
    """What a run that stopped before its first progress record leaves: its tokenizer (and a
    state folder without progress) — nothing a user made."""
    if not path.is_dir() or (path / STATE_DIR / PLAN_FILE).is_file():
        return False  # a staged run's plan: its tasks may be under way elsewhere
    names = {p.name for p in path.iterdir()}
    if not names or not names <= {TOKENIZER_DIR, STATE_DIR}:
        return False
    tokenizer = path / TOKENIZER_DIR
    return not tokenizer.exists() or all(
        p.name in TOKENIZER_FILES or p.name.startswith(f".{SP_MODEL}.tmp-")
        for p in tokenizer.iterdir()
    )


def check_output_usable(output: str, overwrite: bool) -> None:
    """Refuse, as the plan of a staged run will, an output holding something that is neither a
    `neo prep` output nor what a stopped run left: checked before a cluster job is submitted
    (`neo launch prep`), so that the mistake is one line here, not a failed plan job."""
    path = Path(output).expanduser()
    if path.is_symlink() and path.is_dir():
        path = path.resolve()
    if not is_prep_output(path) and not _only_leftovers(path):
        check_output_free(path, overwrite, PREP_OUTPUT)


@dataclass
class OutputDir:
    path: Path
    created: bool = False  # this run made the directory
    aside: Path | None = None  # the output overwrite=true replaces, until the new one is done

    @classmethod
    def at(cls, output: str) -> OutputDir:
        """The directory `output` names (a link to one: the directory it points to), with the
        temporary and moved-aside copies of dead runs on this host removed."""
        path = Path(output).expanduser()
        if path.is_symlink() and path.is_dir():
            path = path.resolve()
        remove_stale(path)
        return cls(path)

    def start_empty(self, overwrite: bool) -> None:
        """An empty directory to prepare into. A `neo prep` output there is moved aside if
        overwrite=true; anything else there is refused, naming what it holds."""
        if _only_leftovers(self.path):
            for name in (TOKENIZER_DIR, STATE_DIR):
                shutil.rmtree(self.path / name, ignore_errors=True)
        check_output_free(self.path, overwrite, PREP_OUTPUT)
        if self.path.exists() and any(self.path.iterdir()):
            self.aside = move_aside(self.path)
            log.info(
                "overwrite=true: %s is moved aside to %s until the new one is complete",
                self.path,
                self.aside,
            )
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)

    def finish(self) -> None:
        """The new output is complete: remove its state and the output it replaces."""
        shutil.rmtree(self.path / STATE_DIR, ignore_errors=True)
        if self.aside is not None:
            shutil.rmtree(self.aside)
            self.aside = None

    def undo(self) -> None:
        """Nothing worth keeping was made: remove what this run wrote and put back what it
        replaced, leaving the directory as it was before the run."""
        if self.aside is not None:
            shutil.rmtree(self.path)
            self.aside.rename(self.path)
            self.aside = None
            return
        for name in (TOKENIZER_DIR, STATE_DIR):
            shutil.rmtree(self.path / name, ignore_errors=True)
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def failed(self, committed: bool) -> None:
        """The run stopped (an error, Ctrl-C). With no shard group complete the old output, if
        one was moved aside, comes back; otherwise the new output stays, resumable."""
        if self.aside is None:
            return
        if not committed:
            self.undo()
            return
        log.warning(
            "the output overwrite=true replaces is kept in %s until this one is complete; the "
            "next neo prep of %s removes it",
            self.aside,
            self.path,
        )
