"""`neo dpo` against TRL's DPOTrainer on the same model, pairs and batch, CPU, side by side.

    python bench/dpo.py [--steps 20] [--pairs 96] [--batch 4]

Model: a GPT-Neo of 4 layers, hidden 256, 4 heads (global/local, window 64), GPT-2 vocabulary,
context 256, random weights from one seed, saved as a neotrain checkpoint (what `neo dpo
base=` reads) and exported by `neo export` (what TRL loads). Pairs: the first `--pairs` of the
bundled sample (data_prep/sample/dpo_pairs.jsonl). Both train fp32 with AdamW at a constant
learning rate, `--batch` pairs a step (no accumulation), sigmoid loss, beta 0.1, one process
with the same threads, rows cut to 256 tokens (TRL's max_length).

- neo dpo: the real command; the reference's log-probabilities are computed before training
  and the reference freed (one model resident while training);
- TRL, reference model: DPOTrainer's default, a second model scoring every batch (two models
  resident);
- TRL, precomputed: `precompute_ref_log_probs=True` (the reference scored before training, one
  model resident, as neo dpo).

Each runs in its own process. Step time: the median over the steps after the first 3 (neo: from
its metrics, the tokens of each step over its tokens/s; TRL: a callback's clock around each
step); pairs/s is the batch over it. Peak memory: the process's peak resident set (ru_maxrss:
Python, torch and the libraries included, the same for both sides give or take their imports).

Goal (issue 25): neo dpo >= 1.5x TRL's throughput, one model's weights resident in training.

    python bench/dpo.py --layouts 5 [--steps 20] [--pairs 96] [--batch 4]

instead compares neo dpo's two layouts (dpo.packing: a micro-batch's sequences packed into rows
of the context, or one per row padded to the longest), the runs alternated round by round.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from markdown_table import markdown

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data_prep" / "sample" / "dpo_pairs.jsonl"
SEQ, LR, SKIP = 256, 1e-5, 3
MODEL = dict(
    num_layers=4,
    hidden_size=256,
    num_heads=4,
    attention_types=[[["global", "local"], 2]],
    window_size=64,
    max_position_embeddings=SEQ,
)


def prepare(root: Path, pairs: int) -> None:
    """The model (checkpoint and HF export) and the pairs (prompt/chosen/rejected only)."""
    import torch

    from data_prep.tokenizers import load_tokenizer
    from train.checkpoints.export import export_hf
    from train.checkpoints.model_format import save_checkpoint
    from train.config.model import ModelConfig
    from train.model.gpt import GPT

    tokenizer = load_tokenizer("gpt2")
    config = ModelConfig(name="bench", vocab_size=tokenizer.vocab_size, **MODEL).validate()
    model = GPT(config).init_weights(torch.Generator().manual_seed(0))
    save_checkpoint(root / "ckpt", config, model.state_dict(), tokenizer)
    export_hf(root / "ckpt", root / "hf")
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:pairs]]
    keep = ("prompt", "chosen", "rejected")
    (root / "pairs.jsonl").write_text(
        "".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in records)
    )


def child_neo(root: Path, steps: int, batch: int, out: Path, *overrides: str) -> None:
    from train.cli import main

    atexit.register(write_rss, out, {})
    main(
        [
            "dpo",
            f"base={root / 'ckpt'}",
            f"dpo.path={root / 'pairs.jsonl'}",
            f"run_dir={root / 'neo'}",
            "dpo.validation_fraction=0",
            f"max_steps={steps}",
            f"micro_batch_size={batch}",
            f"global_batch_size={batch}",
            "precision=fp32",
            f"optim.lr={LR}",
            "optim.warmup=0",
            "optim.min_lr_ratio=1.0",
            "optim.weight_decay=0",
            "logger.log_every=1",
            "logger.wandb.mode=disabled",
            "eval_every=100000",
            "save_every=100000",
            "export_hf=false",
            *overrides,
        ]
    )


def child_trl(root: Path, steps: int, batch: int, precompute: bool, out: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, GPTNeoForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    model = GPTNeoForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
    records = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    args = DPOConfig(
        output_dir=str(root / "trl"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_length=SEQ,
        beta=0.1,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=100000,
        disable_tqdm=True,
        precompute_ref_log_probs=precompute,
        dataset_num_proc=None,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=AutoTokenizer.from_pretrained(root / "hf"),
        callbacks=[Clock()],
    )
    atexit.register(write_rss, out, {"step_s": times})
    trainer.train()


def write_rss(out: Path, values: dict) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out.write_text(json.dumps({**values, "peak_rss_bytes": peak}))


def run(mode: list[str], root: Path, args) -> dict:
    out = root / f"{'-'.join(mode)}.json"
    command = [sys.executable, __file__, "--child", *mode, str(root), str(out)]
    command += ["--steps", str(args.steps), "--batch", str(args.batch)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    subprocess.run(command, check=True, env=env, cwd=root, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    if mode[0] == "neo":
        records = [json.loads(line) for line in (root / "neo" / "metrics.jsonl").open()]
        steps = [r for r in records if r.get("tokens_per_s")]
        tokens = {r["step"]: r["tokens"] for r in records if "tokens" in r}
        result["step_s"] = [
            (tokens[r["step"]] - tokens[r["step"] - 1]) / r["tokens_per_s"] for r in steps
        ]
        result["step_s"] = [None] * (args.steps - len(steps)) + result["step_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--child", nargs="+")
    parser.add_argument(
        "--layouts",
        type=int,
        metavar="ROUNDS",
        help="instead: neo dpo packed vs padded (dpo.packing), ROUNDS interleaved rounds",
    )
    args, rest = parser.parse_known_args()
    if args.child:
        mode, root, out = args.child[0], Path(args.child[-2]), Path(args.child[-1])
        if mode == "neo":
            child_neo(root, args.steps, args.batch, out, *args.child[1:-2])
        else:
            child_trl(root, args.steps, args.batch, args.child[1] == "precomputed", out)
        return
    if args.layouts:
        return layouts(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, args.pairs)
        results = {
            "neo dpo (reference precomputed)": run(["neo"], root, args),
            "TRL DPOTrainer, reference model": run(["trl", "model"], root, args),
            "TRL DPOTrainer, precompute_ref_log_probs": run(["trl", "precomputed"], root, args),
        }
    neo = statistics.median(s for s in results["neo dpo (reference precomputed)"]["step_s"][SKIP:])
    rows = []
    for name, r in results.items():
        step = statistics.median(s for s in r["step_s"][SKIP:] if s is not None)
        rows.append(
            [
                name,
                f"{step:.3f}",
                f"{args.batch / step:.1f}",
                f"{neo and step / neo:.2f}x" if "TRL" in name else "1.00x",
                f"{r['peak_rss_bytes'] / 2**20:,.0f}",
            ]
        )
    print(
        f"\n{args.steps} steps of {args.batch} pairs, model {MODEL['num_layers']}x"
        f"{MODEL['hidden_size']}, GPT-2 vocabulary, fp32, {os.cpu_count()} cores\n"
    )
    markdown(["", "median step (s)", "pairs/s", "neo dpo's speed-up", "peak RSS (MiB)"], rows)


def layouts(args) -> None:
    """neo dpo with dpo.packing=true and false on the same model and pairs, alternated for
    `args.layouts` rounds (the machine's noise falls on both alike): each layout's median step
    over every round's steps after the first SKIP, the spread of the rounds' medians, and the
    share of the computed tokens that are padding (over the steps run)."""
    from data_prep.tokenizers import load_tokenizer
    from train.data.dpo import PairBatches
    from train.data.preference import read_pairs

    step_s: dict[bool, list[list[float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, args.pairs)
        for _ in range(args.layouts):
            for packing in (True, False):
                shutil.rmtree(root / "neo", ignore_errors=True)
                r = run(["neo", f"dpo.packing={str(packing).lower()}"], root, args)
                step_s[packing].append(r["step_s"][SKIP:])
        tokenizer = load_tokenizer("gpt2")
        pairs = read_pairs(str(root / "pairs.jsonl"), tokenizer, SEQ).pairs
    rows = []
    for packing in (True, False):
        batches = PairBatches(pairs, 1234, 0, 1, args.batch, 1, 0, SEQ if packing else None)
        steps = range(len(pairs) // args.batch)
        computed = sum(batches.tokens_in_step(s) for s in steps)
        real = sum(len(p.chosen) + len(p.rejected) for s in steps for p in batches.items(s, 0))
        padding = 1 - real / computed
        medians = [statistics.median(r) for r in step_s[packing]]
        step = statistics.median(s for r in step_s[packing] for s in r)
        rows.append(
            [
                "packed (dpo.packing=true)" if packing else "padded (dpo.packing=false)",
                f"{step:.3f}",
                f"{min(medians):.3f} - {max(medians):.3f}",
                f"{args.batch / step:.1f}",
                f"{100 * padding:.1f}%",
            ]
        )
    print(
        f"\n{args.layouts} interleaved rounds of {args.steps} steps of {args.batch} pairs (one "
        f"micro-batch), model {MODEL['num_layers']}x{MODEL['hidden_size']}, context {SEQ}, "
        f"fp32, {os.cpu_count()} cores\n"
    )
    header = ["layout", "median step (s)", "rounds' medians", "pairs/s", "padding computed"]
    markdown(header, rows)
    ratios = [
        statistics.median(a) / statistics.median(b)
        for a, b in zip(step_s[True], step_s[False], strict=True)
    ]
    print(f"\npacked / padded median step, round by round: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
