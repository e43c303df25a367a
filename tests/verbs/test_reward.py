"""`neo sft head=reward`: a reward model on preference pairs. Reading the pairs, the config
rules and one-line errors, and for real (DeepSpeed over gloo on CPU): training on the bundled
pairs, the export transformers scores as we do, one and two ranks, and an exact resume.
(The loss and metrics against TRL's RewardTrainer: tests/model/test_reward_vs_trl.py.)"""

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import NEO
from pairs import kill_after_step, values_by_step
from test_sft import losses, sft
from transformers import GPTNeoForSequenceClassification

from data_prep.tokenizers import load_tokenizer
from train.checkpoints.load import read_any, read_head
from train.config import compose
from train.config.resolve import World, resolve_sft
from train.data.finetune import BUNDLED_CLASSIFICATION, BUNDLED_PAIRS
from train.data.records import BadItem
from train.data.reward import collate_rewards, read_reward_pairs, score_position
from train.errors import ConfigError
from train.loop.metrics import read_metrics
from train.model.reward import METRICS, RewardGPT

REWARD = ("head=reward", "sft.validation_fraction=0.2", "optim.lr=1e-4")


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def test_pairs_are_whole_texts_closed_once_and_over_long_ones_skipped(tmp_path, gpt2):
    eod = gpt2.eod_id
    data = write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green", "margin": 2},
            {"chosen": "Q: ok? A: yes", "rejected": "Q: ok? A: no"},  # the implicit prompt
            {"prompt": "Q:", "chosen": " a" * 40, "rejected": " b"},  # 43 tokens: too long
            {"prompt": "Q:", "chosen": " a", "rejected": " b", "margin": "big"},
            {"text": "a classification record", "label": "x"},
            {"prompt": "Q:", "chosen": " a", "rejected": " b", "margin": float("nan")},
        ],
    )
    read = read_reward_pairs(str(data), gpt2, 32)
    first, second = read.examples
    assert first.chosen == gpt2.encode("Q: sky? A: blue") + [eod]
    assert first.rejected == gpt2.encode("Q: sky? A: green") + [eod]
    assert first.margin == 2.0 and second.margin == 0.0
    assert second.chosen == gpt2.encode("Q: ok? A: yes") + [eod]
    assert read.skipped.count == 4 and read.truncated == 0
    reasons = read.skipped.examples
    assert len(gpt2.encode("Q:" + " a" * 40)) + 1 == 43
    assert reasons[0] == (
        f"{data}:3: 43 tokens, longer than the 32-token context (a reward model's pairs are "
        "skipped, not cut, as TRL filters them)"
    )
    assert reasons[1] == f"{data}:4: 'margin' must be a finite number (got 'big')"
    assert reasons[2].startswith(f"{data}:5: 'chosen' and 'rejected' must both be strings")
    assert reasons[3] == f"{data}:6: 'margin' must be a finite number (got nan)"
    with pytest.raises(BadItem, match=f"{data}:3: 43 tokens.*strict=true stops"):
        read_reward_pairs(str(data), gpt2, 32, strict=True)

    arrays = collate_rewards([first, second], eod)
    rows = [first.chosen, second.chosen, first.rejected, second.rejected]
    assert arrays["input_ids"].shape == (4, max(map(len, rows)))
    assert arrays["score_at"].tolist() == [len(r) - 2 for r in rows]  # before the end-of-text
    assert arrays["margin"].tolist() == [2.0, 0.0]
    assert score_position([5, 6, eod, eod], eod) == 1
    assert score_position([eod, 7, eod], eod) == 1
    assert score_position([eod, eod], eod) == 0  # as transformers' argmax of an empty mask


