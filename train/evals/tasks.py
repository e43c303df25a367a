"""The evaluation tasks: how each benchmark's published file becomes items, with the prompts,
preprocessing and metrics of lm-evaluation-harness v0.4 (its task YAMLs and utils.py files).

An Item is one document of a task:
- `loglikelihood` (lambada_openai): one (context, continuation) pair; perplexity and acc;
- `multiple_choice`: one pair per choice and the gold index; acc (and acc_norm: the
  log-likelihood divided by the choice's length in characters);
- `rolling`: a whole text scored with the model's full context; word and byte perplexity and
  bits per byte, with words and bytes counted on the original text.
`val` (token shards) is in train/evals/val.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.data.records import (
    HUB_PREFIX,
    BadItem,
    Record,
    Skipped,
    check_choices,
    gold_index,
    missing_file,
    read_records,
    require,
)
from train.errors import NotFound

LOGLIKELIHOOD, MULTIPLE_CHOICE, ROLLING, VAL = "loglikelihood", "multiple_choice", "rolling", "val"


@dataclass
class Item:
    index: int  # position among the task's items, before `limit`
    where: str  # file:line of its record
    # loglikelihood / multiple_choice: (context, continuation) per choice (no few-shot prefix)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    gold: int = 0
    # Texts whose lengths acc_norm divides by (the harness: the choices, without delimiter).
    choice_texts: list[str] = field(default_factory=list)
    # How the item reads as a solved few-shot example (the harness's q + delimiter + answer).
    solved: str = ""
    # rolling: the text scored, and the words and UTF-8 bytes of the original text
    text: str = ""
    words: int = 0
    bytes: int = 0
    # val: the document's tokens (already tokenized) and its source
    tokens: list[int] | None = None
    source: str = ""


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
    default_file: str  # in data_dir (../shared/eval); "" when no public copy is bundled
    expected: str  # the format, for the missing-file message
    published: str  # where the file is published
    item: Callable[[Record], Item] | None  # one record -> one item (file tasks)
    hub: str = ""  # hf:NAME of the hub dataset the harness reads


# ---------------------------------------------------------------------------------------------
# Item builders, one per task format (prompts as in the harness's YAML for the task)


def lambada_item(record: Record) -> Item:
    text = require(record, "text", str, "a string")
    context, _, word = text.rpartition(" ")
    if not word or not context:
        raise BadItem(f"{record.where}: 'text' needs at least two space-separated words")
    return Item(0, record.where, pairs=[(context, " " + word)], solved=context + " " + word)


def wikitext_item(record: Record) -> Item:
    page = require(record, "page", str, "a string (one article)")
    return rolling_item(record.where, page, wikitext_detokenize(page))


def text_item(record: Record) -> Item:
    text = require(record, "text", str, "a string")
    return rolling_item(record.where, text, text)


def rolling_item(where: str, original: str, text: str) -> Item:
    return Item(
        0,
        where,
        text=text,
        words=len(re.split(r"\s+", original)),
        bytes=len(original.encode("utf-8")),
    )


def pubmedqa_item(record: Record) -> Item:
    contexts = require(record, "CONTEXTS", list, "a list of abstract paragraphs")
    if not all(isinstance(c, str) for c in contexts):
        raise BadItem(f"{record.where}: every entry of 'CONTEXTS' must be a string")
    question = require(record, "QUESTION", str, "a string")
    answer = require(record, "final_decision", str, "yes, no or maybe")
    choices = ["yes", "no", "maybe"]
    if answer not in choices:
        raise BadItem(f"{record.where}: final_decision={answer!r} is not yes, no or maybe")
    query = "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(contexts), question)
    return choice_item(record, query, choices, choices.index(answer))


def hellaswag_item(record: Record) -> Item:
    ctx = (
        require(record, "ctx_a", str, "a string")
        + " "
        + require(record, "ctx_b", str, "a string").capitalize()
    )
    label = require(record, "activity_label", str, "a string")
    endings = check_choices(record, record.value.get("endings"), "endings")
    query = _hellaswag_clean(label + ": " + ctx)
    choices = [_hellaswag_clean(e) for e in endings]
    gold = gold_index(record, record.value.get("label"), len(choices), "label")
    return choice_item(record, query, choices, gold)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def piqa_item(record: Record) -> Item:
    goal = require(record, "goal", str, "a string")
    choices = [require(record, "sol1", str, "a string"), require(record, "sol2", str, "a string")]
    gold = gold_index(record, record.value.get("label"), 2, "label")
    return choice_item(record, f"Question: {goal}\nAnswer:", choices, gold)


def winogrande_item(record: Record) -> Item:
    """Partial scoring: each option fills the blank of the context, and the continuation after
    the blank is scored given it."""
    sentence = require(record, "sentence", str, "a string with one '_'")
    if "_" not in sentence:
        raise BadItem(f"{record.where}: 'sentence' has no '_' blank")
    options = [require(record, k, str, "a string") for k in ("option1", "option2")]
    gold = gold_index(record, record.value.get("answer"), 2, "answer", base=1)
    blank = sentence.index("_")
    target = sentence[blank + 1 :].strip()
    contexts = [sentence[:blank] + option for option in options]
    return Item(
        0,
        record.where,
        pairs=[(c, " " + target) for c in contexts],
        gold=gold,
        choice_texts=contexts,
        solved=contexts[gold] + " " + target,
    )


MATHQA_OPTION = re.compile(r"[abcd] \) .*?, |e \) .*?$")


def mathqa_item(record: Record) -> Item:
    problem = require(record, "Problem", str, "a string")
    options = require(record, "options", str, "a string like 'a ) 1 , b ) 2 , ...'")
    choices = [c[4:].rstrip(" ,") for c in MATHQA_OPTION.findall(options)]
    if not choices:
        raise BadItem(f"{record.where}: 'options'={options!r} has no 'a ) ...' choices")
    correct = require(record, "correct", str, "one of a, b, c, d, e")
    if correct not in "abcde"[: len(choices)] or len(correct) != 1:
        raise BadItem(f"{record.where}: correct={correct!r} is not one of {len(choices)} choices")
    return choice_item(record, f"Question: {problem}\nAnswer:", choices, "abcde".index(correct))


def mc_item(record: Record) -> Item:
    """The generic format: {"query": str, "choices": [str, ...], "gold": int}."""
    query = require(record, "query", str, "a string")
    choices = check_choices(record, record.value.get("choices"))
    gold = record.value.get("gold")
    if not isinstance(gold, int) or isinstance(gold, bool):
        raise BadItem(f"{record.where}: 'gold' must be an integer index into 'choices'")
    return choice_item(record, query, choices, gold_index(record, gold, len(choices), "gold"))


def choice_item(record: Record, query: str, choices: list[str], gold: int, delimiter=" ") -> Item:
    return Item(
        0,
        record.where,
        pairs=[(query, delimiter + c) for c in choices],
        gold=gold,
        choice_texts=choices,
        solved=query + delimiter + choices[gold],
    )


def wikitext_detokenize(text: str) -> str:
    """WikiText's tokenized spacing undone, as the harness's wikitext task does before
    scoring (its preprocess_wikitext.py)."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for spaced, joined in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        text = text.replace(spaced, joined)
    for mark in ":;.!?,":
        text = text.replace(f" {mark} ", f"{mark} ")
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for spaced, joined in (("= = = =", "===="), ("= = =", "==="), ("= =", "==")):
        text = text.replace(spaced, joined)
    text = text.replace(" " + chr(176) + " ", chr(176))
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    return text.replace(" N ", " 1 ").replace(" 's", "'s")


