"""Each benchmark's published file -> items, with the prompts and preprocessing of
lm-evaluation-harness v0.4 (its task YAMLs and utils.py files). An Item is one document of a
task (train/evals/tasks.py says which kind each task is and how it is scored)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from train.data.records import (
    BadItem,
    Record,
    Skipped,
    check_choices,
    gold_index,
    read_records,
    require,
)
from train.errors import NotFound


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
