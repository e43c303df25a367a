"""`neo eval` against lm-evaluation-harness (`--model hf`) on the same exported model and the
same items, side by side, on CPU, in one process each after the model is loaded.

    python bench/eval.py [--lambada 5153] [--pubmedqa 500] [--mc 1000] [--batch-size 16]

Model: GPT-Neo layout, 4 layers, hidden 256, 4 heads, global/local (window 256), context
2048, GPT-2 vocabulary, random weights (seeded), exported with `neo export`; fp32.
Tasks: LAMBADA (OpenAI) from ../shared/eval (all 5,153 items by default), PubMedQA's real
500-item test split (one-token choices), and a multiple-choice file with multi-token choices
sharing one context (a generic `mc` task, 4 choices of 3-8 words after a 40-word context).

Timed for each: building the requests from the task's documents and scoring them
(the harness: `lm_eval.simple_evaluate` on an HFLM built beforehand, batch size 16;
neo eval: load_task + build_requests + run_task). Items/s is items over that time. The numbers
of both are printed next to each other: they must be identical (accuracy) or within 1e-4
relative (perplexity).

Goal (issue 10): >= 1.5x the harness's items/s with identical numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from data_prep.tokenizers import load_tokenizer
from train.checkpoints.export import export_hf
from train.checkpoints.load import load_model
from train.checkpoints.model_format import save_checkpoint
from train.config.model import ModelConfig
from train.data.records import Skipped
from train.evals.harness import write_task
from train.evals.items import pubmedqa_records
from train.evals.runner import build_requests, run_task
from train.evals.scoring import Scorer
from train.evals.tasks import load_task
from train.model.gpt import GPT

SHARED = Path(__file__).resolve().parents[2] / "shared" / "eval"
MODEL = dict(
    name="bench-eval",
    vocab_size=50257,
    max_position_embeddings=2048,
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    attention_types=[[["global", "local"], 2]],
    window_size=256,
)
WORDS = ["the", "of", "and", "a", "to", "in", "is", "you", "that", "it", "was", "for", "on", "with"]


def make_model(root: Path) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(**MODEL).validate()
    save_checkpoint(
        root / "ckpt", config, GPT(config).init_weights().state_dict(), load_tokenizer("gpt2")
    )
    export_hf(root / "ckpt", root / "hf")
    return root / "hf"


def mc_records(n: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        query = " ".join(rng.choice(WORDS) for _ in range(40)) + ":"
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(4)]
        out.append({"query": query, "choices": choices, "gold": rng.randrange(4)})
    return out


def run_ours(model, tokenizer, name: str, task_type: str, path: str) -> tuple[float, dict, int]:
    start = time.perf_counter()
    task = load_task(name, task_type, path, strict=True)
    requests = build_requests(task, tokenizer.encode, tokenizer.eod_id, 2048, 0, 1234)
    scorer = Scorer(model, "cpu", 2048, batch_tokens=16384, pad_id=tokenizer.eod_id)
    result = run_task(task, scorer, requests, lambda s: s, 0)
    return time.perf_counter() - start, result.metrics, scorer.forwards_run


def run_harness(lm, tasks_dir: Path, task: str) -> tuple[float, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir))
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=False
    )
    seconds = time.perf_counter() - start
    metrics = {k.split(",")[0]: v for k, v in out["results"][task].items() if k.endswith(",none")}
    return seconds, metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lambada", type=int, default=5153)
    parser.add_argument("--pubmedqa", type=int, default=500)
    parser.add_argument("--mc", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    from lm_eval.models.huggingface import HFLM

    root = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    hf_dir = make_model(root)
    tokenizer = load_tokenizer(hf_dir)
    ours_model = load_model(hf_dir).eval()
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=args.batch_size)

    lines = (SHARED / "lambada_openai_test.jsonl").read_text().splitlines()
    lambada = [json.loads(x) for x in lines[: args.lambada]]
    pubmedqa = [
        {k: r.value[k] for k in ("QUESTION", "CONTEXTS", "final_decision")}
        for r in pubmedqa_records(SHARED / "pubmedqa_ori_pqal.json", "test", Skipped(), True)
    ][: args.pubmedqa]
    cases = [
        ("lambada_openai", "lambada_openai", lambada, len(lambada)),
        ("pubmedqa", "pubmedqa", pubmedqa, len(pubmedqa)),
        ("mc (4 multi-token choices)", "mc", mc_records(args.mc), args.mc),
    ]
    tasks_dir = root / "tasks"
    header = [
        "task",
        "items",
        "harness items/s",
        "neo eval items/s",
        "speed-up",
        "harness numbers",
        "neo eval numbers",
    ]
    rows = []
    for label, task_type, records, n in cases:
        harness_task = write_task(tasks_dir, task_type, records, task_type)
        data = str(tasks_dir / f"{task_type}.jsonl")
        t_ours, m_ours, _ = run_ours(ours_model, tokenizer, task_type, task_type, data)
        t_theirs, m_theirs = run_harness(theirs, tasks_dir, harness_task)
        rows.append(
            [
                label,
                str(n),
                f"{n / t_theirs:.1f}",
                f"{n / t_ours:.1f}",
                f"{t_theirs / t_ours:.2f}x",
                numbers(m_theirs, m_ours),
                numbers(m_ours, m_ours),
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    print(
        f"\nneo eval vs lm-evaluation-harness {version('lm_eval')} (--model hf, batch size "
        f"{args.batch_size}) on CPU, {torch.get_num_threads()} threads, same model and items\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def numbers(metrics: dict, keys: dict) -> str:
    return ", ".join(f"{k} {metrics[k]:.6g}" for k in sorted(keys) if k in metrics)


if __name__ == "__main__":
    main()
