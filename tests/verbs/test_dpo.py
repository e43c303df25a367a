"""`neo dpo` for real (DeepSpeed over gloo on CPU), its config rules, its batches and the
stored reference log-probabilities."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NEO, tiny_config
from pairs import kill_after_step, values_by_step
from safetensors.torch import load_file

from data_prep.tokenizers import load_tokenizer
from train.config import compose
from train.config.dpo import DpoConfig
from train.config.resolve import World, resolve_dpo
from train.data.dpo import BUNDLED, PairBatches
from train.data.packing import RowStream
from train.data.preference import read_pairs
from train.errors import CheckpointError, ConfigError
from train.loop import reference
from train.loop.metrics import read_metrics
from train.model.preference import METRICS

SMALL = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.attention_types=[[[global,local],1]]",
    "logger.log_every=1",
    "logger.wandb.mode=disabled",
    "samples=1",
    "sample_max_new_tokens=8",
]


def dpo(cwd: Path, *overrides: str, check=True, ranks=1, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cwd.mkdir(parents=True, exist_ok=True)
    command = [NEO, "dpo"]
    if ranks > 1:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--standalone", f"--nproc_per_node={ranks}", "-m", "train.cli", "dpo"]
    if not wait:
        return subprocess.Popen(
            [*command, *SMALL, *overrides],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    proc = subprocess.run(
        [*command, *SMALL, *overrides], cwd=cwd, env=env, capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"neo dpo failed\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_no_arguments_tunes_on_the_bundled_pairs_with_trls_metric_names(tmp_path):
    """In a directory without the demo's models: a fresh tiny model, its own reference, on the
    bundled pairs; TRL's metric names on training steps and (as val/...) on the held-out pairs,
    whose reward accuracy rises well above chance."""
    proc = dpo(tmp_path, "max_steps=24", "eval_every=8", "optim.lr=1e-4")
    output = proc.stdout + proc.stderr
    assert "base=runs/demo-sft does not exist (`make demo` makes it), nor runs/demo" in output
    assert "360 training and 40 validation pairs (0 skipped, 0 cut to the context)" in output
    run = tmp_path / "runs" / "dpo-tiny"
    assert (run / reference.REFERENCE_FILE).is_file()
    assert (run / "model").is_dir() and (run / "hf").is_dir()
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 25))
    for r in steps:
        assert set(METRICS) <= set(r)
    # the reference is the policy's start, in the same precision: rewards start at exactly 0
    assert steps[0]["rewards/chosen"] == steps[0]["rewards/rejected"] == 0.0
    assert steps[0]["rewards/accuracies"] == 0.0  # no pair has chosen > rejected yet
    validations = [r for r in records if "val/rewards/accuracies" in r]
    assert [r["step"] for r in validations] == [0, 8, 16, 24]  # the base first, before step 1
    answers = {f"val/answers/{k}" for k in ("closer_to_chosen", "closer_to_rejected", "distinct")}
    for r in validations:
        assert {"val/loss", *(f"val/{m}" for m in METRICS), *answers} <= set(r)
    assert validations[0]["val/rewards/chosen"] == validations[0]["val/rewards/rejected"] == 0.0
    assert validations[-1]["val/rewards/accuracies"] >= 0.65
    assert validations[-1]["val/rewards/margins"] > validations[1]["val/rewards/margins"] > 0
    assert validations[-1]["val/loss"] < validations[1]["val/loss"] < np.log(2)


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["false", "true"])
def test_kill_and_resume_is_exact_and_reads_the_reference(tmp_path, packing):
    """SIGKILLed after step 4 (last checkpoint: step 3) and run again: the same losses, rewards
    and validation metrics as 6 steps at once, bit for bit; the reference log-probabilities
    are read back, the file untouched, never computed again. Either layout: the reference
    scored in it, so step 1's rewards are exactly 0."""
    common = ["max_steps=6", "save_every=3", "eval_every=3", "optim.lr=1e-4"]
    common.append(f"dpo.packing={packing}")
    dpo(tmp_path / "straight", *common)
    proc = dpo(tmp_path / "killed", *common, wait=False)
    run = tmp_path / "killed" / "runs" / "dpo-tiny"
    kill_after_step(proc, run / "metrics.jsonl", 4, poll=0.2)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    stored = run / reference.REFERENCE_FILE
    before = (stored.stat().st_mtime_ns, stored.stat().st_ino, stored.read_bytes())
    again = dpo(tmp_path / "killed", *common)
    output = again.stdout + again.stderr
    assert f"reference log-probabilities: read from {stored}" in output
    assert "computed from the base" not in output
    assert (stored.stat().st_mtime_ns, stored.stat().st_ino, stored.read_bytes()) == before

    keys = ("loss", *METRICS, "val/loss", *(f"val/{m}" for m in METRICS))
    straight = values_by_step(tmp_path / "straight" / "runs" / "dpo-tiny", keys)
    resumed = values_by_step(run, keys)
    assert sorted(straight) == [0, 1, 2, 3, 4, 5, 6]  # 0: the validation before step 1
    assert straight[1]["rewards/chosen"] == straight[1]["rewards/rejected"] == 0.0
    assert resumed == straight  # bit for bit (step 4, logged before the kill, logged again)


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["false", "true"])
def test_one_and_two_ranks_and_zero3_give_the_same_run(tmp_path, packing):
    """ZeRO-0 on one rank, ZeRO-2 (padded only: the layout is not the engine's business) and
    ZeRO-3 on two: the same losses, rewards and validation metrics (within fp32 reduction
    order). On two ranks each scores half the reference, and the stored log-probabilities
    equal one rank's bit for bit. fp32 pinned: precision=auto is bf16 on a CPU with native bf16,
    where the layouts' losses differ by bf16's reduction order (3e-4 at step 2)."""
    common = ["max_steps=4", "eval_every=2", "optim.lr=1e-4", "export_hf=false", "precision=fp32"]
    common.append(f"dpo.packing={packing}")
    runs = {"one": dpo(tmp_path / "one", *common)}
    if packing == "false":
        runs["zero2"] = dpo(tmp_path / "zero2", *common, "deepspeed=zero2", ranks=2)
    runs["zero3"] = dpo(tmp_path / "zero3", *common, "deepspeed=zero3", ranks=2)
    assert (runs["zero3"].stdout + runs["zero3"].stderr).count("from the base on 2 ranks") == 1
    stored = {name: read_reference(tmp_path / name / "runs" / "dpo-tiny") for name in runs}
    for name in set(runs) - {"one"}:
        assert stored[name].keys() == stored["one"].keys() == {"train", "validation"}
        for split, logps in stored["one"].items():
            assert torch.equal(stored[name][split], logps), (name, split)

    def values(name):
        return [
            r
            for r in read_metrics(tmp_path / name / "runs" / "dpo-tiny")
            if "step" in r and ("loss" in r or "val/loss" in r)
        ]

    one = values("one")
    assert [r["step"] for r in one] == [0, 1, 2, 2, 3, 4, 4]
    for name in set(runs) - {"one"}:
        other = values(name)
        assert [r["step"] for r in other] == [r["step"] for r in one]
        for a, b in zip(one, other, strict=True):
            for key in ("loss", "val/loss", "rewards/accuracies", "val/rewards/accuracies"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-5), (name, key, a, b)
            for key in ("rewards/margins", "val/rewards/margins", "rewards/chosen"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], abs=1e-5), (name, key, a, b)


