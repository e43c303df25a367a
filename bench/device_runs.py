"""The device check's sections that run the `neo` command itself (bench/device_check.py):
training throughput and memory, the golden tiny curve, `neo generate` against transformers and
`neo eval` against the CPU. Each runs the real CLI as a subprocess with overrides and reads
what it writes (metrics.jsonl, samples, results.json), so the code path checked is the users'.

Every command is built by a function of the scratch directory, so the dry run prints exactly
what a real run would start.
"""

from __future__ import annotations

import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
import zstandard
from device_report import (
    Outcome,
    curve_agrees,
    datasheet_peak,
    first_difference,
    items_disagree,
    metrics_disagree,
    percent,
    throughput,
)

from data_prep.config import PrepConfig
from data_prep.prep import prepare
from train.config.model import ModelConfig
from train.loop.metrics import read_metrics
from train.model.sizes import flops_per_token

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
NEO = str(Path(sys.executable).with_name("neo"))
GOLDEN = ROOT / "tests" / "assets" / "golden_losses.json"
SAMPLE = ROOT / "data_prep" / "sample" / "pile_sample.jsonl.zst"
# Across devices the kernels differ (cuBLAS, flex_attention for the local layers), so the
# CPU-pinned curve (rtol 2e-4 on one machine, tests/verbs/test_train.py) is held to 5x that.
GOLDEN_RTOL = 1e-3
EVAL_RTOL = 1e-4
LAMBADA_ITEMS = 300
QUIET = [
    "eval_every=100000",
    "save_every=100000",
    "export_hf=false",
    "logger.log_every=1",
    "logger.wandb.mode=disabled",
]
TRAIN_125M = [
    "model=gpt_neo_125m",
    "precision=bf16",
    "deepspeed=zero2",
    "max_steps=30",
    "micro_batch_size=8",
    "global_batch_size=8",
    "optim.warmup=2",
    *QUIET,
]
TRAIN_1_3B = [
    "model=gpt_neo_1.3b",
    "precision=bf16",
    "deepspeed=zero2",
    "deepspeed.activation_checkpointing=true",
    "max_steps=6",
    "micro_batch_size=4",
    "global_batch_size=4",
    "optim.warmup=2",
    *QUIET,
]
# The weights neo generate and neo eval are checked on: the tiny model trained on the CPU (so a
# device fault cannot make them), long enough that its predictions are far from uniform.
TINY_WEIGHTS = [
    "accelerator=cpu",
    "precision=fp32",
    "data.seq_len=128",
    "max_steps=60",
    "micro_batch_size=8",
    "global_batch_size=8",
    "optim.lr=3e-3",
    "optim.warmup=5",
    "eval_every=100000",
    "save_every=100000",
    "export_hf=true",
    "logger.wandb.mode=disabled",
]
PROMPTS = ["The meaning of life is", "In 1905, Albert Einstein", "def main():", "Paris is"]
NEW_TOKENS = 32
LOGPROB_ATOL = 1e-4  # fp32 on both sides; kernels differ (flex or SDPA against HF's eager)
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}


