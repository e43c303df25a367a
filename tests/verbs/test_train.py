"""`neo train` for real: DeepSpeed over gloo on CPU, one and two ranks, as users run it."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import NEO, ROOT
from runs import BF16, SMALL, kill, losses, train, val_losses, wait_for_step

from train.checkpoints.load import load_model
from train.checkpoints.model_format import materialize
from train.checkpoints.zero import consolidated_state_dict
from train.config.resolve import resolve_precision
from train.distributed.devices import ACCELERATORS
from train.distributed.machine import describe, world
from train.loop.metrics import read_metrics
from train.model.gpt import GPT

GOLDEN = ROOT / "tests" / "assets" / "golden_losses.json"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_bf16_zero_stage_learns(tmp_path, bf16_corpus, stage):
    run = tmp_path / f"zero{stage}"
    proc = train(
        run,
        bf16_corpus,
        f"deepspeed=zero{stage}",
        *BF16,
        "max_steps=16",
        "eval_every=8",
        "save_every=16",
        ranks=2,
    )
    # Nothing a user cannot act on: DeepSpeed's deprecated-collective warnings, its compiler
    # probe and op-build prints, its "untested optimizer" warning, our own reduce_op warning.
    output = proc.stdout + proc.stderr
    for noise in ("Warning", "untested optimizer", "gcc ", "built successfully"):
        assert noise not in output, output
    # Explicit bf16 runs everywhere; where it is emulated, one line says how much slower.
    slow_bf16 = "precision=bf16 on a device without native bf16"
    assert (slow_bf16 in output) is not describe(ACCELERATORS["cpu"]).native_bf16, output
    curve = losses(run)
    assert sorted(curve) == list(range(1, 17))
    assert curve[16] < curve[1] - 1.0, curve
    val = val_losses(run)
    assert val[16] < val[8]
    assert (run / "hf" / "model.safetensors").is_file() and (run / "loss.png").is_file()


@pytest.mark.slow
def test_world_size_one_and_two_train_the_same_model(tmp_path, corpus):
    common = ("deepspeed=zero2", "precision=fp32", "max_steps=6", "eval_every=6", "save_every=6")
    common += ("export_hf=false",)  # losses only: the export is tested where it is read
    train(tmp_path / "one", corpus, *common, ranks=1)
    train(tmp_path / "two", corpus, *common, ranks=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys()
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-5, abs=1e-6), (step, one, two)


@pytest.mark.slow
def test_kill_and_resume_is_exact(tmp_path, bf16_corpus):
    """SIGKILL mid-run, after the step-4 checkpoint; the rerun's losses equal an uninterrupted
    run's, bit for bit (same world size, CPU, bf16). (A fast machine may reach the step-8
    checkpoint between seeing step 6 and the kill: either is a resume from mid-run.)"""
    corpus = bf16_corpus
    common = ("deepspeed=zero2", *BF16, "max_steps=12", "save_every=4", "eval_every=5")
    common += ("export_hf=false",)
    train(tmp_path / "straight", corpus, *common, ranks=2)

    run = tmp_path / "killed"
    proc = train(run, corpus, *common, ranks=2, wait=False)
    wait_for_step(proc, run, 6)
    kill(proc)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest in ("step_00000004", "step_00000008")
    assert not (run / "model").exists()

    train(run, corpus, *common, ranks=2)
    straight, resumed = losses(tmp_path / "straight"), losses(run)
    assert resumed == straight  # exact float equality, every step 1..12
    assert val_losses(run)[10] == val_losses(tmp_path / "straight")[10]


@pytest.mark.slow
def test_zero3_checkpoint_consolidates_to_the_trained_model(tmp_path, corpus):
    """The live model's final fp32 weights (run/model), zero_to_fp32 on the last ZeRO-3
    checkpoint, and the Hugging Face export all give the same logits."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "zero3"
    train(
        run,
        corpus,
        "deepspeed=zero3",
        "precision=fp32",
        "max_steps=4",
        "save_every=4",
        "eval_every=4",
        "export_hf=false",  # neo export below is the export under test
        ranks=2,
    )
    live = load_model(run / "model").eval()
    from_checkpoint = load_model(run / "checkpoints").eval()
    subprocess.run(
        [NEO, "export", f"input={run / 'checkpoints'}", f"output={tmp_path / 'hf'}"],
        check=True,
        capture_output=True,
    )
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    # neo export read it lazily: each weight gathered from the ranks' partitions when written
    eager = consolidated_state_dict(run / "checkpoints", "step_00000004")
    lazy = consolidated_state_dict(run / "checkpoints", "step_00000004", lazy=True)
    assert lazy.keys() == eager.keys()
    assert not isinstance(lazy["transformer.h.1.mlp.c_fc.weight"], torch.Tensor)
    for name, weight in lazy.items():
        assert torch.equal(materialize(weight), eager[name]), name
    ids = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = live(ids)
        torch.testing.assert_close(from_checkpoint(ids), reference)
        torch.testing.assert_close(hf(ids).logits, reference)
    # Trained: every weight moved from the seeded initial weights (seed=1234, as the run's),
    # and by a few Adam steps' worth, so those are the initial weights indeed.
    initial = GPT(live.config).init_weights(torch.Generator().manual_seed(1234)).state_dict()
    for name, weight in live.state_dict().items():
        change = (weight - initial[name]).abs().max().item()
        assert 0 < change < 0.1, (name, change)
    # A rank's shard cut short: named, and no export left behind.
    (shard,) = (run / "checkpoints" / "step_00000004").glob("*rank_1*optim_states.pt")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    done = subprocess.run(
        [NEO, "export", f"input={run / 'checkpoints'}", f"output={tmp_path / 'hf2'}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "step_00000004: cannot be consolidated, a file is truncated or corrupt" in done.stderr
    assert not list(tmp_path.glob("*hf2*"))  # nor its temporary directory


@pytest.mark.slow
def test_golden_loss_curve(tmp_path, corpus):
    """The first steps of the tiny model (configs/model/tiny.yaml) on fixed data are pinned: a
    change that moves them (model, init, data order, optimizer, schedule) must say so by
    updating the file (NEOTRAIN_UPDATE_GOLDEN=1)."""
    run = tmp_path / "golden"
    overrides = [
        f"data.path={corpus}",
        "data.seq_len=64",
        "precision=fp32",
        "optim.ns_precision=fp32",  # as recorded, whatever `auto` picks
        "micro_batch_size=4",
        "global_batch_size=8",
        "max_steps=8",
        "optim.warmup=2",
        "eval_every=8",
        "save_every=8",
        "export_hf=false",
        "logger.log_every=1",
        "logger.wandb.mode=disabled",
    ]
    subprocess.run(
        [NEO, "train", f"run_dir={run}", *overrides],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    curve = [losses(run)[s] for s in range(1, 9)]
    if os.environ.get("NEOTRAIN_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(
            json.dumps({"model": "tiny", "overrides": overrides[1:], "losses": curve}, indent=1)
            + "\n"
        )
    expected = json.loads(GOLDEN.read_text())["losses"]
    np.testing.assert_allclose(curve, expected, rtol=2e-4)


@pytest.mark.slow
def test_sigterm_saves_and_stops_then_resumes(tmp_path, corpus):
    run = tmp_path / "preempted"
    common = (
        "precision=fp32",
        "max_steps=40",
        "save_every=100",
        "eval_every=100",
        "export_hf=false",
    )
    proc = train(run, corpus, *common, wait=False)
    wait_for_step(proc, run, 3)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped_at < 40
    assert (
        f"stopped by SIGTERM after step {stopped_at}" in out
        and "Run the same command to resume" in out
    )
    train(run, corpus, *common, "max_steps=" + str(stopped_at + 2))
    assert sorted(losses(run))[-1] == stopped_at + 2


NAN_AFTER = """
import sys, torch
from train.model.gpt import GPT
from train.cli import main
real = GPT.forward
calls, healthy = {"n": 0}, int(sys.argv[1])
def poisoned(self, input_ids, targets=None):
    out = real(self, input_ids, targets)
    if targets is None or not self.training:
        return out
    calls["n"] += 1
    return type(out)(out.total * float("nan"), out.count) if calls["n"] > healthy else out
GPT.forward = poisoned
main(["train", *sys.argv[2:]])
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "precision"), [(0, ("precision=fp32",)), (2, BF16)], ids=["zero0-fp32", "zero2-bf16"]
)
def test_non_finite_losses_skip_steps_then_stop(tmp_path, request, stage, precision):
    corpus = request.getfixturevalue("bf16_corpus" if precision == BF16 else "corpus")
    run = tmp_path / "nan"
    args = [
        f"run_dir={run}",
        f"data.path={corpus}",
        *SMALL,
        f"deepspeed=zero{stage}",
        *precision,
        "max_steps=20",
        "max_bad_steps=3",
        "save_every=3",
        "eval_every=100",
    ]
    # Micro-batches 1-12 are fine (steps 1-3 at 4 micro-batches a step), then every loss is NaN.
    proc = subprocess.run(
        [sys.executable, "-c", NAN_AFTER, "12", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "3 steps in a row had a non-finite loss" in proc.stderr
    records = read_metrics(run)
    assert [r["skipped"] for r in records if "loss" in r][-1] == 3
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    # The skipped steps did not touch the weights: they equal the weights after step 3.
    after_three = load_model(run / "checkpoints" / "step_00000003").state_dict()
    after_six = load_model(run / "checkpoints" / "step_00000006").state_dict()
    assert all(torch.isfinite(p).all() for p in after_six.values())
    for name, weight in after_six.items():
        assert torch.equal(weight, after_three[name]), name


# --------------------------------------------------------------------------------------------
# bad input: a clear error before any step runs


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["global_batch_size=9"],
            "global_batch_size=9 is not a multiple of micro_batch_size=2 x world size 1",
        ),
        (["data.seq_len=65"], "sequence length 65 is longer than model.max_position_embeddings=64"),
        (
            ["model.vocab_size=1000"],
            "the tokenizer has 50257 tokens, more than model.vocab_size=1000",
        ),
        (["data.path=/nonexistent/data"], "/nonexistent/data does not exist"),
        (["precision=fp8"], "precision='fp8' is not one of"),
        (
            ["deepspeed.offload_param=true"],
            "deepspeed.offload_param=true needs deepspeed.zero_stage=3",
        ),
        (["precision=fp16"], "precision=fp16 needs a CUDA or Ascend device"),
    ],
)
def test_bad_configuration_fails_before_training(tmp_path, corpus, overrides, message):
    run = tmp_path / "bad"
    proc = train(run, corpus, *overrides, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_corrupt_shard_is_named(tmp_path, corpus):
    import shutil

    broken = tmp_path / "data"
    shutil.copytree(corpus, broken)
    shard = next(broken.glob("train-*.bin"))
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    proc = train(tmp_path / "run", broken, check=False)
    assert proc.returncode == 2 and shard.name in proc.stderr, proc.stderr


@pytest.mark.slow
def test_checkpoint_from_another_model_is_refused(tmp_path, corpus):
    run = tmp_path / "run"
    train(run, corpus, "max_steps=2", "save_every=2", "eval_every=2", "export_hf=false")
    proc = train(run, corpus, "max_steps=4", "model.hidden_size=32", check=False)
    assert proc.returncode == 2
    assert "was trained with a different model config" in proc.stderr
    assert "model.hidden_size: 64 -> 32" in proc.stderr  # exactly what differs
    never = train(run, corpus, "max_steps=4", "resume=never", check=False)
    assert never.returncode == 2 and "resume=never, but" in never.stderr
    assert max(losses(run)) == 2


@pytest.mark.slow
def test_a_moved_data_directory_still_resumes(tmp_path, corpus):
    """A run's data identity is its content (the manifest's checksums), not its path."""
    import shutil

    common = ("precision=fp32", "save_every=2", "eval_every=100", "optim.decay=4")
    train(tmp_path / "straight", corpus, *common, "max_steps=4", "export_hf=false")
    first = tmp_path / "data-here"
    shutil.copytree(corpus, first)
    run = tmp_path / "run"
    train(run, first, *common, "max_steps=2", "export_hf=false")
    moved = first.rename(tmp_path / "data-moved")
    proc = train(run, moved, *common, "max_steps=4", "export_hf=false")
    assert "resumed from" in proc.stdout
    assert losses(run) == losses(tmp_path / "straight")


@pytest.mark.slow
def test_resume_on_a_different_world_size(tmp_path, corpus):
    """Two ranks stop at step 4; one rank continues through DeepSpeed's universal checkpoint,
    reading the same samples (by consumed count) and landing close to the two-rank run."""
    # optim.decay pins the schedule's length, so stopping at 4 does not change the learning rate.
    # AdamW: DeepSpeed's universal checkpoint cannot reshard Muon's momentum (refused, tested
    # in tests/loop/test_loop.py).
    common = (
        "optim.name=adamw",
        "deepspeed=zero2",
        "precision=fp32",
        "save_every=4",
        "eval_every=100",
        "optim.decay=8",
    )
    train(tmp_path / "straight", corpus, *common, "max_steps=8", "export_hf=false", ranks=2)
    run = tmp_path / "resized"
    train(run, corpus, *common, "max_steps=4", "export_hf=false", ranks=2)
    proc = train(run, corpus, *common, "max_steps=8", ranks=1)
    assert "through a universal checkpoint" in proc.stdout + proc.stderr
    straight, resized = losses(tmp_path / "straight"), losses(run)
    for step in range(5, 9):
        assert resized[step] == pytest.approx(straight[step], rel=1e-4), (step, straight, resized)


@pytest.mark.slow
def test_resume_across_zero_families_from_consolidated_weights(tmp_path, corpus):
    """ZeRO-2 -> ZeRO-3 cannot reshard Adam's state; the run continues from the consolidated
    fp32 weights (step, schedule and data position kept), saying so."""
    common = ("precision=fp32", "save_every=4", "eval_every=100", "optim.decay=8")
    run = tmp_path / "run"
    train(run, corpus, *common, "deepspeed=zero2", "max_steps=4", "export_hf=false", ranks=2)
    proc = train(run, corpus, *common, "deepspeed=zero3", "max_steps=6", ranks=2)
    assert "from its consolidated fp32 weights" in proc.stdout + proc.stderr
    curve = losses(run)
    assert sorted(curve) == list(range(1, 7))
    # Step 5's loss is computed with the step-4 weights: the same as an uninterrupted run's.
    straight = tmp_path / "straight"
    train(straight, corpus, *common, "deepspeed=zero2", "max_steps=6", "export_hf=false", ranks=2)
    assert curve[5] == pytest.approx(losses(straight)[5], rel=1e-5)


@pytest.mark.slow
def test_zero_stages_start_from_the_same_weights(tmp_path, corpus):
    """Initialisation is separate from construction: ZeRO-3 builds the model partitioned
    (deepspeed.zero.Init) and initialises it after, module by module, to the same numbers."""
    first = {}
    for stage in (0, 3):
        run = tmp_path / f"zero{stage}"
        train(
            run,
            corpus,
            f"deepspeed=zero{stage}",
            "precision=fp32",
            "max_steps=2",
            "export_hf=false",
            ranks=2,
        )
        first[stage] = losses(run)
    assert first[0][1] == first[3][1]
    assert first[0][2] == pytest.approx(first[3][2], rel=1e-5)


@pytest.mark.slow
def test_no_arguments_prepares_the_sample_and_trains(tmp_path):
    """`neo train` on the embedded defaults (here cut to 2 steps): prepares the bundled sample
    with `neo prep`, trains, logs to wandb offline, exports; `neo plot` redraws the curve."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [NEO, "train", "max_steps=2", "eval_every=2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "running neo prep on the bundled sample corpus" in proc.stdout
    # precision=auto: bf16 only where this CPU computes it natively, and the log says why.
    machine = describe(ACCELERATORS["cpu"])
    precision, reason = resolve_precision("auto", world(ACCELERATORS["cpu"], machine, 1))
    assert f"precision auto -> {precision}: {reason}" in proc.stdout
    assert "step 1/2 | " in proc.stdout and "warm-up" in proc.stdout
    run = tmp_path / "runs" / "tiny"
    start = read_metrics(run)[0]  # the machine behind every number of the run
    assert start["event"] == "start" and start["precision"] == precision
    assert start["machine"]["name"] == machine.name and start["machine"]["isa"] == machine.isa
    assert start["peak_flops"] > 0
    config = (run / "config.yaml").read_text()
    assert f"# precision: auto -> {precision}" in config and f"precision: {precision}\n" in config
    assert f"# machine: cpu {machine.name}, {machine.isa}, native bf16 " in config
    assert (tmp_path / "data" / "pile_sample" / "manifest.json").is_file()
    assert {"config.yaml", "metrics.jsonl", "loss.png", "checkpoints", "model", "hf"} <= {
        p.name for p in run.iterdir()
    }
    assert list((run / "wandb").glob("offline-run-*")), "wandb ran in offline mode"
    assert "max_steps: 2" in (run / "config.yaml").read_text()
    (run / "loss.png").unlink()
    plot = subprocess.run(
        [NEO, "plot", f"run_dir={run}"], capture_output=True, text=True, cwd=tmp_path
    )
    assert plot.returncode == 0 and (run / "loss.png").is_file()


@pytest.mark.slow
def test_an_mfu_above_100_percent_is_never_printed(tmp_path, corpus):
    """peak_flops far below what the run achieves: the log says once that the peak is wrong,
    and no MFU is printed or recorded."""
    run = tmp_path / "run"
    proc = train(run, corpus, "precision=fp32", "max_steps=3", "peak_flops=1000", "export_hf=false")
    output = proc.stdout + proc.stderr
    assert output.count("so that peak is wrong") == 1 and "| MFU" not in output, output
    assert all(r.get("mfu") is None for r in read_metrics(run))
    # Not even in the warning: no percentage of 100 or more anywhere.
    assert not re.search(r"\b\d{3,}(\.\d+)?%", output.replace(",", "")), output


@pytest.mark.slow
def test_resume_after_a_precision_change(tmp_path, bf16_corpus):
    """precision=auto picks per machine, so a run can move between bf16 and fp32 machines: the
    checkpoint's optimizer state is resharded through a universal checkpoint and step 5 starts
    from the step-4 weights."""
    common = ("deepspeed=zero2", "model.vocab_size=512", "save_every=4", "eval_every=100")
    common += ("optim.decay=8", "export_hf=false", "optim.name=adamw")  # universal: AdamW
    train(tmp_path / "straight", bf16_corpus, *common, "precision=bf16", "max_steps=5", ranks=2)
    run = tmp_path / "moved"
    train(run, bf16_corpus, *common, "precision=bf16", "max_steps=4", ranks=2)
    proc = train(run, bf16_corpus, *common, "precision=fp32", "max_steps=6", ranks=2)
    assert "(2 ranks, ZeRO-2, bf16) on 2 ranks at ZeRO-2, fp32 through a universal" in proc.stdout
    curve = losses(run)
    assert sorted(curve) == list(range(1, 7))
    assert curve[5] == pytest.approx(losses(tmp_path / "straight")[5], rel=1e-3)
    state = json.loads((run / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["precision"] == "fp32"


@pytest.mark.slow
def test_hydra_multirun_gives_each_job_its_own_run_dir(tmp_path, corpus):
    args = [
        f"data.path={corpus}",
        *SMALL,
        "max_steps=1",
        "eval_every=1",
        "export_hf=false",
        "optim.lr=1e-3,2e-3",
    ]
    proc = subprocess.run(
        [NEO, "train", "-m", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted(p.parent for p in (tmp_path / "runs" / "multirun").glob("*/*/metrics.jsonl"))
    assert [p.name for p in runs] == ["0", "1"]
    lrs = [next(r["lr"] for r in read_metrics(p) if "lr" in r) for p in runs]
    assert lrs[0] != lrs[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        ("deepspeed.activation_checkpointing=true", "precision=fp32"),
        ("deepspeed=zero2_offload", *BF16),
    ],
    ids=["activation-checkpointing", "zero2-cpu-offload"],
)
def test_engine_options_train(tmp_path, request, variant):
    corpus = request.getfixturevalue("bf16_corpus" if "precision=bf16" in variant else "corpus")
    run = tmp_path / "run"
    train(run, corpus, *variant, "max_steps=6", "eval_every=6", "save_every=6", "export_hf=false")
    curve = losses(run)
    assert sorted(curve) == list(range(1, 7)) and curve[6] < curve[1]


@pytest.mark.slow
def test_activation_checkpointing_changes_memory_not_numbers(tmp_path, corpus):
    common = ("precision=fp32", "max_steps=3", "eval_every=3", "save_every=3", "export_hf=false")
    train(tmp_path / "plain", corpus, *common)
    train(tmp_path / "ckpt", corpus, *common, "deepspeed.activation_checkpointing=true")
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "ckpt"), rel=1e-6)


@pytest.mark.slow
def test_blend_of_sources_by_weight(tmp_path, corpus):
    """data.blend mixes single sources of a prepared directory (the Pile's components)."""
    blend = (
        f"data.blend=[{{path:{corpus},source:Github,weight:3}},"
        f"{{path:{corpus},source:'Enron Emails',weight:1}}]"
    )
    run = tmp_path / "run"
    train(run, corpus, blend, "max_steps=3", "eval_every=3", "save_every=3", "export_hf=false")
    assert sorted(losses(run)) == [1, 2, 3]
    proc = train(
        tmp_path / "bad", corpus, f"data.blend=[{{path:{corpus},source:Nope}}]", check=False
    )
    assert proc.returncode == 2 and "no 'train' documents from source 'Nope'" in proc.stderr


@pytest.mark.slow
def test_benchmarks_run_at_every_validation_on_any_layout(tmp_path, corpus):
    """eval.tasks during training: the same numbers from 1 rank, 2 ranks splitting the items
    (ZeRO-2) and 2 ranks running every forward together (ZeRO-3), logged with the validation
    loss at every eval_every."""
    mc = tmp_path / "mc.jsonl"
    words = ["cat", "dog", "house", "tree", "river", "stone", "light", "music"]
    mc.write_text(
        "".join(
            json.dumps(
                {
                    "query": f"The {words[i % 8]} and the",
                    "gold": i % 3,
                    "choices": [words[(i + k) % 8] for k in range(3)],
                }
            )
            + "\n"
            for i in range(24)
        )
    )
    common = (
        "precision=fp32",
        "max_steps=4",
        "eval_every=2",
        "save_every=4",
        "eval.tasks=[mine]",
        f"+eval.task.mine={{type: mc, path: {mc}}}",
        "eval.limit=12",
        "eval.batch_tokens=256",
        "export_hf=false",
    )
    runs = {
        "one": train(tmp_path / "one", corpus, "deepspeed=zero2", *common, ranks=1),
        "zero2": train(tmp_path / "zero2", corpus, "deepspeed=zero2", *common, ranks=2),
        "zero3": train(tmp_path / "zero3", corpus, "deepspeed=zero3", *common, ranks=2),
    }
    values = {}
    for name in runs:
        records = [r for r in read_metrics(tmp_path / name) if "val/loss" in r]
        assert [r["step"] for r in records] == [2, 4]
        values[name] = records[-1]
        for key in ("mine/acc", "mine/acc_norm", "val/loss", "val/perplexity", "val/bits_per_byte"):
            assert key in values[name], (name, key)
    assert "mine/acc" in runs["one"].stdout + runs["one"].stderr  # on the validation line
    for name in ("zero2", "zero3"):
        assert values[name]["val/loss"] == pytest.approx(values["one"]["val/loss"], rel=1e-4)
        assert values[name]["mine/acc"] == values["one"]["mine/acc"]


def test_a_missing_benchmark_file_stops_training_before_it_starts(tmp_path, corpus):
    proc = train(
        tmp_path / "run", corpus, "eval.tasks=[hellaswag]", f"eval.data_dir={tmp_path}", check=False
    )
    assert proc.returncode == 2
    assert "task hellaswag: " in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_last_validation_is_what_neo_eval_gives_on_the_final_model(tmp_path, corpus):
    """The trainer's validation is neo eval's val task: the same documents (here a seeded
    sample, eval_tokens below the split's size) and the same numbers, overall and per source."""
    run = tmp_path / "run"
    proc = train(run, corpus, "precision=fp32", "eval_every=4", "eval_tokens=3000")
    assert "validation: " in proc.stdout and "a seeded sample, eval_tokens=3,000" in proc.stdout
    last = [r for r in read_metrics(run) if "val/loss" in r][-1]
    sources = {k.split("/")[1] for k in last if k.startswith("val/") and k.count("/") == 2}
    assert len(sources) >= 2, last  # the corpus's validation split has several sources
    out = tmp_path / "eval"
    subprocess.run(
        [
            NEO,
            "eval",
            f"checkpoint={run / 'model'}",
            "tasks=[val]",
            f"task.val.path={corpus}",
            "val_tokens=3000",
            f"output={out}",
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    val = json.loads((out / "results.json").read_text())["results"]["val"]
    assert val["metrics"]["loss"] == pytest.approx(last["val/loss"], rel=1e-5)
    assert val["metrics"]["bits_per_byte"] == pytest.approx(last["val/bits_per_byte"], rel=1e-5)
    assert set(val["per_source"]) == sources
    for source in sources:
        assert val["per_source"][source]["loss"] == pytest.approx(
            last[f"val/{source}/loss"], rel=1e-5
        )


@pytest.mark.slow
def test_muon_trains_and_resumes_exactly(tmp_path, corpus):
    """optim.name=muon: stopped at step 3 and resumed to 6, the losses equal a straight run's,
    bit for bit (Muon's momentum and AdamW's moments come back from the checkpoint); and it
    learns (the loss falls)."""
    common = ("optim.name=muon", "precision=fp32", "save_every=3", "eval_every=100")
    common += ("optim.decay=40", "export_hf=false")  # the schedule's length, the same for both runs
    train(tmp_path / "straight", corpus, *common, "max_steps=6")
    train(tmp_path / "resumed", corpus, *common, "max_steps=3")
    train(tmp_path / "resumed", corpus, *common, "max_steps=6")
    straight = losses(tmp_path / "straight")
    assert losses(tmp_path / "resumed") == straight
    assert straight[6] < straight[1] - 0.5


@pytest.mark.slow
def test_compile_trains_the_eager_model_and_resumes_exactly(tmp_path, corpus):
    """compile=true (each block compiled by inductor, in place): the eager run's losses up to
    the fused kernels' rounding, the same state dict (the run ends with a consolidated
    checkpoint whose names the eager model loads), and a run stopped at step 2 resumes to the
    straight compiled run's losses, bit for bit (the resumed process compiles the same
    kernels)."""
    common = ("precision=fp32", "save_every=2", "eval_every=100", "optim.decay=40")
    train(tmp_path / "eager", corpus, *common, "max_steps=4", "export_hf=false")
    compiled = (*common, "compile=true")
    train(tmp_path / "straight", corpus, *compiled, "max_steps=4")
    train(tmp_path / "resumed", corpus, *compiled, "max_steps=2", "export_hf=false")
    proc = train(tmp_path / "resumed", corpus, *compiled, "max_steps=4", "export_hf=false")
    assert "resumed from" in proc.stdout + proc.stderr
    straight, eager = losses(tmp_path / "straight"), losses(tmp_path / "eager")
    assert losses(tmp_path / "resumed") == straight
    for step in eager:
        assert straight[step] == pytest.approx(eager[step], rel=1e-4), (step, eager, straight)
    assert straight != eager  # it did compile: the fused kernels round otherwise
    model = load_model(tmp_path / "straight" / "model")
    assert not any("_orig_mod" in name for name in model.state_dict())
    assert (tmp_path / "straight" / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_muon_under_zero_on_two_ranks_trains_the_model_of_one(tmp_path, corpus):
    """Muon on every layout: ZeRO-0 (our MuonAdamW; DeepSpeed all-reduces the gradients) and
    ZeRO-2/3 (DeepSpeed's Muon, which gathers each matrix from its partitions) on two ranks
    give one rank's losses; and DeepSpeed's Muon (Newton-Schulz in its "gram" form) trains as
    ours does (no clipping on either side: under ZeRO DeepSpeed's norm covers Muon's updates).
    Under ZeRO-3 a run stopped at step 3 resumes to the straight run's losses, bit for bit (its
    Muon momenta are partitioned like its weights)."""
    common = ("optim.name=muon", "optim.grad_clip=0", "precision=fp32", "optim.decay=40")
    common += ("optim.ns_precision=fp32", "eval_every=100", "export_hf=false")
    runs = {
        ("zero0", 1): None,
        ("zero0", 2): None,
        ("zero2", 1): None,
        ("zero2", 2): None,
        ("zero3", 2): None,
    }
    for stage, ranks in runs:
        run = tmp_path / f"{stage}-{ranks}"
        train(
            run, corpus, *common, f"deepspeed={stage}", "max_steps=6", "save_every=100", ranks=ranks
        )
        runs[stage, ranks] = losses(run)
    resumed = tmp_path / "zero3-resumed"
    for steps in (3, 6):
        proc = train(
            resumed,
            corpus,
            *common,
            "deepspeed=zero3",
            f"max_steps={steps}",
            "save_every=3",
            ranks=2,
        )
    assert "resumed from" in proc.stdout + proc.stderr
    assert losses(resumed) == runs["zero3", 2]
    ours, deepspeed = runs["zero0", 1], runs["zero2", 1]
    for step in ours:
        assert runs["zero0", 2][step] == pytest.approx(ours[step], rel=1e-5), step
        for layout in (("zero2", 2), ("zero3", 2)):
            assert runs[layout][step] == pytest.approx(deepspeed[step], rel=1e-5), (layout, step)
        # two implementations of one update: equal to a few parts in 1e4 (gram vs plain NS)
        assert deepspeed[step] == pytest.approx(ours[step], rel=2e-3), (step, ours, deepspeed)
    assert ours[6] < ours[1] - 0.3


@pytest.mark.slow
@pytest.mark.parametrize("stage, ranks", [(2, 2), (0, 1)])
def test_deepspeeds_muon_resumes_exactly(tmp_path, bf16_corpus, stage, ranks):
    """DeepSpeed's Muon (ZeRO-2 on two ranks; bf16 at ZeRO-0, the GPU default's layout, where
    DeepSpeed's bf16 optimizer clips the gradients and then applies Muon): stopped at step 3
    and resumed to 6, the losses equal a straight run's, bit for bit."""
    common = ("optim.name=muon", f"deepspeed=zero{stage}", *BF16, "save_every=3")
    common += ("eval_every=100", "optim.decay=40", "export_hf=false")
    train(tmp_path / "straight", bf16_corpus, *common, "max_steps=6", ranks=ranks)
    run = tmp_path / "resumed"
    train(run, bf16_corpus, *common, "max_steps=3", ranks=ranks)
    proc = train(run, bf16_corpus, *common, "max_steps=6", ranks=ranks)
    output = proc.stdout + proc.stderr
    assert "resumed from" in output
    # Under ZeRO, DeepSpeed's gradient norm is taken over Muon's updates: said (once, not by
    # every rank), not reported ("n/a" in the step lines, null in the metrics).
    not_applied = "optim.grad_clip=1 is not applied and grad norm is not reported"
    assert output.count(not_applied) == (stage > 0), output
    assert ("grad norm n/a" in output) is (stage > 0) and "grad norm nan" not in output, output
    norms = [r["grad_norm"] for r in read_metrics(run) if "grad_norm" in r]
    assert all(n is None for n in norms) if stage else all(0 < n < 100 for n in norms), norms
    straight = losses(tmp_path / "straight")
    assert losses(run) == straight
    assert straight[6] < straight[1] - 0.5