def read_reference(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / reference.REFERENCE_FILE)


def test_the_ranks_shares_of_the_reference_add_up_to_one_ranks_scores():
    """reference.score on rank r of n scores micro-batches r, r + n, ... and leaves zeros
    elsewhere: the shares sum to the one-rank scores bit for bit (each pair is scored in the
    same micro-batch on any world size), for a share count that divides the batches or not,
    in file order or in the training's first-epoch order (each score stored at its pair)."""
    from train.model.gpt import GPT

    tokenizer = load_tokenizer("gpt2")
    pairs = read_pairs(str(BUNDLED), tokenizer, 64).pairs[:11]
    config = tiny_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    weights = GPT(config).init_weights(torch.Generator().manual_seed(0)).state_dict()
    epoch = RowStream(pairs, 1234).order(0)
    assert sorted(epoch) == list(range(11)) and epoch != sorted(epoch)

    def scores(rank, world, order=None):
        cpu = torch.device("cpu")
        return reference.score(
            config, weights, pairs, cpu, torch.float32, 2, 50256, rank, world, order=order
        )

    for order in (None, epoch):
        whole = scores(0, 1, order)
        assert whole.shape == (11, 2) and (whole < 0).all()
        for world in (2, 3):
            shares = [scores(rank, world, order) for rank in range(world)]
            assert all((share == 0).any(dim=1).sum() > 0 for share in shares)  # each a part only
            assert torch.equal(sum(shares), whole), world
    # in fp32 a pair's score hardly depends on its micro-batch: each is stored at its own pair
    torch.testing.assert_close(scores(0, 1, epoch), scores(0, 1), rtol=1e-5, atol=1e-4)