def wikitext_articles(path: Path) -> Iterator[Record]:
    """The articles of a raw WikiText file (wiki.test.raw), split as the hub's
    wikitext_document_level dataset splits them: a new article at every top-level heading
    line ` = Title = `. Read in text mode, so CRLF files give the same articles."""
    lines = path.read_text(encoding="utf-8").split("\n")
    page: list[str] = []
    start = 1
    for n, line in enumerate(lines, start=1):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            text = "\n".join(page)
            if text.strip():
                yield Record(f"{path}:{start}", {"page": text})
            page, start = [], n
        page.append(line)
    yield Record(f"{path}:{start}", {"page": "\n".join(page)})


def pubmedqa_records(path: Path, split: str, skipped: Skipped, strict: bool) -> Iterator[Record]:
    """PQA-L (ori_pqal.json, keyed by PMID) restricted to the test PMIDs of
    test_ground_truth.json beside it (split=test), or to the others (split=train). A JSON
    lines file of records in the same fields is read as it is."""
    records = read_records(str(path), skipped, strict)
    if path.suffix != ".json":
        yield from records
        return
    truth = _pubmedqa_test_ids(path)
    for record in records:
        if (str(record.value["_key"]) in truth) == (split == "test"):
            yield record


def _pubmedqa_test_ids(path: Path) -> set[str]:
    import json

    for name in ("pubmedqa_test_ground_truth.json", "test_ground_truth.json"):
        file = path.with_name(name)
        if file.is_file():
            return set(json.loads(file.read_text()))
    raise NotFound(
        f"task pubmedqa: {path.parent} has no test_ground_truth.json (or "
        "pubmedqa_test_ground_truth.json) naming the 500 test PMIDs; it is published beside "
        "ori_pqal.json at github.com/pubmedqa/pubmedqa data/"
    )


