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

``meta`` names the question's origin and how the rejected answer was made. Deterministic: no
randomness but ``random.Random(SEED)``; the source is the bundled file, so any Python version
gives the same bytes. PROVENANCE.md records the file's hash.
"""

from __future__ import annotations

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


def pairs() -> list[dict]:
    records = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines()]
    records = records[:PAIRS]
    rng = random.Random(SEED)
    out = []
    for i, r in enumerate(records):
        if r["input"]:
            raise ValueError(f"{SOURCE}:{i + 1}: an input field; the template has none")
        chosen = r["output"]
        if i % 2 == 0:
            other = records[(i + PAIRS // 2) % len(records)]
            rejected, how = other["output"], f"mismatched: the answer to {other['meta']['origin']}"
        else:
            rejected, how = shuffled_words(chosen, rng), "corrupted: the chosen words shuffled"
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
    write(OUTPUT, pairs())