def test_a_resume_without_the_stored_reference_or_with_other_pairs_stops(tmp_path):
    tokenizer = load_tokenizer("gpt2")
    pairs = read_pairs(str(BUNDLED), tokenizer, 256).pairs[:6]
    splits = {"train": pairs[:4], "validation": pairs[4:]}
    with pytest.raises(CheckpointError, match="reference_logps.safetensors is missing"):
        reference.load(tmp_path, splits)
    logps = {"train": torch.randn(4, 2), "validation": torch.randn(2, 2)}
    reference.save(tmp_path, splits, logps)
    loaded = reference.load(tmp_path, splits)
    assert all(torch.equal(loaded[k], logps[k]) for k in logps)
    other = {"train": pairs[1:5], "validation": pairs[4:]}
    with pytest.raises(CheckpointError, match="computed for other train pairs"):
        reference.load(tmp_path, other)
    assert [p.name for p in tmp_path.iterdir()] == [reference.REFERENCE_FILE]  # no temp left


class Sources:
    def __init__(self, pairs=100, used_base=None):
        self.pairs, self.used_base = pairs, used_base

    def base_model(self):
        return None

    def tokenizer_size(self):
        return 50257

    def training_rows(self, cfg):
        return self.pairs


def test_config_rules():
    cpu = World()
    assert resolve_dpo(DpoConfig(), cpu, Sources(100)).cfg.max_steps == 13  # one epoch of 8
    cases = [
        (dict(beta=0.0), "dpo.beta=0.0 must be > 0"),
        (dict(loss_type="kto"), "dpo.loss_type='kto' is not one of sigmoid, ipo, hinge, robust"),
        (
            dict(label_smoothing=0.1),
            "dpo.label_smoothing=0.1 is not read: dpo.loss_type=sigmoid has no label smoothing",
        ),
        (
            dict(loss_type="robust", label_smoothing=0.5),
            "dpo.label_smoothing=0.5 must be in [0, 0.5) for dpo.loss_type=robust",
        ),
        (dict(validation_fraction=1.0), "dpo.validation_fraction=1.0 must be in [0, 1)"),
        (dict(style_prompts=-1), "dpo.style_prompts=-1 must be >= 0"),
    ]
    for values, message in cases:
        cfg = DpoConfig()
        for k, v in values.items():
            setattr(cfg.dpo, k, v)
        with pytest.raises(ConfigError) as e:
            resolve_dpo(cfg, cpu, Sources())
        assert str(e.value).startswith(message)
    robust = DpoConfig()
    robust.dpo.loss_type, robust.dpo.label_smoothing = "robust", 0.1
    assert resolve_dpo(robust, cpu, Sources()).cfg.dpo.label_smoothing == 0.1
    with pytest.raises(ConfigError, match="run_dir=runs/x holds base=runs/x/sft"):
        resolve_dpo(DpoConfig(base="runs/x/sft", run_dir="runs/x"), cpu, Sources())


def test_the_demo_model_read_instead_of_the_missing_sft_one_is_not_overwritten():
    """Without runs/demo-sft, neo dpo tunes runs/demo: a run_dir holding runs/demo is refused
    as it would be had base=runs/demo been given."""
    sources = Sources(used_base="runs/demo")
    assert resolve_dpo(DpoConfig(run_dir="runs/dpo"), World(), sources).cfg.base == "runs/demo"
    for run_dir in ("runs", "runs/demo"):
        with pytest.raises(ConfigError, match=f"run_dir={run_dir} holds base=runs/demo"):
            resolve_dpo(DpoConfig(run_dir=run_dir), World(), sources)