def test_the_score_is_read_before_the_padding_and_the_loss_is_bradley_terry():
    from conftest import tiny_config

    from train.model.heads import TaskHead

    config = tiny_config()
    model = RewardGPT(config, TaskHead("reward", [], {}, {}), center=0.5).init_weights().eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)
    ids = torch.randint(1, config.vocab_size, (4, 10))
    at = torch.tensor([9, 4, 6, 2])
    margin = torch.tensor([0.5, -1.0])
    with torch.no_grad():
        rewards = model.rewards(ids, at)
        alone = [
            model.score(model.hidden_states(ids[i, None, : at[i] + 1]))[0, -1, 0] for i in range(4)
        ]
        torch.testing.assert_close(rewards, torch.stack(alone), atol=1e-5, rtol=1e-5)
        out = model(ids, at, margin)
    c, r = rewards[:2], rewards[2:]
    expected = -torch.nn.functional.logsigmoid(c - r - margin) + 0.5 * (c + r) ** 2
    torch.testing.assert_close(out.total, expected.sum(), atol=1e-5, rtol=1e-5)
    assert out.sums.tolist() == pytest.approx(
        [float((c > r).sum()), float((c - r).sum()), float((c + r).sum() / 2)], abs=1e-5
    )
    assert METRICS == ("accuracy", "margin", "mean_reward")  # TRL's names


class Sources:
    def base_model(self):
        return None

    def tokenizer_size(self):
        return 50257

    def training_rows(self, cfg):
        return 80


def resolved(*overrides):
    cfg = compose.to_schema(compose.compose("sft", ["run_dir=r", *overrides]))
    return resolve_sft(cfg, World(), Sources()).cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["head.lm_coef=1.0"], "head.lm_coef=1.0 is not read: head=reward scores preference pairs"),
        (["head.special_tokens=map"], "head.special_tokens=map is not read: head=reward"),
        (["head.tokens.start=S"], r"head.tokens=\{...\} is not read: head=reward"),
        (["head.fields.text=body"], "head.fields.text=body is not read: head=reward"),
        (["sft.format=chat"], "sft.format=chat is not read: head=reward reads preference pairs"),
        (["sft.packing=false"], "sft.packing=False is not read: head=reward"),
        (["lora.r=4", "lora.merge=false"], "lora.merge=false with head=reward: the head is"),
        (
            ["head.center_rewards_coefficient=-0.1"],
            r"head.center_rewards_coefficient=-0.1 must be >= 0 \(or null\)",
        ),
        (
            ["head.center_rewards_coefficient=nan"],
            "head.center_rewards_coefficient=nan must be >= 0",
        ),
        (["head.fields.chosen=prompt"], "head.fields prompt, chosen, rejected = "),
    ],
)
def test_keys_a_reward_model_does_not_read_or_cannot_take_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolved("head=reward", *overrides)


def test_gpt1_heads_refuse_the_reward_keys_and_the_reward_head_reads_its_own():
    with pytest.raises(ConfigError, match="head.center_rewards_coefficient=0.01 is not read"):
        resolved("head=classification", "head.center_rewards_coefficient=0.01")
    with pytest.raises(ConfigError, match="head.fields.chosen=good is not read"):
        resolved("head=entailment", "head.fields.chosen=good")
    cfg = resolved(
        "head=reward",
        "head.center_rewards_coefficient=0.01",
        "head.fields.chosen=good",
        "sft.chat_template=neotrain",
        "lora.r=4",
    )
    assert cfg.head.type == "reward" and cfg.model.vocab_size == 50257  # no tokens added
    assert cfg.max_steps == 10  # one epoch of 80 pairs, 8 a step