def piqa_records(path: Path, skipped: Skipped, strict: bool) -> Iterator[Record]:
    """PIQA's published form: valid.jsonl with the labels, one per line, in valid-labels.lst
    beside it; or records carrying their own `label`."""
    labels_file = path.with_name(path.stem + "-labels.lst")
    labels = labels_file.read_text().split() if labels_file.is_file() else None
    for i, record in enumerate(read_records(str(path), skipped, strict)):
        if labels is not None:
            if i >= len(labels):
                raise BadItem(f"{labels_file}: {len(labels)} labels, fewer than the records")
            record.value["label"] = labels[i]
        yield record


SPECS: dict[str, TaskSpec] = {
    "lambada_openai": TaskSpec(
        LOGLIKELIHOOD,
        ("perplexity", "acc"),
        "lambada_openai_test.jsonl",
        'JSON lines {"text": ...} (OpenAI\'s LAMBADA test set, 5,153 lines)',
        "github.com/openai/gpt-2 (lambada_test.jsonl); hub: EleutherAI/lambada_openai",
        lambada_item,
        hub="hf:EleutherAI/lambada_openai@default",
    ),
    "wikitext": TaskSpec(
        ROLLING,
        ("word_perplexity", "byte_perplexity", "bits_per_byte"),
        "wikitext-2-raw-test.raw",
        'WikiText-2 raw wiki.test.raw, or JSON lines {"page": ...}',
        "the wikitext-2-raw-v1 zip (Salesforce); hub: EleutherAI/wikitext_document_level",
        wikitext_item,
        hub="hf:EleutherAI/wikitext_document_level@wikitext-2-raw-v1",
    ),
    "pubmedqa": TaskSpec(
        MULTIPLE_CHOICE,
        ("acc",),
        "pubmedqa_ori_pqal.json",
        "PubMedQA PQA-L ori_pqal.json with test_ground_truth.json beside it",
        "github.com/pubmedqa/pubmedqa data/",
        pubmedqa_item,
    ),
    "hellaswag": TaskSpec(
        MULTIPLE_CHOICE,
        ("acc", "acc_norm"),
        "hellaswag_val.jsonl",
        "JSON lines with ctx_a, ctx_b, activity_label, endings, label",
        "github.com/rowanz/hellaswag data/hellaswag_val.jsonl; hub: Rowan/hellaswag",
        hellaswag_item,
    ),
    "piqa": TaskSpec(
        MULTIPLE_CHOICE,
        ("acc", "acc_norm"),
        "piqa_valid.jsonl",
        "JSON lines with goal, sol1, sol2 (labels in <name>-labels.lst beside it, or label)",
        "yonatanbisk.com/piqa (valid.jsonl, valid-labels.lst)",
        piqa_item,
    ),
    "winogrande": TaskSpec(
        MULTIPLE_CHOICE,
        ("acc",),
        "winogrande_dev.jsonl",
        "JSON lines with sentence (one '_'), option1, option2, answer ('1' or '2')",
        "github.com/allenai/winogrande (winogrande_1.1.zip, dev.jsonl)",
        winogrande_item,
    ),
    "mathqa": TaskSpec(
        MULTIPLE_CHOICE,
        ("acc", "acc_norm"),
        "mathqa_test.json",
        "MathQA test.json (a JSON array with Problem, options, correct)",
        "math-qa.github.io (MathQA.zip)",
        mathqa_item,
    ),
    "mc": TaskSpec(
        MULTIPLE_CHOICE,
        ("acc", "acc_norm"),
        "",
        'JSON lines {"query": str, "choices": [str, ...], "gold": int}',
        "your own data",
        mc_item,
    ),
    "text": TaskSpec(
        ROLLING,
        ("word_perplexity", "byte_perplexity", "bits_per_byte"),
        "",
        'JSON lines {"text": ...}, or a .txt file (one document)',
        "your own data",
        text_item,
    ),
    "val": TaskSpec(
        VAL,
        ("loss", "perplexity", "bits_per_byte"),
        "",
        "a `neo prep` output directory, or a corpus file neo prep reads",
        "neo prep",
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


def load_task(
    name: str, task_type: str, path: str, strict: bool, split: str | None = None
) -> LoadedTask:
    """The items of a file task (every type but val), bad records skipped and counted."""
    spec = SPECS[task_type]
    if not path.startswith(HUB_PREFIX) and not Path(path).exists():
        raise missing_file(name, path, spec.expected, spec.published)
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
