"""`neo eval` as users run it: real subprocesses, prepared shards, results files, ranks."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import NEO, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """A prepared directory whose validation split holds an easy source (one sentence over and
    over) and a hard one (random letters), in that order within the shard."""
    root = tmp_path_factory.mktemp("two_sources")
    rng = random.Random(0)
    records = []
    for i in range(60):
        easy = "The cat sat on the mat. " * 20 + f"({i})"
        hard = " ".join(
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(80)
        )
        records.append({"text": easy, "meta": {"pile_set_name": "Easy"}})
        records.append({"text": hard, "meta": {"pile_set_name": "Hard"}})
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    subprocess.run(
        [
            NEO,
            "prep",
            f"input={corpus}",
            f"output={root / 'data'}",
            "validation_fraction=0.3",
            "workers=1",
        ],
        check=True,
        capture_output=True,
        cwd=root,
    )
    return root


def eval_results(neo, *args):
    proc = neo("eval", *args)
    out = next(a.split("=", 1)[1] for a in args if a.startswith("output="))
    return json.loads((Path(out) / "results.json").read_text()), proc


def test_val_overall_is_the_token_weighted_mix_of_its_sources(
    neo, tmp_path, two_sources, trained_gpt2_model
):
    results, proc = eval_results(
        neo,
        f"checkpoint={trained_gpt2_model / 'ckpt'}",
        "tasks=[val]",
        f"task.val.path={two_sources / 'data'}",
        f"output={tmp_path / 'out'}",
    )
    val = results["results"]["val"]
    sources = val["per_source"]
    assert set(sources) == {"Easy", "Hard"}
    assert sources["Easy"]["loss"] < sources["Hard"]["loss"] - 1.0  # really different
    mix = sum(s["loss"] * s["tokens"] for s in sources.values()) / sum(
        s["tokens"] for s in sources.values()
    )
    assert val["metrics"]["loss"] == pytest.approx(mix, rel=1e-9)
    assert val["metrics"]["perplexity"] == pytest.approx(torch.tensor(mix).exp().item(), rel=1e-6)
    assert "Easy" in proc.stdout and "Hard" in proc.stdout  # the table shows each source


def test_val_on_a_corpus_file_tokenizes_it_and_keeps_sources(
    neo, tmp_path, two_sources, trained_gpt2_model
):
    results, _ = eval_results(
        neo,
        f"checkpoint={trained_gpt2_model / 'hf'}",
        "tasks=[val]",
        f"task.val.path={two_sources / 'corpus.jsonl'}",
        f"output={tmp_path / 'out'}",
        "limit=10",
    )
    val = results["results"]["val"]
    assert val["items"] == 10 and set(val["per_source"]) == {"Easy", "Hard"}


def test_results_file_records_settings_identity_and_samples(neo, tmp_path, trained_gpt2_model):
    mc = tmp_path / "mine.jsonl"
    mc.write_text(
        '{"query": "Two plus two is", "choices": ["four", "five"], "gold": 0}\n'
        '{"query": "The sky is", "choices": ["blue", "green", "loud"], "gold": 0}\n'
    )
    runs = {}
    for kind in ("ckpt", "hf"):
        runs[kind], proc = eval_results(
            neo,
            f"checkpoint={trained_gpt2_model / kind}",
            "tasks=[mine]",
            f"+task.mine={{type: mc, path: {mc}}}",
            f"output={tmp_path / kind}",
            "log_samples=true",
        )
    ckpt, hf = runs["ckpt"], runs["hf"]
    assert ckpt["format"] == "neotrain-eval"
    assert ckpt["settings"]["num_fewshot"] == 0 and ckpt["settings"]["tasks"] == ["mine"]
    assert ckpt["model"]["parameters"] > 0 and ckpt["model"]["tokenizer"]["vocab_size"] == 50257
    # The same weights by content, whichever form they were read from.
    assert ckpt["model"]["weights_sha256"] == hf["model"]["weights_sha256"]
    assert ckpt["results"]["mine"]["metrics"] == hf["results"]["mine"]["metrics"]
    samples = (tmp_path / "ckpt" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(s)["gold"] for s in samples] == [0, 0]
    assert "mine" in proc.stdout and "acc_norm" in proc.stdout


def test_with_no_arguments_it_says_how_to_make_a_model(neo, tmp_path):
    proc = neo("eval", check=False)
    assert proc.returncode == 2
    assert "checkpoint=runs/demo does not exist" in proc.stderr and "make demo" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["tasks=[hellaswag]"], "task hellaswag: "),
        (["tasks=[nonesuch]"], "tasks: unknown task 'nonesuch'"),
        (["batch_size=zero"], "batch_size='zero' must be auto or a positive number"),
        (["+task.val.where=x"], "task.val.where: unknown setting"),
    ],
)
def test_bad_settings_fail_before_the_model_loads(neo, tmp_path, trained_gpt2_model, args, message):
    proc = neo(
        "eval",
        f"checkpoint={trained_gpt2_model / 'ckpt'}",
        f"data_dir={tmp_path}",
        *args,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_a_vocabulary_smaller_than_the_tokenizer_fails_before_any_forward(neo, tmp_path):
    from data_prep.tokenizers import load_tokenizer
    from train.checkpoints.model_format import save_checkpoint
    from train.model.gpt import GPT

    config = tiny_config(vocab_size=1000)
    save_checkpoint(
        tmp_path / "small", config, GPT(config).init_weights().state_dict(), load_tokenizer("gpt2")
    )
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n')
    proc = neo(
        "eval",
        f"checkpoint={tmp_path / 'small'}",
        "tasks=[mine]",
        f"+task.mine={{type: mc, path: {mc}}}",
        check=False,
    )
    assert proc.returncode == 2
    assert "50257 tokens, more than the model's vocab_size=1000" in proc.stderr


def test_two_ranks_give_the_numbers_of_one(tmp_path, trained_gpt2_model, two_sources):
    mc = tmp_path / "mc.jsonl"
    rng = random.Random(0)
    words = ["cat", "dog", "house", "tree", "river", "stone", "light", "music"]
    mc.write_text(
        "".join(
            json.dumps(
                {
                    "query": f"The {rng.choice(words)} is",
                    "gold": rng.randrange(3),
                    "choices": [rng.choice(words) for _ in range(3)],
                }
            )
            + "\n"
            for _ in range(40)
        )
    )
    common = [
        f"checkpoint={trained_gpt2_model / 'ckpt'}",
        "tasks=[val,mine]",
        f"task.val.path={two_sources / 'data'}",
        f"+task.mine={{type: mc, path: {mc}}}",
        "batch_tokens=512",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        proc = subprocess.run(
            [
                *torchrun,
                f"--nproc_per_node={n}",
                "-m",
                "train.cli",
                "eval",
                *common,
                f"output={out}",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        outs[n] = json.loads((out / "results.json").read_text())["results"]
    assert outs[2]["mine"]["metrics"] == outs[1]["mine"]["metrics"]
    for key, value in outs[1]["val"]["metrics"].items():
        assert outs[2]["val"]["metrics"][key] == pytest.approx(value, rel=1e-9)
    assert outs[2]["val"]["per_source"].keys() == outs[1]["val"]["per_source"].keys()
