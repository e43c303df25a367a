"""GPT-1's task head in `neo sft head=...`: the input transformations, the head and its loss,
training on the bundled classification sample, and the Hugging Face export's logits."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from test_sft import losses, sft
from transformers import GPTNeoForSequenceClassification

from data_prep.tokenizers import load_tokenizer
from train.checkpoints.load import read_any, read_head
from train.config.sft import HeadConfig
from train.data.sft import IGNORE
from train.data.tasks import collate_examples, read_task_examples, special_tokens
from train.errors import ConfigError
from train.loop.evaluators import classification_metrics
from train.loop.metrics import read_metrics
from train.model.heads import TaskGPT, TaskHead

CLASSIFY = (
    "head=classification",
    "precision=fp32",
    "optim.lr=1e-3",
    "micro_batch_size=8",
    "global_batch_size=16",
    "sft.validation_fraction=0.2",
)


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def gpt2():
    return load_tokenizer("gpt2")


def test_inputs_are_built_as_in_the_paper(tmp_path, gpt2):
    enc = gpt2.encode
    ids = special_tokens(HeadConfig(type="entailment"), gpt2)
    assert sorted(ids.values()) == [50257, 50258, 50259]  # added after GPT-2's vocabulary
    s, d, c = ids["start"], ids["delim"], ids["classify"]
    pairs = write(
        tmp_path / "p.jsonl",
        [
            {"text": "A cat sat.", "text_pair": "An animal sat.", "label": "yes"},
            {"text": "It rained.", "text_pair": "It was dry.", "label": "no"},
        ],
    )
    read, labels = read_task_examples(str(pairs), HeadConfig(type="entailment"), gpt2, ids, 64)
    assert labels == ["no", "yes"]
    first = read.examples[0]
    assert first.sequences == [[s, *enc("A cat sat."), d, *enc("An animal sat."), c]]
    assert first.label == 1
    read, _ = read_task_examples(str(pairs), HeadConfig(type="similarity"), gpt2, ids, 64)
    a, b = enc("A cat sat."), enc("An animal sat.")
    assert read.examples[0].sequences == [[s, *a, d, *b, c], [s, *b, d, *a, c]]
    choices = write(
        tmp_path / "mc.jsonl",
        [
            {"text": "2 + 2 =", "choices": [" 4", " 5", " 22"], "gold": 0},
            {"text": "The sky is", "choices": [" green", " blue", " loud"], "gold": "1"},
        ],
    )
    read, _ = read_task_examples(str(choices), HeadConfig(type="multiple_choice"), gpt2, ids, 64)
    assert read.examples[1].sequences[2] == [s, *enc("The sky is"), d, *enc(" loud"), c]
    assert [e.label for e in read.examples] == [0, 1]
    # Too long: the longest part loses tokens from its end until the sequence fits.
    long = write(
        tmp_path / "long.jsonl",
        [
            {"text": "word " * 40, "text_pair": "short one", "label": 1},
            {"text": "x", "text_pair": "y", "label": 0},
        ],
    )
    read, labels = read_task_examples(str(long), HeadConfig(type="entailment"), gpt2, ids, 20)
    assert labels == ["0", "1"] and read.truncated == 1
    seq = read.examples[0].sequences[0]
    assert len(enc("short one")) == 2
    assert seq == [s, *enc("word " * 40)[:15], d, *enc("short one"), c]


def test_mapped_tokens_and_bad_records(tmp_path, gpt2):
    mapped = HeadConfig(type="classification", special_tokens="map")
    mapped.tokens.start, mapped.tokens.delim, mapped.tokens.classify = "<", "$", ">"
    ids = special_tokens(mapped, gpt2)
    assert ids == {
        "start": gpt2.encode("<")[0],
        "delim": gpt2.encode("$")[0],
        "classify": gpt2.encode(">")[0],
    }
    assert gpt2.vocab_size == 50257  # nothing added
    mapped.tokens.start = "not one token"
    with pytest.raises(ConfigError, match=r"head.tokens.start='not one token'"):
        special_tokens(mapped, gpt2)
    ids = special_tokens(HeadConfig(type="classification"), gpt2)
    data = write(
        tmp_path / "d.jsonl",
        [
            {"text": "good", "label": "pos"},
            {"text": "bad", "label": "neg"},
            {"text": "no label"},
            {"label": "pos"},
            {"text": "odd", "label": [1]},
        ],
    )
    read, labels = read_task_examples(str(data), HeadConfig(type="classification"), gpt2, ids, 32)
    assert labels == ["neg", "pos"] and len(read.examples) == 2
    assert read.skipped.count == 3
    reasons = sorted(read.skipped.examples)
    assert reasons[0].startswith(f"{data}:3: 'label' must be a string or a number (got nothing)")
    assert reasons[1].startswith(f"{data}:4: 'text' must be a string")
    assert reasons[2].startswith(f"{data}:5: 'label' must be a string or a number (got list)")
    held = write(tmp_path / "v.jsonl", [{"text": "meh", "label": "neutral"}])
    read, _ = read_task_examples(
        str(held), HeadConfig(type="classification"), gpt2, ids, 32, labels
    )
    assert "label 'neutral' is not one of the training labels" in read.skipped.examples[0]
    mc = write(
        tmp_path / "mc.jsonl",
        [
            {"text": "q", "choices": ["a", "b"], "gold": 2},
            {"text": "q", "choices": ["a", "b"], "gold": 0},
            {"text": "q", "choices": ["a", "b", "c"], "gold": 0},
        ],
    )
    with pytest.raises(ConfigError, match=rf"{mc}:3: 3 choices; every record .* must have 2"):
        read_task_examples(str(mc), HeadConfig(type="multiple_choice"), gpt2, ids, 32)
    one = write(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    with pytest.raises(ConfigError, match="at least two labels"):
        read_task_examples(str(one), HeadConfig(type="classification"), gpt2, ids, 32)
    with pytest.raises(ConfigError, match="head.type='regression'"):
        HeadConfig(type="regression").validate()


def _head(kind, labels=("a", "b", "c")):
    return TaskHead(kind, list(labels), {"start": 1, "delim": 2, "classify": 3}, {})


@pytest.mark.parametrize("kind", ["classification", "similarity", "multiple_choice"])
def test_head_reads_the_classify_token_and_adds_the_lm_loss(kind):
    torch.manual_seed(0)
    config = tiny_config()
    model = TaskGPT(config, _head(kind), lm_coef=0.5).init_weights().eval()
    torch.nn.init.normal_(model.score.weight, std=0.5)
    k = {"classification": 1, "similarity": 2, "multiple_choice": 3}[kind]
    b, t = 3, 12
    ids = torch.randint(4, config.vocab_size, (b, k, t))
    at = torch.randint(3, t, (b, k))
    targets = torch.tensor([0, 2, IGNORE])
    lm_targets = torch.randint(0, config.vocab_size, (b, k, t))
    with torch.no_grad():
        logits, _ = model.classify(ids, at)
        # The reference: each sequence alone, its state at the classify position.
        states = torch.stack(
            [
                torch.stack(
                    [model.hidden_states(ids[i, j, None, : at[i, j] + 1])[0, -1] for j in range(k)]
                )
                for i in range(b)
            ]
        )
        if kind == "multiple_choice":
            expected = model.score(states).squeeze(-1)
        else:
            expected = model.score(states).sum(1)  # no bias: the orders' logits add
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        loss = model(ids, targets, at, lm_targets).mean()
        task = F.cross_entropy(logits, targets, ignore_index=IGNORE)
        lm_logits = model.lm_head(model.hidden_states(ids.reshape(b * k, t)))
        lm = F.cross_entropy(lm_logits.reshape(-1, config.vocab_size), lm_targets.reshape(-1))
        torch.testing.assert_close(loss, task + 0.5 * lm, atol=1e-5, rtol=1e-5)
        model.lm_coef = 0.0
        torch.testing.assert_close(model(ids, targets, at, lm_targets).mean(), task)


def test_collate_pads_right_and_targets_the_next_token():
    from train.data.tasks import TaskExample

    arrays = collate_examples(
        [TaskExample([[5, 6, 7]], 1, "a"), TaskExample([[5, 8]], 0, "b")], pad_id=0
    )
    np.testing.assert_array_equal(arrays["input_ids"][:, 0], [[5, 6, 7], [5, 8, 0]])
    np.testing.assert_array_equal(arrays["lm_targets"][:, 0], [[6, 7, IGNORE], [8, IGNORE, IGNORE]])
    np.testing.assert_array_equal(arrays["classify_at"], [[2], [1]])
    np.testing.assert_array_equal(arrays["targets"], [1, 0])


def test_accuracy_and_macro_f1():
    confusion = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    values = classification_metrics(confusion, loss_sum=7.0, f1=True)
    assert values["val/accuracy"] == pytest.approx(5 / 7)
    f1 = [2 * 3 / (4 + 4), 2 * 2 / (2 + 3), 0.0]
    assert values["val/macro_f1"] == pytest.approx(sum(f1) / 3)
    assert values["val/task_loss"] == pytest.approx(1.0)


@pytest.mark.slow
def test_classification_learns_the_bundled_task_and_exports_to_hf(tmp_path, trained_gpt2_model):
    """The bundled sample (which source a snippet comes from: 4 balanced classes, chance 25%)
    from a small trained base: well above chance on the held-out 20% after 60 steps; one and
    two ranks (ZeRO-2) give the same losses; the HF export gives our logits."""
    base = trained_gpt2_model / "ckpt"
    one = tmp_path / "one"
    sft(one, *CLASSIFY, "max_steps=60", "eval_every=60", "save_every=60", base=base)
    sft(
        tmp_path / "two",
        *CLASSIFY,
        "max_steps=4",
        "deepspeed=zero2",
        "export_hf=false",
        base=base,
        ranks=2,
    )
    a, b = losses(one), losses(tmp_path / "two")
    assert [a[s] for s in range(1, 5)] == pytest.approx([b[s] for s in range(1, 5)], rel=1e-5)
    (final,) = [r for r in read_metrics(one) if "val/accuracy" in r]
    assert final["val/accuracy"] > 0.4, final
    assert 0 < final["val/macro_f1"] <= 1

    head = read_head(one / "model")
    assert head.labels == ["book", "code", "e-mail", "forum"]
    config, state, tokenizer = read_any(one / "model")
    assert config.vocab_size == 50257 + 3 == tokenizer.vocab_size
    ours = TaskGPT(config, head).eval()
    ours.load_state_dict(state)
    hf = GPTNeoForSequenceClassification.from_pretrained(one / "hf").eval()
    assert hf.config.id2label == dict(enumerate(head.labels))
    texts = ["def f(x):\n    return x + 1", "Dear all, the meeting moves to Monday.", "Chapter I"]
    rows = [
        [head.token_ids["start"], *tokenizer.encode(t), head.token_ids["classify"]] for t in texts
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.eod_id] * (width - len(r)) for r in rows])
    at = torch.tensor([[len(r) - 1] for r in rows])
    with torch.no_grad():
        expected, _ = ours.classify(ids[:, None], at)
        torch.testing.assert_close(hf(ids).logits, expected, atol=1e-4, rtol=1e-4)
    card = (one / "hf" / "README.md").read_text()
    assert "## Task head: classification" in card and "<|classify|>" in card


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["similarity", "multiple_choice"])
def test_pair_and_choice_tasks_train_and_export(tmp_path, kind):
    """A fresh tiny model on a small synthetic set: the run finishes, and HF's sequence
    classifier reproduces our logits the documented way (similarity: the sum over both orders;
    multiple choice: one score per choice)."""
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "cat", "dog", "tree", "sun", "rain"]
    records = []
    for _ in range(40):
        a, b = rng.choice(words, 2, replace=False)
        if kind == "similarity":
            records.append(
                {
                    "text": f"the {a}",
                    "text_pair": f"a {b if rng.random() < 0.5 else a}",
                    "label": int(rng.random() < 0.5),
                }
            )
        else:
            records.append(
                {"text": f"pick {a}", "choices": [f" {a}", f" {b}"], "gold": int(rng.integers(2))}
            )
    data = write(tmp_path / "data.jsonl", records)
    run = tmp_path / "run"
    sft(
        run,
        f"head={kind}",
        "max_steps=3",
        "eval_every=3",
        "precision=fp32",
        f"sft.path={data}",
        "sft.validation_fraction=0.25",
    )
    head = read_head(run / "model")
    config, state, tokenizer = read_any(run / "model")
    ours = TaskGPT(config, head).eval()
    ours.load_state_dict(state)
    hf = GPTNeoForSequenceClassification.from_pretrained(run / "hf").eval()
    ids = special_tokens(HeadConfig(type=kind, special_tokens="map"), tokenizer)  # now present
    read, _ = read_task_examples(str(data), HeadConfig(type=kind), tokenizer, ids, 64, head.labels)
    arrays = collate_examples(read.examples[:4], tokenizer.eod_id)
    batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
    b, k, t = batch["input_ids"].shape
    with torch.no_grad():
        expected, _ = ours.classify(batch["input_ids"], batch["classify_at"])
        per_sequence = hf(batch["input_ids"].reshape(b * k, t)).logits.reshape(b, k, -1)
        got = per_sequence.sum(1) if kind == "similarity" else per_sequence.squeeze(-1)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert any("val/accuracy" in r for r in read_metrics(run))


@pytest.mark.slow
def test_lora_with_a_head_trains_adapters_and_head_only(tmp_path, trained_gpt2_model):
    """LoRA beside a task head: the base stays frozen, the adapters and the (new) head train,
    and the merged model exports as a sequence classifier; lora.merge=false is refused."""
    from train.checkpoints.load import load_model
    from train.checkpoints.zero import consolidated_state_dict
    from train.model import lora

    base = trained_gpt2_model / "ckpt"
    run = tmp_path / "run"
    sft(run, *CLASSIFY, "lora.r=4", "max_steps=3", "save_every=3", base=base)
    raw = consolidated_state_dict(run / "checkpoints", "step_00000003")
    plain, pairs = lora.split(raw)
    original = load_model(base).state_dict()
    for name, tensor in plain.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):  # grown by the task tokens
            assert torch.equal(tensor[: original[name].shape[0]], original[name])
        elif name != "score.weight":
            assert torch.equal(tensor, original[name]), name
    assert pairs and all(b.abs().max() > 0 for _, b in pairs.values())
    assert GPTNeoForSequenceClassification.from_pretrained(run / "hf").config.num_labels == 4
    refused = sft(
        tmp_path / "no", *CLASSIFY, "lora.r=4", "lora.merge=false", base=base, check=False
    )
    assert refused.returncode != 0 and "keep lora.merge=true" in refused.stderr + refused.stdout
