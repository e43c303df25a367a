"""`neo sft` for real: DeepSpeed over gloo on CPU, one and two ranks, from a trained base."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NEO, ROOT, tiny_config
from runs import kill
from transformers import GPTNeoForCausalLM

from data_prep.tokenizers import load_tokenizer
from train.data.packing import RowStream, SftBatches, pack
from train.data.sft import IGNORE, read_examples
from train.loop.metrics import read_metrics
from train.model.gpt import GPT

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SAMPLE = ROOT / "data_prep" / "sample" / "sft_instructions.jsonl"
COMMON = [
    "micro_batch_size=2",
    "global_batch_size=8",
    "precision=fp32",
    "logger.log_every=1",
    "logger.wandb.mode=disabled",
    "optim.lr=1e-3",
    "optim.warmup=2",
    "samples=2",
    "sample_max_new_tokens=8",
]


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    """The first 120 records of the bundled instruction sample."""
    file = tmp_path_factory.mktemp("sft_data") / "train.jsonl"
    file.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:120]))
    return file


def sft(run_dir: Path, *overrides: str, base=None, data=None, ranks=1, wait=True, check=True):
    merged = dict(a.split("=", 1) for a in [*COMMON, "max_steps=4", *overrides])
    args = [f"run_dir={run_dir}", *(f"{k}={v}" for k, v in merged.items())]
    args += [f"base={base}"] if base else []
    args += [f"sft.path={data}"] if data else []
    command = [NEO, "sft", *args]
    if ranks > 1:
        command = [
            TORCHRUN,
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "train.cli",
            "sft",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if not wait:
        return subprocess.Popen(
            command,
            cwd=run_dir.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    proc = subprocess.run(command, cwd=run_dir.parent, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"neo sft failed\n{proc.stdout}\n{proc.stderr}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def validations(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r}


@pytest.mark.slow
def test_no_arguments_fine_tunes_a_fresh_tiny_model_on_the_bundled_sample(tmp_path):
    proc = sft(
        tmp_path / "runs" / "x",
        "max_steps=2",
        "eval_every=2",
        "model.num_layers=2",
        "model.attention_types=[[[global,local],1]]",
        "model.hidden_size=64",
    )
    output = proc.stdout + proc.stderr
    assert (
        "base=runs/demo does not exist (`make demo` makes it): fine-tuning a fresh tiny" in output
    )
    assert "training examples in" in output and "packed" in output
    assert "2 steps of 8" in output
    run = tmp_path / "runs" / "x"
    assert (run / "model").is_dir() and (run / "hf").is_dir()
    samples = [r for r in read_metrics(run) if r.get("event") == "samples"]
    assert len(samples) == 1 and len(samples[0]["samples"]) == 2
    assert samples[0]["samples"][0]["prompt"].endswith("### Response:\n")


@pytest.mark.slow
def test_from_a_trained_base_one_and_two_ranks_give_the_same_run(
    tmp_path, trained_gpt2_model, instructions
):
    """ZeRO-2 on 1 and 2 ranks: the same losses, validation losses and final weights; the loss
    falls; the export loads in transformers and gives our logits."""
    base = trained_gpt2_model / "ckpt"
    common = ("deepspeed=zero2", "max_steps=8", "eval_every=4", "save_every=8")
    one = sft(tmp_path / "one", *common, base=base, data=instructions)
    two = sft(tmp_path / "two", *common, base=base, data=instructions, ranks=2)
    packing = [
        line for line in (two.stdout + two.stderr).splitlines() if "items: cutting stock" in line
    ]
    assert packing and len(packing) == len(set(packing))  # read on every rank, said by rank 0
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() == set(range(1, 9))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), (step, a, b)
    va, vb = validations(tmp_path / "one"), validations(tmp_path / "two")
    assert va.keys() == {4, 8} and va == pytest.approx(vb, rel=1e-5)
    assert va[8] < va[4]
    assert f"from {base}" in one.stdout + one.stderr
    hf = GPTNeoForCausalLM.from_pretrained(tmp_path / "one" / "hf").eval()
    from train.checkpoints.load import load_model

    ours = load_model(tmp_path / "one" / "model").eval()
    ids = torch.tensor([load_tokenizer("gpt2").encode("What does `json.dumps` do?")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_kill_and_resume_is_exact(tmp_path, trained_gpt2_model, instructions):
    base = trained_gpt2_model / "ckpt"
    common = ("deepspeed=zero1", "max_steps=8", "save_every=3", "eval_every=4")
    common += ("export_hf=false",)  # losses and validations only
    sft(tmp_path / "straight", *common, base=base, data=instructions, ranks=2)
    run = tmp_path / "killed"
    proc = sft(run, *common, base=base, data=instructions, ranks=2, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        file = run / "metrics.jsonl"
        steps = (
            [json.loads(x).get("step", 0) for x in file.read_text().splitlines() if x.endswith("}")]
            if file.exists()
            else []
        )
        if max(steps, default=0) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    kill(proc)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    state = json.loads((run / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert re.fullmatch("[0-9a-f]{64}", state["identity"]["data"]["rows"])  # the packing
    sft(run, *common, base=base, data=instructions, ranks=2)
    assert losses(run) == losses(tmp_path / "straight")  # bit for bit, steps 1..8
    assert validations(run) == validations(tmp_path / "straight")


def test_prompt_tokens_never_reach_the_loss(tmp_path):
    """The gradient of the packed loss with respect to the logits is zero at every position
    whose next token is a prompt token, and changing what those prompt tokens are does not
    change the gradient anywhere else."""
    records = [
        {"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" {2 * i}."}
        for i in range(6)
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = load_tokenizer("gpt2")
    examples = read_examples(str(path), "prompt_completion", tokenizer, 64).examples
    rows = pack(examples, 64, tokenizer.eod_id)
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
    model = GPT(
        tiny_config(
            vocab_size=tokenizer.vocab_size, max_position_embeddings=64, hidden_size=32, num_heads=2
        )
    ).init_weights()
    hidden = model.hidden_states(
        batch["input_ids"], positions=batch["positions"], documents=batch["documents"]
    )
    hidden = hidden.detach().requires_grad_()
    model.lm_head(hidden, batch["targets"]).total.backward()
    ignored = batch["targets"] == IGNORE
    assert ignored.any() and (~ignored).any()
    assert torch.all(hidden.grad[ignored] == 0)
    assert torch.all(hidden.grad[~ignored].abs().sum(-1) > 0)


def test_rows_of_a_step_do_not_depend_on_the_world_size():
    rows = [
        {
            "input_ids": np.full(3, i),
            "targets": np.array([i, IGNORE, i]),
            "positions": np.arange(3),
            "documents": np.zeros(3, dtype=np.int64),
        }
        for i in range(40)
    ]
    stream = RowStream(rows, seed=3)
    one = SftBatches(stream, 0, 1, micro_size=2, accumulation=4, pad_id=0)
    two = [SftBatches(stream, r, 2, micro_size=2, accumulation=2, pad_id=0) for r in range(2)]
    for step in range(8):  # past the first epoch (5 steps of 8 rows)
        seen_one = sorted(
            int(x) for m in range(4) for x in one.micro_batch(step, m)["input_ids"][:, 0]
        )
        seen_two = sorted(
            int(x) for b in two for m in range(2) for x in b.micro_batch(step, m)["input_ids"][:, 0]
        )
        assert seen_one == seen_two
        assert one.targets_in_step(step) == two[0].targets_in_step(step) == 16
    epoch0 = [int(stream[k]["input_ids"][0]) for k in range(40)]
    epoch1 = [int(stream[k]["input_ids"][0]) for k in range(40, 80)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40)) and epoch0 != epoch1


def test_tokens_of_a_step_count_the_padding_each_micro_batch_computes():
    """One example per row: a micro-batch computes its longest row times its rows (what the
    tokens/s and MFU of the progress line count), whatever the world size."""
    rows = [
        {"input_ids": np.zeros(n, dtype=np.int64), "targets": np.zeros(n, dtype=np.int64)}
        for n in (3, 9, 4, 4, 7, 1, 2, 8)
    ]
    stream = RowStream(rows, seed=0)
    batches = SftBatches(stream, 0, 1, micro_size=2, accumulation=4, pad_id=0)
    lengths = [len(stream[k]["input_ids"]) for k in range(8)]
    expected = sum(2 * max(lengths[i : i + 2]) for i in range(0, 8, 2))
    assert batches.tokens_in_step(0) == expected
    computed = sum(batches.micro_batch(0, m)["input_ids"].size for m in range(4))
    assert computed == expected
    two = SftBatches(stream, 1, 2, micro_size=2, accumulation=2, pad_id=0)
    assert two.tokens_in_step(0) == expected


@pytest.mark.slow
def test_zero3_on_two_ranks_validates_and_answers(tmp_path, trained_gpt2_model, instructions):
    """Partitioned weights: the validation loss matches ZeRO-2's, and every rank decodes the
    sample answers in step (rank 0 logs them)."""
    base = trained_gpt2_model / "ckpt"
    common = ("max_steps=2", "eval_every=2", "save_every=2")
    sft(tmp_path / "z2", "deepspeed=zero2", *common, base=base, data=instructions, ranks=2)
    sft(tmp_path / "z3", "deepspeed=zero3", *common, base=base, data=instructions, ranks=2)
    assert validations(tmp_path / "z3") == pytest.approx(validations(tmp_path / "z2"), rel=1e-4)
    (z3,) = [r for r in read_metrics(tmp_path / "z3") if r.get("event") == "samples"]
    (z2,) = [r for r in read_metrics(tmp_path / "z2") if r.get("event") == "samples"]
    assert len(z3["samples"]) == 2
    assert z3["samples"] == z2["samples"]  # same weights, same greedy answers
