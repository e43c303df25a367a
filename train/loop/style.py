"""Whether greedy answers move towards the chosen style: `neo dpo`'s validation compares the
model's greedy answer to each held-out prompt with that pair's chosen and rejected response
(train/loop/evaluators.py AnswerStyle; pure Python here, so it is tested on constructed text).

The measure is ROUGE-L (Lin 2004): the F-measure of the longest common subsequence of words,
lower-cased word characters as rouge-score's default tokenizer keeps them. It is
order-sensitive on purpose: a rejected response may hold the chosen one's words shuffled (the
bundled pairs do), and a bag-of-words overlap could not tell the two apart. An answer is closer
to the chosen response when its ROUGE-L with it is higher than with the rejected one; ties
(both 0, say) count for neither side.

Next to it, the share of answers that loop: that repeat a run of three words (a word trigram
occurs twice), the way a small model's greedy decoding degenerates ("is a tuple is a tuple",
"the the the"), or as a DPO that went wrong makes it ("Return theReturn theReturn the"). Of the
bundled pairs' chosen responses 2.5% do so: it is a style the answers can move towards or away
from (`build_dpo.py --looping FILE` writes pairs a third of whose rejected responses loop).

What it shows: how much of each response's wording, in its order, the answer reproduces. What
it cannot show: meaning (a paraphrase of the chosen answer scores low), fluency beyond word
order, or anything about prompts that were not held out; with few pairs it is coarse (one pair
of 40 is 0.025).
"""

from __future__ import annotations

import re

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def common_subsequence(a: list[str], b: list[str]) -> int:
    """The length of the longest common subsequence of a and b (dynamic programming, one row)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], (diagonal + 1 if x == y else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(answer: list[str], reference: list[str]) -> float:
    """ROUGE-L's F-measure (precision and recall weighted alike): 2 LCS / (|answer| + |ref|)."""
    if not answer or not reference:
        return 0.0
    return 2 * common_subsequence(answer, reference) / (len(answer) + len(reference))


def loops(text: str, n: int = 3) -> bool:
    """Whether some run of n words occurs twice in `text` (overlapping runs count)."""
    w = words(text)
    runs = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return len(runs) != len(set(runs))


def style_metrics(answers: list[str], chosen: list[str], rejected: list[str]) -> dict[str, float]:
    """Over the pairs: the share of answers closer to the chosen response than to the rejected
    one, the share closer to the rejected one, their mean ROUGE-L with each, the share of
    distinct answers (a model that answers everything alike cannot be closer to many), and the
    share that loop."""
    n = len(answers)
    to_chosen = [rouge_l(words(a), words(c)) for a, c in zip(answers, chosen, strict=True)]
    to_rejected = [rouge_l(words(a), words(r)) for a, r in zip(answers, rejected, strict=True)]
    pairs = list(zip(to_chosen, to_rejected, strict=True))
    return {
        "closer_to_chosen": sum(c > r for c, r in pairs) / n,
        "closer_to_rejected": sum(r > c for c, r in pairs) / n,
        "rouge_l_chosen": sum(to_chosen) / n,
        "rouge_l_rejected": sum(to_rejected) / n,
        "distinct": len(set(answers)) / n,
        "loops": sum(map(loops, answers)) / n,
    }
