"""The measure behind neo dpo's `val/answers/...` (train/loop/style.py), on constructed text:
not whether a model learns, but that the measure says what it claims."""

import itertools
import random

import pytest

from train.loop.style import common_subsequence, loops, rouge_l, style_metrics, words

CHOSEN = "Return the number of items in a container."
SHUFFLED = "container. a items Return in of number the"  # the same words, another order


def longest_by_brute_force(a: list[str], b: list[str]) -> int:
    for n in range(min(len(a), len(b)), 0, -1):
        subsequences = {s for s in itertools.combinations(a, n)}
        if any(s in subsequences for s in itertools.combinations(b, n)):
            return n
    return 0


def test_the_longest_common_subsequence_is_the_brute_force_one():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert common_subsequence(a, b) == longest_by_brute_force(a, b), (a, b)


def test_rouge_l_is_the_f_measure_of_the_common_subsequence_over_lower_cased_words():
    assert words("Return the String, twice!") == ["return", "the", "string", "twice"]
    # lcs("a b c d", "b d a") = 2 ("b d"): 2 * 2 / (4 + 3)
    assert rouge_l(["a", "b", "c", "d"], ["b", "d", "a"]) == pytest.approx(4 / 7)
    assert rouge_l(words(CHOSEN), words(CHOSEN.upper())) == 1.0
    assert rouge_l([], words(CHOSEN)) == rouge_l(words(CHOSEN), []) == 0.0


def test_word_order_tells_the_chosen_answer_from_its_shuffled_words():
    """A bag of words could not: the shuffled response has exactly the chosen one's words."""
    assert sorted(words(SHUFFLED)) == sorted(words(CHOSEN))
    assert rouge_l(words(CHOSEN), words(CHOSEN)) > rouge_l(words(CHOSEN), words(SHUFFLED))
    assert rouge_l(words(SHUFFLED), words(SHUFFLED)) > rouge_l(words(SHUFFLED), words(CHOSEN))


def test_the_shares_count_each_side_ties_for_neither_and_distinct_answers():
    other = "Remove any common leading whitespace from every line."
    answers = [
        CHOSEN,  # the chosen response itself: closer to it
        "Return the number of things in a box.",  # the chosen wording, partly: closer to it
        SHUFFLED,  # the rejected response: closer to it
        "Bananas are yellow.",  # nothing in common with either: a tie, for neither
        "Bananas are yellow.",
    ]
    chosen = [CHOSEN, CHOSEN, CHOSEN, CHOSEN, other]
    rejected = [SHUFFLED, other, SHUFFLED, other, CHOSEN]
    metrics = style_metrics(answers, chosen, rejected)
    assert metrics["closer_to_chosen"] == 2 / 5
    assert metrics["closer_to_rejected"] == 1 / 5
    assert metrics["distinct"] == 4 / 5
    to_chosen = [rouge_l(words(a), words(c)) for a, c in zip(answers, chosen, strict=True)]
    to_rejected = [rouge_l(words(a), words(r)) for a, r in zip(answers, rejected, strict=True)]
    assert to_chosen[0] == 1.0 and to_rejected[2] == 1.0 and to_chosen[3] == to_rejected[3] == 0
    assert metrics["rouge_l_chosen"] == pytest.approx(sum(to_chosen) / 5)
    assert metrics["rouge_l_rejected"] == pytest.approx(sum(to_rejected) / 5)


def test_one_answer_for_every_prompt_is_closer_only_where_it_happens_to_match():
    """A model that answers everything alike: the measure credits it only for the pairs whose
    chosen response that one answer resembles more than their rejected one."""
    answer = "Return the string."
    chosen = ["Return the string.", "Return a list of words.", "Sort the list."]
    rejected = ["string. the Return", "Return the string of words.", "Split a string."]
    metrics = style_metrics([answer] * 3, chosen, rejected)
    assert metrics["closer_to_chosen"] == 1 / 3  # the first
    assert metrics["closer_to_rejected"] == 1 / 3  # the second; the third: one word each, a tie
    assert metrics["distinct"] == 1 / 3


def test_rouge_l_equals_rouge_scores_on_ascii_text():
    """The reference implementation (Google's rouge-score, installed with lm-eval): its default
    tokenizer keeps [a-z0-9] runs, which is `\\w+` on ASCII text without underscores."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rng = random.Random(1)
    vocabulary = ["Return", "the", "string", "list,", "of", "words.", "a", "Sort", "3", "x2"]
    for _ in range(200):
        answer = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 12)))
        reference = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 12)))
        expected = scorer.score(reference, answer)["rougeL"].fmeasure
        assert rouge_l(words(answer), words(reference)) == pytest.approx(expected, abs=1e-12)


def test_an_answer_loops_when_a_run_of_three_words_comes_twice():
    """Greedy decoding's degenerate answers (as a small model's were) loop; the docstrings they
    answer for rarely do, even where a word or a pair of words comes back."""
    assert loops("Return True if the argument is a tuple is a tuple is a NaN.")
    assert loops("Return True the the the the new path.")  # "the the the", overlapping
    assert loops("Return the name. Return the name.")
    assert not loops("Return the number of items in a container.")
    assert not loops("Return the path of the path for the file.")  # a pair of words twice
    assert not loops("") and not loops("the the")
    answers = ["a b c a b c", "a b c d", "x x x x"]
    assert style_metrics(answers, ["a"] * 3, ["b"] * 3)["loops"] == 2 / 3
