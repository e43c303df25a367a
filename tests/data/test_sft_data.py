"""SFT records -> ids and labels (train/data/sft.py) and packing (train/data/packing.py)."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_config

from data_prep.tokenizers import load_tokenizer
from train.data.packing import (
    build_row,
    cutting_stock,
    first_fit_decreasing,
    lower_bound,
    pack,
    pack_bins,
    padding_share,
)
from train.data.sft import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE,
    BadItem,
    read_examples,
)
from train.model.gpt import GPT

TOKENIZER = load_tokenizer("gpt2")


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def trained_text(example):
    return TOKENIZER.decode([t for t in example.labels if t != IGNORE])


def test_alpaca_uses_its_template_and_trains_the_response_and_end_of_text(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        ],
    )
    examples = read_examples(path, "alpaca", TOKENIZER, 512).examples
    first, second = examples
    prompt = ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 and 3")
    assert TOKENIZER.decode(first.input_ids) == prompt + "5" + TOKENIZER.eod_token
    assert first.labels[: first.prompt_length] == [IGNORE] * first.prompt_length
    assert trained_text(first) == "5" + TOKENIZER.eod_token
    assert TOKENIZER.decode(second.input_ids).startswith(
        ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    )
    everything = read_examples(path, "alpaca", TOKENIZER, 512, train_on_prompt=True).examples
    assert everything[0].labels == everything[0].input_ids


def test_prompt_completion_trains_the_completion(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    (example,) = read_examples(path, "prompt_completion", TOKENIZER, 512).examples
    assert trained_text(example) == " 4" + TOKENIZER.eod_token
    assert example.input_ids[: example.prompt_length] == TOKENIZER.encode("Q: 2+2?\nA:")


def test_chat_trains_exactly_the_assistant_turns(tmp_path):
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    }
    path = write_jsonl(tmp_path / "c.jsonl", [chat])
    (example,) = read_examples(path, "chat", TOKENIZER, 512).examples
    text = TOKENIZER.decode(example.input_ids)
    assert text == (
        "<|system|>\nBe brief.\n\n<|user|>\nCapital of France?\n\n<|assistant|>\nParis.\n\n"
        "<|user|>\nAnd of Italy?\n\n<|assistant|>\nRome.\n\n" + TOKENIZER.eod_token
    )
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            spans.append(TOKENIZER.decode(current))
            current = []
    spans.append(TOKENIZER.decode(current))
    assert spans == ["Paris.\n\n", "Rome.\n\n" + TOKENIZER.eod_token]

    # a template of one's own (Jinja, as transformers renders chat templates)
    own = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    (mine,) = read_examples(path, "chat", TOKENIZER, 512, chat_template=own).examples
    assert TOKENIZER.decode(mine.input_ids).startswith("SYSTEM: Be brief.\nUSER: Capital")
    assert trained_text(mine) == "ASSISTANT: Paris.\nASSISTANT: Rome.\n" + TOKENIZER.eod_token


def test_bad_records_are_named_counted_and_skipped_or_fatal_with_strict(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "fine", "completion": " yes"},
            {"prompt": "no completion"},
            {"prompt": "empty", "completion": "  "},
            "{not json",
            {"prompt": "fine again", "completion": " ok"},
        ],
    )
    out = read_examples(path, "prompt_completion", TOKENIZER, 512)
    assert len(out.examples) == 2 and out.skipped.count == 3
    assert out.skipped.examples[0] == f"{path}:2: 'completion' must be a string (missing)"
    assert out.skipped.examples[1] == f"{path}:3: empty response ('completion')"
    assert out.skipped.examples[2].startswith(f"{path}:4: not JSON")
    with pytest.raises(BadItem, match=f"{path}:2: 'completion' must be a string"):
        read_examples(path, "prompt_completion", TOKENIZER, 512, strict=True)
    chats = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "hello?"}]},
            {"messages": [{"role": "user"}]},
        ],
    )
    out = read_examples(chats, "chat", TOKENIZER, 512)
    assert out.skipped.examples == [
        f"{chats}:1: no assistant turn to learn from",
        f"{chats}:2: message 0 needs string 'role' and 'content'",
    ]


def test_long_examples_lose_prompt_tokens_from_the_left(tmp_path):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    path = write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"prompt": long_prompt, "completion": " the end"},
            {"prompt": "short", "completion": " " + "very long answer " * 100},
        ],
    )
    out = read_examples(path, "prompt_completion", TOKENIZER, 64)
    (example,) = out.examples
    assert len(example) == 64 and out.truncated == 1
    assert trained_text(example) == " the end" + TOKENIZER.eod_token
    assert TOKENIZER.decode(example.input_ids).endswith("word199 the end" + TOKENIZER.eod_token)
    assert out.skipped.examples == [f"{path}:2: the response alone is longer than 64 tokens"]
    with pytest.raises(BadItem, match=r"long.jsonl:1: \d+ tokens, longer than 64 \(strict=true"):
        read_examples(path, "prompt_completion", TOKENIZER, 64, strict=True)


def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 7) == [[0, 4], [1, 2], [3, 5, 6]]
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = first_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # the same bins as the textbook O(n * bins) loop
    naive: list[list[int]] = []
    for i in sorted(range(500), key=lambda i: (-lengths[i], i)):
        for b in naive:
            if sum(lengths[j] for j in b) + lengths[i] <= 128:
                b.append(i)
                break
        else:
            naive.append([i])
    assert bins == naive
    with pytest.raises(ValueError):
        first_fit_decreasing([10], 8)


def is_packing(bins, lengths, capacity):
    return sorted(i for b in bins for i in b) == list(range(len(lengths))) and all(
        sum(lengths[i] for i in b) <= capacity for b in bins
    )


def test_cutting_stock_packs_what_first_fit_decreasing_cannot():
    """Johnson's instance where first-fit decreasing takes 11/9 of the optimum (capacity 120:
    six bins of 62+32+26 and three of 34+34+26+26 hold everything exactly), ten times over."""
    lengths = ([62] * 6 + [34] * 6 + [32] * 6 + [26] * 12) * 10
    assert len(first_fit_decreasing(lengths, 120)) == 110
    bins = cutting_stock(lengths, 120)
    assert is_packing(bins, lengths, 120)
    assert len(bins) == lower_bound(lengths, 120) == 90
    assert pack_bins(lengths, 120) == bins == cutting_stock(lengths, 120)  # deterministic


def test_pack_bins_never_worse_than_first_fit_decreasing():
    rng = random.Random(2)
    for capacity, low, high in ((256, 45, 153), (100, 12, 88), (64, 1, 64)):
        lengths = [rng.randint(low, high) for _ in range(300)]
        bins = pack_bins(lengths, capacity)
        assert is_packing(bins, lengths, capacity)
        assert lower_bound(lengths, capacity) <= len(bins)
        assert len(bins) <= len(first_fit_decreasing(lengths, capacity))
        cut_short = cutting_stock(lengths, capacity, rounds=0)  # single-length patterns only
        assert is_packing(cut_short, lengths, capacity)
    with pytest.raises(ValueError, match="longer than the capacity 8"):
        cutting_stock([3, 10], 8)


def test_packed_rows_give_each_examples_loss(tmp_path):
    """Rows built by pack() through the model: the summed loss over the packed targets equals
    the examples' losses computed one by one, on their trained tokens only."""
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    records = [
        {
            "prompt": " ".join(rng.choices(words, k=rng.randint(1, 30))),
            "completion": " " + " ".join(rng.choices(words, k=rng.randint(1, 20))),
        }
        for _ in range(12)
    ]
    path = write_jsonl(tmp_path / "r.jsonl", records)
    examples = read_examples(path, "prompt_completion", TOKENIZER, 96).examples
    rows = pack(examples, 96, TOKENIZER.eod_id)
    assert len(rows) < len(examples) and padding_share(rows) < 0.5
    config = tiny_config(
        vocab_size=TOKENIZER.vocab_size,
        max_position_embeddings=96,
        hidden_size=32,
        num_heads=2,
        window_size=8,
    )
    model = GPT(config).init_weights(torch.Generator().manual_seed(0)).eval()
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
    with torch.no_grad():
        logits = model(
            batch["input_ids"], positions=batch["positions"], documents=batch["documents"]
        )
        packed = F.cross_entropy(
            logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum"
        )
        alone = sum(
            F.cross_entropy(
                model(torch.tensor([e.input_ids]))[0, :-1],
                torch.tensor(e.labels[1:]),
                ignore_index=IGNORE,
                reduction="sum",
            )
            for e in examples
        )
    torch.testing.assert_close(packed, alone)
    assert int((batch["targets"] != IGNORE).sum()) == sum(e.trained_tokens for e in examples)


