"""The evaluation tasks: how each benchmark's published file becomes items, with the prompts,
preprocessing and metrics of lm-evaluation-harness v0.4 (its task YAMLs and utils.py files).

An Item is one document of a task:
- `loglikelihood` (lambada_openai): one (context, continuation) pair; perplexity and acc;
- `multiple_choice`: one pair per choice and the gold index; acc (and acc_norm: the
  log-likelihood divided by the choice's length in characters);
- `rolling`: a whole text scored with the model's full context; word and byte perplexity and
  bits per byte, with words and bytes counted on the original text.
The items of each benchmark are made in train/evals/items.py; `val` (token shards) in
train/evals/val.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.data.records import HUB_PREFIX, BadItem, Record, Skipped, read_records
from train.errors import NotFound
from train.evals.items import (
    Item,
    hellaswag_item,
    lambada_item,
    mathqa_item,
    mc_item,
    piqa_item,
    piqa_records,
    pubmedqa_item,
    pubmedqa_records,
    text_item,
    wikitext_articles,
    wikitext_item,
    winogrande_item,
)

LOGLIKELIHOOD, MULTIPLE_CHOICE, ROLLING, VAL = "loglikelihood", "multiple_choice", "rolling", "val"


@dataclass
class LoadedTask:
    name: str
    kind: str
    metrics: tuple[str, ...]
    items: list[Item]
    fewshot: list[Item] | None  # a separate split to draw examples from; None: the items
    skipped: Skipped
    source: str  # the file (or hub dataset) it was read from
    # val: the documents and tokens of the whole split its items are drawn from
    split_documents: int = 0
    split_tokens: int = 0


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    metrics: tuple[str, ...]
    default_file: str  # its name in data_dir (default data/eval); "" for a user's own data
    expected: str  # the format, for the missing-file message
    source: str  # where the published file is, saved as default_file ("": no published file)
    item: Callable[[Record], Item] | None  # one record -> one item (file tasks)
    hub: str = ""  # hf:NAME of the hub dataset the harness reads
    beside: str = ""  # a second published file the task reads beside the first


SPECS: dict[str, TaskSpec] = {
    "lambada_openai": TaskSpec(
        LOGLIKELIHOOD,
        ("perplexity", "acc"),
        "lambada_openai_test.jsonl",
        'JSON lines {"text": ...} (OpenAI\'s LAMBADA test set, 5,153 lines)',
        "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
        lambada_item,
        hub="hf:EleutherAI/lambada_openai@default",
    ),
    "wikitext": TaskSpec(
        ROLLING,
        ("word_perplexity", "byte_perplexity", "bits_per_byte"),
        "wikitext-2-raw-test.raw",
        'WikiText-2 raw wiki.test.raw, or JSON lines {"page": ...}',
        "wikitext-2-raw/wiki.test.raw of "
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
        wikitext_item,
        hub="hf:EleutherAI/wikitext_document_level@wikitext-2-raw-v1",
    ),
    "pubmedqa": TaskSpec(
        MULTIPLE_CHOICE,
        ("acc",),
        "pubmedqa_ori_pqal.json",
        "PubMedQA PQA-L ori_pqal.json with test_ground_truth.json beside it",
        "https://raw.githubusercontent.com/pubmedqa/pubmedqa/master/data/ori_pqal.json",
        pubmedqa_item,
        beside="test_ground_truth.json (same folder) as pubmedqa_test_ground_truth.json",
    ),
    "hellaswag": TaskSpec(
        MULTIPLE_CHOICE,
        ("acc", "acc_norm"),
        "hellaswag_val.jsonl",
        "JSON lines with ctx_a, ctx_b, activity_label, endings, label",
        "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
        hellaswag_item,
    ),
    "piqa": TaskSpec(
        MULTIPLE_CHOICE,
        ("acc", "acc_norm"),
        "piqa_valid.jsonl",
        "JSON lines with goal, sol1, sol2 (labels in <name>-labels.lst beside it, or label)",
        "https://yonatanbisk.com/piqa/data/valid.jsonl",
        piqa_item,
        beside="valid-labels.lst (same folder) as piqa_valid-labels.lst",
    ),
    "winogrande": TaskSpec(
        MULTIPLE_CHOICE,
        ("acc",),
        "winogrande_dev.jsonl",
        "JSON lines with sentence (one '_'), option1, option2, answer ('1' or '2')",
        "winogrande_1.1/dev.jsonl of "
        "https://storage.googleapis.com/ai2-mosaic/public/winogrande/winogrande_1.1.zip",
        winogrande_item,
    ),
    "mathqa": TaskSpec(
        MULTIPLE_CHOICE,
        ("acc", "acc_norm"),
        "mathqa_test.json",
        "MathQA test.json (a JSON array with Problem, options, correct)",
        "test.json of https://math-qa.github.io/math-QA/data/MathQA.zip",
        mathqa_item,
    ),
    "mc": TaskSpec(
        MULTIPLE_CHOICE,
        ("acc", "acc_norm"),
        "",
        'JSON lines {"query": str, "choices": [str, ...], "gold": int}',
        "",
        mc_item,
    ),
    "text": TaskSpec(
        ROLLING,
        ("word_perplexity", "byte_perplexity", "bits_per_byte"),
        "",
        'JSON lines {"text": ...}, or a .txt file (one document)',
        "",
        text_item,
    ),
    "val": TaskSpec(
        VAL,
        ("loss", "perplexity", "bits_per_byte"),
        "",
        "a `neo prep` output directory, or a corpus file neo prep reads",
        "",
        None,
    ),
}

# The GPT-Neo authors' numbers (EleutherAI/gpt-neo README, "Model Evaluations", measured with
# lm-evaluation-harness): task -> metric -> {model: value}. Pile BPB/PPL are `val` on the Pile.
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "val": {
        "bits_per_byte": {"gpt_neo_1.3b": 0.7527, "gpt_neo_2.7b": 0.7165},
        "perplexity": {"gpt_neo_1.3b": 6.159, "gpt_neo_2.7b": 5.646},
    },
    "wikitext": {
        "word_perplexity": {"gpt_neo_125m": 32.285, "gpt_neo_1.3b": 13.10, "gpt_neo_2.7b": 11.39}
    },
    "lambada_openai": {
        "perplexity": {"gpt_neo_125m": 30.266, "gpt_neo_1.3b": 7.498, "gpt_neo_2.7b": 5.626},
        "acc": {"gpt_neo_125m": 0.3736, "gpt_neo_1.3b": 0.5723, "gpt_neo_2.7b": 0.6222},
    },
    "winogrande": {"acc": {"gpt_neo_125m": 0.5043, "gpt_neo_1.3b": 0.5501, "gpt_neo_2.7b": 0.5650}},
    "hellaswag": {
        "acc_norm": {"gpt_neo_125m": 0.2867, "gpt_neo_1.3b": 0.3866, "gpt_neo_2.7b": 0.4273}
    },
    "mathqa": {"acc": {"gpt_neo_125m": 0.2278, "gpt_neo_1.3b": 0.2405, "gpt_neo_2.7b": 0.2472}},
    "pubmedqa": {"acc": {"gpt_neo_125m": 0.5510, "gpt_neo_1.3b": 0.5440, "gpt_neo_2.7b": 0.5754}},
    "piqa": {"acc": {"gpt_neo_125m": 0.6306, "gpt_neo_1.3b": 0.7111, "gpt_neo_2.7b": 0.7214}},
}


def task_path(name: str, kind: str, path: str | None, data_dir: str) -> str:
    """The file a task reads: task.<name>.path, else the published file in data_dir."""
    spec = SPECS[kind]
    if path:
        return path
    if not spec.default_file:
        raise NotFound(
            f"task {name}: no file given; expected {spec.expected}: set task.{name}.path=FILE"
        )
    return str(Path(data_dir) / spec.default_file)


def missing_file(name: str, task_type: str, path: str) -> NotFound:
    """One line: the task's missing file, its format, and how to put the published file in
    place (neo eval downloads nothing itself)."""
    spec = SPECS[task_type]
    line = f"task {name}: {path} does not exist; expected {spec.expected}"
    if spec.source:
        line += f"; neo eval downloads nothing: save {spec.source} as {path}"
    if spec.beside:
        line += f" and {spec.beside} beside it"
    if spec.hub:
        line += f", or read the hub's copy with task.{name}.path={spec.hub}"
    return NotFound(f"{line}; or set task.{name}.path=FILE (README: Benchmark files)")


def load_task(
    name: str, task_type: str, path: str, strict: bool, split: str | None = None
) -> LoadedTask:
    """The items of a file task (every type but val), bad records skipped and counted."""
    spec = SPECS[task_type]
    if not path.startswith(HUB_PREFIX) and not Path(path).exists():
        raise missing_file(name, task_type, path)
    skipped = Skipped()
    items = _items(spec, task_type, path, split or "test", skipped, strict)
    if not items:
        raise BadItem(
            f"task {name}: {path} holds no usable items"
            + (f" ({skipped.count} bad: {skipped.examples[0]})" if skipped.count else "")
        )
    fewshot = None
    if task_type == "pubmedqa" and path.endswith(".json"):  # PQA-L items outside the test split
        fewshot = _items(spec, task_type, path, "train", Skipped(), False)
    return LoadedTask(name, spec.kind, spec.metrics, items, fewshot, skipped, path)


def _items(
    spec: TaskSpec, task_type: str, path: str, split: str, skipped: Skipped, strict: bool
) -> list[Item]:
    file = None if path.startswith(HUB_PREFIX) else Path(path)
    if task_type == "wikitext" and file and file.suffix in (".raw", ".txt", ".tokens"):
        records: Any = wikitext_articles(file)
    elif task_type == "text" and file and file.suffix == ".txt":
        records = [Record(f"{file}:1", {"text": file.read_text(encoding="utf-8")})]
    elif task_type == "pubmedqa" and file:
        records = pubmedqa_records(file, split, skipped, strict)
    elif task_type == "piqa" and file:
        records = piqa_records(file, skipped, strict)
    else:
        records = read_records(path, skipped, strict, split)
    items = []
    for record in records:
        try:
            item = spec.item(record)
        except BadItem as e:
            skipped.add(str(e), strict)
            continue
        item.index = len(items)
        items.append(item)
    return items