def test_a_file_without_preference_pairs_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [NEO, "sft", "head=reward", f"sft.path={BUNDLED_CLASSIFICATION}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        f"neo sft: error: {BUNDLED_CLASSIFICATION}: no usable training example ("
    ), line
    assert f"the first: {BUNDLED_CLASSIFICATION}:1: 'chosen' and 'rejected' must both be" in line
    assert not (tmp_path / "runs").exists()  # nothing left behind


def test_a_validation_file_without_a_usable_pair_is_one_line_exit_2(tmp_path):
    """It ran without any validation before, saying only that every record was skipped."""
    proc = subprocess.run(
        [NEO, "sft", "head=reward", f"sft.validation_path={BUNDLED_CLASSIFICATION}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        f"neo sft: error: sft.validation_path={BUNDLED_CLASSIFICATION}: no usable validation "
        f"example (1200 skipped, the first: {BUNDLED_CLASSIFICATION}:1: 'chosen' and"
    ), line
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_trains_on_the_bundled_pairs_exports_and_verifies(tmp_path):
    """A fresh tiny model (no base) on the bundled pairs, 80 held out: TRL's metric names on
    steps and validations, held-out accuracy above chance, an export transformers scores as we
    do that `neo verify` passes, and a card that says what it is."""
    run = tmp_path / "run"
    proc = sft(run, *REWARD, "max_steps=48", "eval_every=16", "save_every=48")
    assert "320 training and 80 validation preference pairs" in proc.stdout + proc.stderr
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 48 and all(set(METRICS) <= set(r) for r in steps)
    validations = [r for r in records if "val/accuracy" in r]
    assert [r["step"] for r in validations] == [16, 32, 48]
    last = validations[-1]
    assert {"val/loss", "val/margin", "val/mean_reward"} <= set(last)
    assert last["val/accuracy"] > 0.5 and last["val/margin"] > 0 and last["val/loss"] < np.log(2)

    head = read_head(run / "model")
    assert head.type == "reward" and head.num_outputs == 1
    config, state, tokenizer = read_any(run / "model")
    ours = RewardGPT(config, head).eval()
    ours.load_state_dict(state)
    hf = GPTNeoForSequenceClassification.from_pretrained(run / "hf").eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tokenizer.eod_id
    pairs = read_reward_pairs(str(BUNDLED_PAIRS), tokenizer, config.max_position_embeddings)
    batch = collate_rewards(pairs.examples[:3], tokenizer.eod_id)
    ids = torch.from_numpy(batch["input_ids"])
    with torch.no_grad():
        expected = ours.rewards(ids, torch.from_numpy(batch["score_at"]))
        torch.testing.assert_close(hf(ids).logits[:, 0], expected, atol=1e-4, rtol=1e-4)

    verified = subprocess.run([NEO, "verify", str(run / "hf")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    card = (run / "hf" / "README.md").read_text()
    assert "A GPT-Neo style reward model" in card and "## Reward model" in card
    assert "- data: the bundled sample of preference pairs (task reward: chosen and" in card
    assert "- trained by `neo sft` from fresh weights" in card
    assert f"val/accuracy {last['val/accuracy']:.4f}" in card


@pytest.mark.slow
def test_one_and_two_ranks_give_the_same_run(tmp_path):
    common = (*REWARD, "max_steps=4", "eval_every=4", "deepspeed=zero2")
    sft(tmp_path / "one", *common)
    sft(tmp_path / "two", *common, ranks=2)

    def metrics(run):
        return {r["step"]: r for r in read_metrics(run) if "loss" in r or "val/loss" in r}

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert [a[s] for s in a] == pytest.approx([b[s] for s in a], rel=1e-5)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in ("accuracy", "margin", "val/loss", "val/accuracy", "val/margin"):
        x = [r[key] for r in one if key in r]
        assert x and x == pytest.approx([r[key] for r in two if key in r], abs=1e-5), key


@pytest.mark.slow
def test_kill_and_resume_is_exact(tmp_path):
    common = (*REWARD, "max_steps=10", "save_every=3", "eval_every=5")
    sft(tmp_path / "straight", *common)
    run = tmp_path / "killed"
    proc = sft(run, *common, wait=False)
    kill_after_step(proc, run / "metrics.jsonl", 4, poll=0.1)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest in ("step_00000003", "step_00000006")
    again = sft(run, *common)
    assert f"resumed at step {int(latest[-3:])}" in again.stdout + again.stderr

    keys = ("loss", *METRICS, "val/loss", "val/accuracy", "val/margin")
    assert values_by_step(run, keys) == values_by_step(tmp_path / "straight", keys)  # bit for bit
