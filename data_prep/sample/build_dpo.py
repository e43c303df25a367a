"""Build the bundled preference sample (`neo dpo`'s default data) from the bundled instruction
sample, so that it needs nothing but this repository.

    python data_prep/sample/build_dpo.py

writes ``dpo_pairs.jsonl`` next to this file: TRL's explicit-prompt form
``{"prompt", "chosen", "rejected", "meta"}``, one pair per record of the first ``PAIRS`` records
of ``sft_instructions.jsonl``:

- ``prompt``: the instruction in Stanford Alpaca's prompt (the template `neo sft` trains the
  demo model on, so `neo dpo` continues from the SFT model in the form it knows);
- ``chosen``: the record's answer (the first paragraph of the docstring it asks about);
- ``rejected``: alternately a mismatched answer (the answer of the record ``PAIRS // 2`` places
  further on, a docstring of another object) and a corrupted one (the chosen answer's words in
  a seeded random order).

    python data_prep/sample/build_dpo.py --looping FILE

writes to FILE (not bundled) a set whose rejected responses are in turn mismatched, shuffled
and looping: the chosen answer's opening words, then a run of one to three of its words over
and over, as a small model's greedy decoding degenerates ("is a tuple is a tuple is a"), a
style that, unlike the other two, a model's own answers show (README `neo dpo` measures what
DPO on it does: it can cure the loops of a base that loops, and teach them to one that did not).

``meta`` names the question's origin and how the rejected answer was made. Deterministic: no
randomness but ``random.Random(SEED)``; the source is the bundled file, so any Python version
gives the same bytes. PROVENANCE.md records the file's hash.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from data_prep.sample.build_sft import write

HERE = Path(__file__).parent
SOURCE = HERE / "sft_instructions.jsonl"
OUTPUT = HERE / "dpo_pairs.jsonl"
SEED = 20261206
PAIRS = 400

# Stanford Alpaca's prompt without an input, as train/data/sft.py renders it for `neo sft`
# (data_prep imports nothing from train/; tests/data/test_preference.py checks they agree).
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def shuffled_words(text: str, rng: random.Random) -> str:
    """The words of `text` in another order (a few tries; the last one kept if all match)."""
    words = text.split()
    out = words[:]
    for _ in range(10):
        rng.shuffle(out)
        if out != words:
            break
    return " ".join(out)


def looping(text: str, rng: random.Random) -> str:
    """`text`'s opening words, then a run of its next one to three words repeated: as long as
    `text`, and at least three times the run (answers of three words or fewer: shuffled)."""
    words = text.split()
    if len(words) <= 3:
        return shuffled_words(text, rng)
    start = rng.randrange(1, len(words) // 2)
    run = words[start : start + rng.randint(1, 3)]
    out = words[:start] + run * (len(words) // len(run) + 3)
    return " ".join(out[: max(len(words), start + 3 * len(run))])


def pairs(looping_kind: bool = False) -> list[dict]:
    """The bundled pairs; `looping_kind`: the three-kind set instead."""
    records = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines()]
    records = records[:PAIRS]
    rng = random.Random(SEED)
    out = []
    for i, r in enumerate(records):
        if r["input"]:
            raise ValueError(f"{SOURCE}:{i + 1}: an input field; the template has none")
        chosen = r["output"]
        kind = i % 3 if looping_kind else i % 2
        if kind == 0:
            other = records[(i + PAIRS // 2) % len(records)]
            rejected, how = other["output"], f"mismatched: the answer to {other['meta']['origin']}"
        elif kind == 1:
            rejected, how = shuffled_words(chosen, rng), "corrupted: the chosen words shuffled"
        else:
            rejected, how = looping(chosen, rng), "corrupted: the chosen words looping"
        if rejected == chosen:  # one-word answers, duplicate docstrings: no preference to learn
            continue
        out.append(
            {
                "prompt": ALPACA_PROMPT_NO_INPUT.format(instruction=r["instruction"]),
                "chosen": chosen,
                "rejected": rejected,
                "meta": {"origin": r["meta"]["origin"], "rejected": how, "license": "PSF-2.0"},
            }
        )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--looping", type=Path, metavar="FILE", help="the three-kind set, to FILE")
    args = parser.parse_args()
    if args.looping:
        write(args.looping, pairs(looping_kind=True))
    else:
        write(OUTPUT, pairs())
