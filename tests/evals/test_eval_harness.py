"""`neo eval` against lm-evaluation-harness itself (`lm_eval --model hf`, offline) on the same
small trained model and the same real files: per-item log-likelihoods within 1e-4, accuracies
equal, perplexities within 1e-4 relative."""

import json
import math
import subprocess

import pytest

from tests.conftest import NEO, SHARED_EVAL, needs_shared_eval
from train.data.records import Skipped
from train.evals.harness import run_harness, write_task
from train.evals.items import pubmedqa_records, wikitext_articles

pytestmark = [pytest.mark.slow, needs_shared_eval]

LAMBADA_ITEMS, WIKITEXT_ARTICLES, PUBMEDQA_ITEMS = 300, 3, 500


@pytest.fixture(scope="module")
def both(trained_gpt2_model, tmp_path_factory):
    """The harness's and neo eval's results and samples on the same files."""
    work = tmp_path_factory.mktemp("harness")
    lambada = (SHARED_EVAL / "lambada_openai_test.jsonl").read_text().splitlines()[:LAMBADA_ITEMS]
    lambada_file = work / "lambada.jsonl"
    lambada_file.write_text("\n".join(lambada) + "\n")
    articles = [r.value for r in wikitext_articles(SHARED_EVAL / "wikitext-2-raw-test.raw")]
    pubmedqa = [
        {k: r.value[k] for k in ("QUESTION", "CONTEXTS", "final_decision")}
        for r in pubmedqa_records(SHARED_EVAL / "pubmedqa_ori_pqal.json", "test", Skipped(), True)
    ]
    wikitext_file = work / "wikitext.jsonl"  # the hub's document-level form: {"page": ...}
    wikitext_file.write_text("".join(json.dumps(a) + "\n" for a in articles[:WIKITEXT_ARTICLES]))
    mc = [
        {"query": f"Question: what comes after {w}?\nAnswer:", "choices": c, "gold": g}
        for w, c, g in [
            ("one", ["two", "three", "the end of the world"], 0),
            ("Monday", ["Sunday", "Tuesday"], 1),
            ("red", ["orange light", "blue", "green"], 2),
            ("the", ["cat", "of", "and", "a"], 3),
        ]
    ]
    mc_file = work / "mc.jsonl"
    mc_file.write_text("".join(json.dumps(r) + "\n" for r in mc))
    tasks_dir = work / "tasks"
    names = [
        write_task(tasks_dir, "lambada_openai", [json.loads(x) for x in lambada], "lambada"),
        write_task(tasks_dir, "wikitext", articles[:WIKITEXT_ARTICLES], "wikitext"),
        write_task(tasks_dir, "pubmedqa", pubmedqa[:PUBMEDQA_ITEMS], "pubmedqa"),
        write_task(tasks_dir, "mc", mc, "mc"),
    ]
    harness = run_harness(trained_gpt2_model / "hf", tasks_dir, names, work / "harness_out")

    # Through the command, on the neotrain checkpoint (the harness reads its export).
    ours = {}
    out = work / "neo_out"
    subprocess.run(
        [
            NEO,
            "eval",
            f"checkpoint={trained_gpt2_model / 'ckpt'}",
            "tasks=[lambada_openai,wikitext,pubmedqa,mine]",
            f"task.lambada_openai.path={lambada_file}",
            f"task.wikitext.path={wikitext_file}",
            f"data_dir={SHARED_EVAL}",
            f"+task.mine={{type: mc, path: {mc_file}}}",
            f"output={out}",
            "log_samples=true",
            "batch_tokens=2048",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=work,
    )
    results = json.loads((out / "results.json").read_text())["results"]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    for task in ("lambada_openai", "wikitext", "pubmedqa", "mine"):
        ours[task] = {
            "metrics": results[task]["metrics"],
            "samples": [s for s in samples if s["task"] == task],
        }
    return harness, ours


def _by_doc(samples):
    return sorted(samples, key=lambda s: s["doc_id"])


def test_lambada_matches_harness_item_by_item(both):
    harness, ours = both
    theirs = _by_doc(harness["samples"]["neo_lambada"])
    mine = ours["lambada_openai"]["samples"]
    assert len(theirs) == len(mine) == LAMBADA_ITEMS
    for t, m in zip(theirs, mine, strict=True):
        ll, greedy = t["filtered_resps"][0]
        assert m["logprobs"][0] == pytest.approx(float(ll), abs=1e-4)
        assert m["greedy"][0] == (greedy == "True")
    result = harness["results"]["neo_lambada"]
    assert ours["lambada_openai"]["metrics"]["acc"] == result["acc,none"]
    assert ours["lambada_openai"]["metrics"]["perplexity"] == pytest.approx(
        result["perplexity,none"], rel=1e-4
    )


def test_wikitext_matches_harness(both):
    harness, ours = both
    theirs = _by_doc(harness["samples"]["neo_wikitext"])
    mine = ours["wikitext"]["samples"]
    assert len(theirs) == len(mine) == WIKITEXT_ARTICLES
    for t, m in zip(theirs, mine, strict=True):
        assert m["logprob"] == pytest.approx(float(t["filtered_resps"][0]), rel=1e-6, abs=1e-4)
    result = harness["results"]["neo_wikitext"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["wikitext"]["metrics"][metric] == pytest.approx(
            result[f"{metric},none"], rel=1e-4
        )


@pytest.mark.parametrize("task, theirs_name", [("pubmedqa", "neo_pubmedqa"), ("mine", "neo_mc")])
def test_multiple_choice_matches_harness(both, task, theirs_name):
    harness, ours = both
    theirs = _by_doc(harness["samples"][theirs_name])
    mine = ours[task]["samples"]
    assert len(theirs) == len(mine)
    for t, m in zip(theirs, mine, strict=True):
        lls = [float(ll) for ll, _ in t["filtered_resps"]]
        assert m["logprobs"] == pytest.approx(lls, abs=1e-4)
    result = harness["results"][theirs_name]
    for metric, value in ours[task]["metrics"].items():
        assert value == result[f"{metric},none"], metric
    assert not math.isnan(ours[task]["metrics"]["acc"])