@dataclass
class Runs:
    """Where the commands run (`work`, a scratch directory), on which accelerator, and what
    several sections share: the corpus and the tiny weights, made on first use."""

    kind: str  # cuda | npu
    work: Path
    lambada: Path | None
    deadline: float = math.inf  # time.monotonic() by which the running section must end
    made: dict[str, Path] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------------
    # commands (pure: the dry run prints them)

    def train_command(self, name: str, overrides: list[str]) -> list[str]:
        """`neo train` through bench/peak_memory.py, which writes the peak memory at exit."""
        run = self.work / name
        return [
            sys.executable,
            str(BENCH / "peak_memory.py"),
            str(run / "peak_memory.json"),
            self.kind,
            "train",
            f"run_dir={run}",
            f"data.path={self.work / 'corpus'}",
            f"accelerator={self.kind}",
            *overrides,
        ]

    def golden_command(self) -> list[str]:
        """The golden test's command (its overrides are in the golden file), on the device."""
        overrides = json.loads(GOLDEN.read_text())["overrides"]
        run, data = self.work / "golden", self.work / "corpus"
        return [NEO, "train", f"run_dir={run}", f"data.path={data}", *overrides] + [
            f"accelerator={self.kind}"
        ]

    def tiny_command(self) -> list[str]:
        run, data = self.work / "tiny", self.work / "corpus"
        return [NEO, "train", f"run_dir={run}", f"data.path={data}", *TINY_WEIGHTS]

    def generate_command(self) -> list[str]:
        return [
            NEO,
            "generate",
            f"checkpoint={self.work / 'tiny'}",
            f"accelerator={self.kind}",
            "dtype=float32",
            "do_sample=false",
            f"max_new_tokens={NEW_TOKENS}",
            "batch_size=1",
            f"prompts_file={self.work / 'prompts.txt'}",
            "format=jsonl",
            f"output={self.work / 'generate' / 'samples.jsonl'}",
        ]

    def eval_command(self, accelerator: str) -> list[str]:
        return [
            NEO,
            "eval",
            f"checkpoint={self.work / 'tiny'}",
            f"accelerator={accelerator}",
            "dtype=float32",
            "tasks=[lambada_openai]",
            f"task.lambada_openai.path={self.lambada}",
            f"limit={LAMBADA_ITEMS}",
            "log_samples=true",
            f"output={self.work / f'eval_{accelerator}'}",
        ]

    # ----------------------------------------------------------------------------------------
    # running

    def run(self, command: list[str], name: str) -> subprocess.CompletedProcess:
        """One command in the scratch directory, until the section's deadline; its output is
        kept in NAME.log there. A non-zero exit raises with the output's end."""
        timeout = max(1.0, self.deadline - time.monotonic())
        log = self.work / f"{name}.log"
        try:
            proc = subprocess.run(
                command,
                cwd=self.work,
                env={**os.environ, **ENV},
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{shown(command)} ran past its limit ({timeout:.0f}s)") from e
        log.write_text(f"$ {shown(command)}\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        if proc.returncode:
            tail = (proc.stderr or proc.stdout)[-1500:]
            raise RuntimeError(f"{shown(command)} exited {proc.returncode} (log {log}):\n{tail}")
        return proc

    def corpus(self) -> Path:
        """The golden curve's corpus (tests/conftest.py's `corpus`), which every run here uses."""
        if "corpus" not in self.made:
            documents = write_documents(self.work / "documents.jsonl")
            output = self.work / "corpus"
            prepare(
                PrepConfig(
                    input=str(documents), output=str(output), workers=1, validation_fraction=0.05
                )
            )
            self.made["corpus"] = output
        return self.made["corpus"]

    def tiny_weights(self) -> Path:
        if "tiny" not in self.made:
            self.corpus()
            self.run(self.tiny_command(), "tiny_weights")
            self.made["tiny"] = self.work / "tiny"
        return self.made["tiny"]

    # ----------------------------------------------------------------------------------------
    # sections

    def training(
        self, name: str, overrides: list[str], model: str, device: str, learns: bool
    ) -> Outcome:
        """tokens/s (median after warm-up), MFU against the run's measured matmul peak and the
        datasheet peak, peak memory; it passes when every loss is finite (and, with `learns`,
        the last is below the first)."""
        self.corpus()
        self.run(self.train_command(name, overrides), name)
        run = self.work / name
        records = read_metrics(run)
        peak_file = run / "peak_memory.json"
        memory = json.loads(peak_file.read_text()) if peak_file.exists() else {}
        details = throughput(records, model_flops(model), datasheet_peak(device))
        peak = memory.get("peak_memory_bytes")
        details["peak_memory_gib"] = None if peak is None else round(peak / 2**30, 2)
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # 1.3B under ZeRO-2: ~20 GB
        losses = details["losses"]
        if not losses or not details["steps_timed"]:
            return Outcome("fail", f"{run / 'metrics.jsonl'} has no timed training step", details)
        finite = all(math.isfinite(x) for x in losses.values())
        learned = finite and losses[max(losses)] < losses[min(losses)]
        mfu = details["mfu_measured_peak"], details["mfu_datasheet"]
        summary = (
            f"{details['tokens_per_s']:,.0f} tok/s, MFU {percent(mfu[0])} of the measured peak, "
            f"{percent(mfu[1])} of the datasheet; peak memory {details['peak_memory_gib']} GiB; "
            f"loss {losses[min(losses)]:.3f} -> {losses[max(losses)]:.3f}"
        )
        passed = finite and (learned or not learns)
        return Outcome("pass" if passed else "fail", summary, details)

    def golden(self) -> Outcome:
        self.corpus()
        self.run(self.golden_command(), "golden")
        expected = json.loads(GOLDEN.read_text())["losses"]
        got = {r["step"]: r["loss"] for r in read_metrics(self.work / "golden") if "loss" in r}
        curve = [got.get(step, math.nan) for step in range(1, len(expected) + 1)]
        ok, worst = curve_agrees(curve, expected, GOLDEN_RTOL)
        details = {"losses": curve, "golden": expected, "rtol": GOLDEN_RTOL, "worst": worst}
        summary = (
            f"{len(curve)} losses, largest relative difference {worst:.1e} (rtol {GOLDEN_RTOL})"
        )
        return Outcome("pass" if ok else "fail", summary, details)

    def generate(self, device) -> Outcome:
        """neo generate's greedy tokens and their log-probabilities against transformers'
        generate on the HF export of the same weights, prompt by prompt (batch 1: no padding),
        both in fp32 on the device. The log-probabilities check every step's numbers, also
        where a small model's greedy text repeats itself."""
        import torch
        from transformers import GPTNeoForCausalLM

        weights = self.tiny_weights()
        (self.work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        self.run(self.generate_command(), "generate")
        out = self.work / "generate" / "samples.jsonl"
        records = [json.loads(line) for line in out.read_text().splitlines()]
        model = GPTNeoForCausalLM.from_pretrained(weights / "hf").float().to(device).eval()
        model.config._attn_implementation = "eager"  # HF's reference attention, as in the tests
        eos = model.config.eos_token_id
        compared = []
        for r in records:
            ids = torch.tensor([r["prompt_ids"]], device=device)
            with torch.no_grad():
                hf = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=NEW_TOKENS,
                    pad_token_id=eos,
                    eos_token_id=eos,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
            theirs = hf.sequences[0, ids.shape[1] :].tolist()
            logprobs = [
                torch.log_softmax(step[0].float(), dim=-1)[token].item()
                for step, token in zip(hf.logits, theirs, strict=True)
            ]
            diff = max(
                (abs(a - b) for a, b in zip(r["logprobs"], logprobs, strict=False)), default=0.0
            )
            at = first_difference(r["token_ids"], theirs)
            compared.append(
                {"prompt": r["prompt"], "neo": r["token_ids"], "hf": theirs, "at": at}
                | {"logprob_max_diff": diff}
            )
        differ = [c for c in compared if c["at"] is not None]
        worst = max((c["logprob_max_diff"] for c in compared), default=math.inf)
        summary = f"{len(compared) - len(differ)}/{len(compared)} prompts equal over"
        summary += f" {NEW_TOKENS} greedy tokens, log-probabilities within {worst:.1e}"
        summary += f" (limit {LOGPROB_ATOL})"
        if differ:
            summary += f"; {differ[0]['prompt']!r} differs from token {differ[0]['at']}"
        passed = compared and not differ and worst <= LOGPROB_ATOL
        return Outcome("pass" if passed else "fail", summary, {"prompts": compared})

    def eval(self) -> Outcome:
        """neo eval's LAMBADA metrics and every item's log-likelihood and greedy flag on the
        device against the same command on the CPU."""
        if self.lambada is None or not self.lambada.is_file():
            return Outcome("skipped", f"no LAMBADA file ({self.lambada}); give --lambada PATH")
        self.tiny_weights()
        metrics, items = {}, {}
        for accelerator in (self.kind, "cpu"):
            self.run(self.eval_command(accelerator), f"eval_{accelerator}")
            out = self.work / f"eval_{accelerator}"
            metrics[accelerator] = json.loads((out / "results.json").read_text())["results"][
                "lambada_openai"
            ]["metrics"]
            items[accelerator] = [json.loads(x) for x in (out / "samples.jsonl").open()]
        got, cpu = metrics[self.kind], metrics["cpu"]
        off = metrics_disagree(got, cpu, EVAL_RTOL)
        items_off = items_disagree(items[self.kind], items["cpu"], EVAL_RTOL)
        details = {self.kind: got, "cpu": cpu, "rtol": EVAL_RTOL, "disagree": off}
        details["items_disagree"] = items_off
        numbers = ", ".join(f"{k} {v:.4f}" for k, v in cpu.items() if isinstance(v, float))
        summary = f"{LAMBADA_ITEMS} items, CPU {numbers}; "
        if off or items_off:
            summary += f"{len(off)} metric(s) and {len(items_off)} item(s) differ: {off}"
        else:
            summary += f"{self.kind} equal within {EVAL_RTOL}, metrics and every item"
        return Outcome("fail" if off or items_off else "pass", summary, details)


def write_documents(file: Path) -> Path:
    """300 documents of the bundled sample cut to 8 kB each: the corpus the golden curve was
    pinned on (tests/conftest.py's `documents` fixture is this function's file)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with SAMPLE.open("rb") as f, file.open("w") as out:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        for _, line in zip(range(300), lines, strict=False):
            record = json.loads(line)
            record["text"] = record["text"][:8000]
            out.write(json.dumps(record) + "\n")
    return file


def model_flops(name: str, seq_len: int = 2048) -> float:
    """Training FLOPs per token of a named size (configs/model/NAME.yaml) at seq_len, as neo
    train's MFU counts them (train/model/sizes.py)."""
    values = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
    return flops_per_token(ModelConfig(**values).validate(), seq_len)


def shown(command: list[str]) -> str:
    """A command as one shell line, with the interpreter's path shortened."""
    return shlex.join(["python" if c == sys.executable else c for c in command])