def test_build_row_layout():
    from train.data.sft import Example

    a = Example([1, 2, 3], [IGNORE, 2, 3], "a", 1)
    b = Example([4, 5], [IGNORE, 5], "b", 1)
    row = build_row([a, b], 7, pad_id=0)
    assert row["input_ids"].tolist() == [1, 2, 3, 4, 5, 0, 0]
    assert row["targets"].tolist() == [2, 3, IGNORE, 5, IGNORE, IGNORE, IGNORE]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 0, 0]
    assert row["documents"].tolist() == [0, 0, 0, 1, 1, -1, -1]


def test_bundled_samples_read_cleanly():

    sample = ROOT / "data_prep" / "sample"
    out = read_examples(str(sample / "sft_instructions.jsonl"), "alpaca", TOKENIZER, 256)
    assert len(out.examples) == 1612 and out.skipped.count == 0 and out.truncated == 0
    assert all(e.trained_tokens >= 2 for e in out.examples)
    lines = (sample / "sft_classification.jsonl").read_text().splitlines()
    labels = [json.loads(line)["label"] for line in lines]
    assert {label: labels.count(label) for label in set(labels)} == {
        "code": 300,
        "e-mail": 300,
        "book": 300,
        "forum": 300,
    }


def test_a_hugging_face_directory_brings_its_chat_template(tmp_path, trained_gpt2_model):
    import shutil

    from train.checkpoints.hf import hf_dir_tokenizer

    hf = tmp_path / "hf"
    shutil.copytree(trained_gpt2_model / "hf", hf)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = hf_dir_tokenizer(hf)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}])
    (example,) = read_examples(path, "chat", tokenizer, 64).examples
    assert tokenizer.decode(example.input_ids) == "[user] hi\n[assistant] hello\n<|endoftext|>"
    assert trained_text(example) == "[assistant] hello\n<|endoftext|>"


def test_a_chat_template_that_is_no_jinja_or_fails_on_a_record_is_a_user_mistake(tmp_path):
    """A template that does not compile is one line naming the key (it was a traceback); one
    that fails on a record (transformers' templates call raise_exception on roles they do not
    take) names the record, which is skipped like any bad record."""
    from train.errors import ConfigError

    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [chat, chat])
    with pytest.raises(ConfigError, match=r"^sft.chat_template: not a Jinja template \("):
        read_examples(path, "chat", TOKENIZER, 64, chat_template="{% for %}")
    failing = "{% for m in messages %}{{ raise_exception('no ' + m['role']) }}{% endfor %}"
    read = read_examples(path, "chat", TOKENIZER, 64, chat_template=failing)
    assert read.examples == [] and read.skipped.count == 2
    assert read.skipped.examples[0].startswith(f"{path}:1: the chat template failed: ")
