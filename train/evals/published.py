"""Which of the GPT-Neo authors' numbers (train/evals/tasks.py PUBLISHED) a result may stand
beside. They measured every benchmark zero-shot, and `val`'s bits per byte and perplexity on
the Pile's validation set (perplexity per GPT-2 token). A few-shot run, or a validation split
of other data (a user's own corpus, the bundled sample), has no published number to compare
with: the table and results.json leave them out, and a note says why.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.manifest import MANIFEST_FILE
from train.evals.runner import TaskResult
from train.evals.tasks import PUBLISHED, VAL

# The Pile's validation set, as EleutherAI publishes it (the-eye.eu/public/AI/pile/).
PILE_VALIDATION_FILES = ("val.jsonl.zst", "val.jsonl")


def references(result: TaskResult, tokenizer: str) -> dict[str, dict[str, float]]:
    """metric -> {model: value} of the published numbers comparable with `result`."""
    numbers = PUBLISHED.get(result.name, {})
    if result.num_fewshot:
        return {}
    if result.kind != VAL:
        return numbers
    if not pile_validation(result.source):
        return {}
    # bits per byte do not depend on the tokenizer; perplexity is per token, GPT-2's.
    return {m: v for m, v in numbers.items() if m != "perplexity" or tokenizer == "gpt2"}


def left_out(result: TaskResult, tokenizer: str) -> str | None:
    """One line for a result whose published numbers are left out, else None."""
    if result.name not in PUBLISHED or references(result, tokenizer):
        return None
    if result.num_fewshot:
        return f"{result.name}: the published GPT-Neo numbers are zero-shot, not shown"
    return (
        f"{result.name}: the published GPT-Neo numbers are on the Pile's validation set "
        f"({PILE_VALIDATION_FILES[0]}); {result.source} is other data, so none are shown"
    )


def pile_validation(source: str) -> bool:
    """Whether `val` read the Pile's validation set: its published file, or a `neo prep`
    directory made from that file alone."""
    path = Path(source)
    manifest = path / MANIFEST_FILE
    if manifest.is_file():
        inputs = json.loads(manifest.read_text()).get("inputs") or []
        return len(inputs) == 1 and Path(inputs[0]["path"]).name in PILE_VALIDATION_FILES
    return path.name in PILE_VALIDATION_FILES