@pytest.mark.parametrize(
    "key, message",
    [
        ("sft.path=x", "sft.path is not a key of neo dpo: neo dpo reads preference pairs"),
        ("dpo.betta=0.2", "dpo.betta is not a key of neo dpo: did you mean dpo.beta?"),
        ("head=classification", "head is not a key of neo dpo"),
    ],
)
def test_keys_neo_dpo_does_not_read_are_refused(key, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        compose.compose("dpo", [key])


def test_lora_keys_without_lora_are_refused():
    cfg = compose.to_schema(compose.compose("dpo", ["lora.alpha=32", "run_dir=r"]))
    with pytest.raises(ConfigError, match="lora.alpha=32.0 is not read: LoRA is off"):
        resolve_dpo(cfg, World(), Sources())


def test_unknown_key_on_the_command_line_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [NEO, "dpo", "dpo.beta=0.1", "dpo.label_smoothing=0.2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "neo dpo: error: dpo.label_smoothing=0.2 is not read: dpo.loss_type=sigmoid has no "
        "label smoothing (TRL 1.16: only its robust loss reads it; dpo.loss_type=robust)"
    ]
    assert not (tmp_path / "runs").exists()  # nothing left behind


def test_a_steps_pairs_do_not_depend_on_the_world_size():
    tokenizer = load_tokenizer("gpt2")
    pairs = read_pairs(str(BUNDLED), tokenizer, 256).pairs[:40]
    one = PairBatches(pairs, 7, 0, 1, 2, 4, tokenizer.eod_id)
    two = [PairBatches(pairs, 7, r, 2, 2, 2, tokenizer.eod_id) for r in range(2)]
    for step in range(3):
        seen_one = [p.where for m in range(4) for p in one.items(step, m)]
        seen_two = [p.where for m in range(2) for b in two for p in b.items(step, m)]
        assert sorted(seen_one) == sorted(seen_two) and len(set(seen_one)) == 8
        assert one.targets_in_step(step) == 8  # pairs: the loss is their mean
        batch = one.micro_batch(step, 0)
        first = one.items(step, 0)
        assert batch["input_ids"].shape[0] == 4  # 2 chosen rows, then 2 rejected
        assert list(batch["input_ids"][0][: len(first[0].chosen)]) == first[0].chosen
        assert list(batch["input_ids"][2][: len(first[0].rejected)]) == first[0].rejected
        lengths = [max(len(p.chosen), len(p.rejected)) for p in first]
        assert batch["input_ids"].shape[1] == max(lengths)
    assert json.dumps(one.tokens_in_step(0)) == json.dumps(
        sum(2 * 2 * max(max(len(p.chosen), len(p.rejected)) for p in g) for g in one.step_groups(0))
    )


@pytest.mark.slow
def test_lora_trains_adapters_against_the_base_as_reference(tmp_path):
    """lora.r=4: the reference is the base (the model with its adapters off), so the rewards
    of step 1 are exactly 0; only the adapters train, the base's files are untouched, and the
    run ends with peft's adapters and the merged model."""
    from train.checkpoints.model_format import save_checkpoint
    from train.model.gpt import GPT

    tokenizer = load_tokenizer("gpt2")
    config = DpoConfig().model
    config.hidden_size, config.num_layers = 64, 2
    config.attention_types = [[["global", "local"], 1]]
    base = tmp_path / "base"
    model = GPT(config.validate()).init_weights(torch.Generator().manual_seed(3))
    save_checkpoint(base, config, model.state_dict(), tokenizer)
    before = {f.name: f.read_bytes() for f in base.iterdir() if f.is_file()}
    proc = dpo(
        tmp_path / "work",
        f"base={base}",
        "lora.r=4",
        "max_steps=3",
        "optim.lr=1e-3",
        "eval_every=3",
    )
    output = proc.stdout + proc.stderr
    assert "LoRA r=4 on q_proj/v_proj" in output and "trainable" in output
    run = tmp_path / "work" / "runs" / "dpo-tiny"
    steps = [r for r in read_metrics(run) if "loss" in r]
    assert steps[0]["rewards/chosen"] == steps[0]["rewards/rejected"] == 0.0
    assert steps[-1]["rewards/margins"] != 0.0  # the adapters moved the policy
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "model").is_dir() and (run / "hf").is_dir()
    assert {f.name: f.read_bytes() for f in base.iterdir() if f.is_file()} == before


