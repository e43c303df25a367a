"""Build the bundled fine-tuning samples (`neo sft`'s defaults) from openly licensed text that
is on every machine that runs neotrain.

    python data_prep/sample/build_sft.py

writes, next to this file:

- ``sft_instructions.jsonl``: Alpaca-style records ``{"instruction", "input", "output", "meta"}``
  asking what a function or class of the Python standard library does, answered with the first
  paragraph of its docstring ("What does `textwrap.dedent` do?" -> "Remove any common leading
  whitespace from every line in `text`."). Source: the docstrings of the CPython standard
  library running this script (PSF License 2.0; licenses/libpython3.11-stdlib.LICENSE.txt).
- ``sft_classification.jsonl``: ``{"text", "label", "meta"}``: which kind of source a snippet of
  the bundled pretraining sample comes from: code (Github), e-mail (Enron Emails), book
  (Gutenberg), forum (HackerNews); the licences of those texts are the pretraining sample's
  (PROVENANCE.md).

Deterministic for a given Python version: modules in a fixed list, members in sorted order,
seeded sampling and shuffles. PROVENANCE.md records the version the bundled files came from.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import random
import re
import sys
from pathlib import Path

import zstandard

HERE = Path(__file__).parent
SEED = 20261205

MODULES = sorted(
    {
        "abc",
        "argparse",
        "array",
        "ast",
        "base64",
        "binascii",
        "bisect",
        "calendar",
        "cmath",
        "codecs",
        "collections",
        "colorsys",
        "configparser",
        "contextlib",
        "copy",
        "csv",
        "dataclasses",
        "datetime",
        "decimal",
        "difflib",
        "dis",
        "email.utils",
        "enum",
        "filecmp",
        "fnmatch",
        "fractions",
        "functools",
        "gettext",
        "glob",
        "graphlib",
        "gzip",
        "hashlib",
        "heapq",
        "hmac",
        "html",
        "inspect",
        "io",
        "ipaddress",
        "itertools",
        "json",
        "keyword",
        "locale",
        "logging",
        "math",
        "mimetypes",
        "numbers",
        "operator",
        "os",
        "os.path",
        "pathlib",
        "pickle",
        "platform",
        "plistlib",
        "pprint",
        "queue",
        "random",
        "re",
        "reprlib",
        "sched",
        "secrets",
        "shlex",
        "shutil",
        "signal",
        "socket",
        "sqlite3",
        "stat",
        "statistics",
        "string",
        "struct",
        "subprocess",
        "sysconfig",
        "tarfile",
        "tempfile",
        "textwrap",
        "threading",
        "time",
        "timeit",
        "tokenize",
        "traceback",
        "typing",
        "unicodedata",
        "urllib.parse",
        "uuid",
        "warnings",
        "weakref",
        "xml.etree.ElementTree",
        "zipfile",
        "zlib",
        "zoneinfo",
    }
)

QUESTIONS = (
    "What does `{name}` do?",
    "Explain what `{name}` is for.",
    "In Python, what is `{name}`?",
)
SIGNATURE = re.compile(r"^[\w.]+\(.*\)( -> .*)?$")
CLASSES = {
    "Github": "code",
    "Enron Emails": "e-mail",
    "Gutenberg (PG-19)": "book",
    "HackerNews": "forum",
}
SNIPPETS_PER_CLASS = 300
SNIPPET_CHARS = 400


def summary(obj) -> str | None:
    """The docstring's first paragraph, on one line, without leading signature lines."""
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    lines = doc.strip().splitlines()
    while lines and SIGNATURE.match(lines[0].strip()):
        lines.pop(0)
    paragraph = []
    for line in lines:
        if not line.strip():
            if paragraph:
                break
            continue
        paragraph.append(line.strip())
    text = " ".join(paragraph)
    if not 20 <= len(text) <= 400 or text.endswith(":"):
        return None
    return text


def members(module_name: str):
    """(qualified name, object) of the module's own public functions and classes, and of the
    public methods those classes define, in sorted order."""
    module = importlib.import_module(module_name)
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield f"{module_name}.{name}", obj
        elif inspect.isclass(obj):
            yield f"{module_name}.{name}", obj
            for method in sorted(vars(obj)):
                value = vars(obj)[method]
                if not method.startswith("_") and callable(value):
                    yield f"{module_name}.{name}.{method}", value


def instructions() -> list[dict]:
    rng = random.Random(SEED)
    version = sys.version.split()[0]
    seen, records = set(), []
    for module in MODULES:
        for name, obj in members(module):
            text = summary(obj)
            if text is None or text in seen:  # inherited or shared docstrings: once
                continue
            seen.add(text)
            records.append(
                {
                    "instruction": rng.choice(QUESTIONS).format(name=name),
                    "input": "",
                    "output": text,
                    "meta": {
                        "origin": f"Python {version} standard library: {name}",
                        "license": "PSF-2.0",
                    },
                }
            )
    rng.shuffle(records)
    return records


def classification() -> list[dict]:
    rng = random.Random(SEED + 1)
    by_label: dict[str, list[tuple[str, str]]] = {label: [] for label in CLASSES.values()}
    with zstandard.open(HERE / "pile_sample.jsonl.zst", "rb") as f:
        for line in io.TextIOWrapper(f, encoding="utf-8"):
            doc = json.loads(line)
            label = CLASSES.get(doc["meta"]["pile_set_name"])
            if label and len(doc["text"]) > SNIPPET_CHARS:
                by_label[label].append((doc["text"], doc["meta"]["origin"]))
    records = []
    for label, docs in by_label.items():
        for _ in range(SNIPPETS_PER_CLASS):
            text, origin = rng.choice(docs)
            start = rng.randrange(len(text) - SNIPPET_CHARS)
            snippet = " ".join(text[start : start + SNIPPET_CHARS].split()[1:-1])
            records.append(
                {"text": snippet, "label": label, "meta": {"origin": origin, "offset": start}}
            )
    rng.shuffle(records)
    return records


def write(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)
    print(f"wrote {path}: {len(records)} records")


if __name__ == "__main__":
    write(HERE / "sft_instructions.jsonl", instructions())
    write(HERE / "sft_classification.jsonl", classification())
