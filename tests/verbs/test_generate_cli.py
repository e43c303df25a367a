"""`neo generate` as users run it: real subprocesses on a checkpoint and its Hugging Face export."""

import json

import pytest

from data_prep.tokenizers import load_tokenizer
from train.checkpoints.load import load_model
from train.config.evaluation import GenerationConfig
from train.model.decoding import generate

pytestmark = pytest.mark.slow


def test_no_arguments_without_a_demo_model_says_how_to_make_one(neo):
    proc = neo("generate", check=False)
    assert proc.returncode == 2
    assert "checkpoint=runs/demo does not exist: make one with `make demo`" in proc.stderr


def test_text_output_is_the_prompt_and_its_continuation(neo, trained_gpt2_model):
    ckpt = trained_gpt2_model / "ckpt"
    proc = neo("generate", f"checkpoint={ckpt}", "do_sample=false", "max_new_tokens=12")
    model = load_model(ckpt).eval()
    expected = generate(
        model,
        load_tokenizer("gpt2"),
        "Hello, I'm a language model,",
        GenerationConfig(max_new_tokens=12),
    )[0][0]
    assert f"Hello, I'm a language model,{expected.text}\n" in proc.stdout
    assert "--- prompt 1/1, sequence 1/1" in proc.stdout
    assert "generated 1 sequences for 1 prompts" in proc.stderr  # logs stay off stdout
    assert "tokens/s" in proc.stderr


def test_model_card_usage_samples_five_reproducibly(neo, trained_gpt2_model):
    args = (
        "generate",
        f"checkpoint={trained_gpt2_model / 'hf'}",
        "num_return_sequences=5",
        "max_new_tokens=20",
        "seed=3",
    )
    first, again = neo(*args), neo(*args)
    assert first.stdout.count("--- prompt 1/1, sequence") == 5
    assert first.stdout == again.stdout
    unseeded = neo("generate", f"checkpoint={trained_gpt2_model / 'hf'}")
    assert "sampling with seed=" in unseeded.stderr


def test_prompts_file_to_jsonl_with_ids_and_logprobs(neo, trained_gpt2_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The city\n\nIn mathematics,\nOnce upon a time\n")
    out = tmp_path / "out" / "samples.jsonl"
    neo(
        "generate",
        f"checkpoint={trained_gpt2_model / 'ckpt'}",
        f"prompts_file={prompts}",
        "num_beams=3",
        "num_return_sequences=2",
        "max_new_tokens=10",
        "batch_size=2",
        "format=jsonl",
        f"output={out}",
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sequence_index"]) for r in records] == [
        (p, s) for p in range(3) for s in range(2)
    ]
    tokenizer = load_tokenizer("gpt2")
    for r in records:
        assert r["prompt"] in ("The city", "In mathematics,", "Once upon a time")
        assert r["prompt_ids"] == tokenizer.encode(r["prompt"])
        assert len(r["logprobs"]) == len(r["token_ids"]) <= 10
        assert r["score"] is not None and r["finish_reason"] in ("eos", "length")
    # a second run does not overwrite what the first wrote
    before = out.read_text()
    proc = neo(
        "generate", f"checkpoint={trained_gpt2_model / 'ckpt'}", f"output={out}", check=False
    )
    assert proc.returncode != 0 and "overwrite=true" in proc.stderr
    assert out.read_text() == before


def test_bad_prompts_file_names_file_and_line(neo, trained_gpt2_model, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    proc = neo(
        "generate", f"checkpoint={trained_gpt2_model / 'ckpt'}", f"prompts_file={bad}", check=False
    )
    assert proc.returncode != 0
    assert f"{bad}:2: not JSON" in proc.stderr
    missing = neo(
        "generate",
        f"checkpoint={trained_gpt2_model / 'ckpt'}",
        "prompts_file=nope.txt",
        check=False,
    )
    assert missing.returncode != 0 and "prompts_file=nope.txt does not exist" in missing.stderr


def test_impossible_settings_fail_before_the_model_loads(neo, tmp_path):
    proc = neo(
        "generate", "checkpoint=nowhere", "num_return_sequences=3", "do_sample=false", check=False
    )
    assert proc.returncode != 0
    assert "num_return_sequences different than 1 (got 3)" in proc.stderr


def test_stop_strings_from_the_command_line(neo, trained_gpt2_model):
    ckpt = f"checkpoint={trained_gpt2_model / 'ckpt'}"
    free = json.loads(
        neo("generate", ckpt, "do_sample=false", "max_new_tokens=30", "format=jsonl").stdout
    )
    word = free["text"].split()[1]
    stopped = json.loads(
        neo(
            "generate",
            ckpt,
            "do_sample=false",
            "max_new_tokens=30",
            "format=jsonl",
            f'stop_strings=["{word}","###"]',
        ).stdout
    )
    assert stopped["finish_reason"] == "stop" and word in stopped["text"]
    assert len(stopped["token_ids"]) < len(free["token_ids"])


def test_prompt_is_taken_as_typed(neo, trained_gpt2_model):
    """Commas, quotes, backslashes and `${` are text in a prompt, not Hydra or OmegaConf syntax."""
    for prompt in ("Hello, I'm a language model,", 'say "a,b" \\n ${x} [1]'):
        proc = neo(
            "generate",
            f"checkpoint={trained_gpt2_model / 'ckpt'}",
            f"prompt={prompt}",
            "max_new_tokens=2",
            "format=jsonl",
        )
        assert json.loads(proc.stdout)["prompt"] == prompt