def test_pairs_without_a_prompt_are_not_asked_for_greedy_answers(tmp_path):
    """An implicit prompt can be empty (the responses differ from their first character; TRL
    takes such pairs): the validation's greedy answers skip them instead of failing the run
    ("every prompt needs at least one token") at its first validation."""
    from conftest import tiny_config

    from train.data.dpo import answer_examples
    from train.loop.evaluators import Answers, AnswerStyle, EvalContext
    from train.model.gpt import GPT

    tokenizer = load_tokenizer("gpt2")
    records = [{"chosen": f"Yes {i}", "rejected": f"No {i}"} for i in range(3)]
    records.insert(1, {"prompt": "Q:", "chosen": " yes", "rejected": " no"})
    file = tmp_path / "pairs.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = read_pairs(str(file), tokenizer, 64).pairs
    assert [p.prompt_length for p in pairs] == [0, 2, 0, 0]
    model = GPT(tiny_config(vocab_size=tokenizer.vocab_size)).init_weights().eval()
    ctx = EvalContext(model, torch.device("cpu"), 0, 1, True, False)
    report = Answers(answer_examples(pairs, 3), tokenizer, 4)(ctx)
    assert [s["prompt"] for s in report.samples] == ["Q:"]
    # nor for the style of answers: the one pair with a prompt, its responses without the
    # end-of-text token
    style = AnswerStyle(pairs, tokenizer, 4, limit=3)
    assert [tokenizer.decode(p) for p in style.prompts] == ["Q:"]
    assert (style.chosen, style.rejected) == ([" yes"], [" no"])
    metrics = style(ctx).metrics
    assert set(metrics) == {
        f"val/answers/{k}"
        for k in ("closer_to_chosen", "closer_to_rejected", "rouge_l_chosen", "rouge_l_rejected")
    } | {"val/answers/distinct", "val/answers/loops"}
    assert metrics["val/answers/distinct"] == 1.0


def test_a_validation_file_without_a_usable_pair_is_refused(tmp_path):
    """It trained without any validation before, saying only that every record was skipped."""
    from train.data.dpo import read_preference
    from train.data.finetune import BUNDLED_CLASSIFICATION

    cfg = compose.to_schema(
        compose.compose("dpo", ["run_dir=r", f"dpo.validation_path={BUNDLED_CLASSIFICATION}"])
    )
    with pytest.raises(ConfigError) as e:
        read_preference(cfg, load_tokenizer("gpt2"))
    assert str(e.value).startswith(
        f"dpo.validation_path={BUNDLED_CLASSIFICATION}: no usable validation pair (1200 "
        f"skipped, the first: {BUNDLED_CLASSIFICATION}:1: 'chosen' and 'rejected' must"
    ), str(e.value)


@pytest.mark.slow
def test_bf16_rewards_of_step_1_are_exactly_0(tmp_path, bf16_corpus):
    """precision=bf16 (the 512-token vocabulary: bf16 is emulated on this CPU): the reference is
    scored in the micro-batches step 1 trains on, so the policy's first log-probabilities are
    the reference's bit for bit (a sequence's bf16 score depends on the length its micro-batch
    is padded to: scored in file order, step 1's rewards were 1e-5 to 1e-4 off 0), as the
    validation's before step 1 are."""
    from train.checkpoints.model_format import save_checkpoint
    from train.model.gpt import GPT

    tokenizer = load_tokenizer(str(bf16_corpus / "tokenizer"))
    config = DpoConfig().model
    config.hidden_size, config.num_layers, config.vocab_size = 64, 2, 512
    config.attention_types, config.max_position_embeddings = [[["global", "local"], 1]], 256
    model = GPT(config.validate()).init_weights(torch.Generator().manual_seed(3))
    save_checkpoint(tmp_path / "base", config, model.state_dict(), tokenizer)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(Path(BUNDLED).read_text().splitlines(keepends=True)[:20]))
    dpo(
        tmp_path / "work",
        f"base={tmp_path / 'base'}",
        f"dpo.path={pairs}",
        "dpo.validation_fraction=0.2",
        "precision=bf16",
        "micro_batch_size=2",
        "global_batch_size=4",
        "max_steps=1",
        "export_hf=false",
        "dpo.style_prompts=0",
        "samples=0",
    )
    records = read_metrics(tmp_path / "work" / "runs" / "dpo-tiny")
    first = [r for r in records if "loss" in r][0]
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    start = [r for r in records if r.get("step") == 0 and "val/loss" in r][0]
    assert start["val/rewards/chosen"] == start["val/rewards/rejected"] == 0.0
