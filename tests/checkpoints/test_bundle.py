"""What `neo export` writes for inference teams, and `neo verify`: checksums, the probe, the
card's usage; every kind of damage named; nothing partial left behind."""

import json
import subprocess

import pytest
import torch
from conftest import NEO, tiny_config
from safetensors.torch import load_file, save_file
from test_hf import make_checkpoint

from data_prep.tokenizers import load_tokenizer
from train.checkpoints import verify as bundle
from train.checkpoints.checksums import write_checksums
from train.checkpoints.export import export_hf
from train.checkpoints.model_format import save_checkpoint
from train.model.gpt import GPT


def verify(directory, *args):
    return subprocess.run([NEO, "verify", str(directory), *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    make_checkpoint(root / "ckpt")
    export_hf(root / "ckpt", root / "hf")
    return root / "hf"


def test_export_writes_checksums_and_a_probe_that_verify_checks(exported):
    lines = (exported / bundle.CHECKSUMS).read_text().splitlines()
    names = {line.split("  ", 1)[1] for line in lines}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
        bundle.PROBE,
    } <= names
    probe = json.loads((exported / bundle.PROBE).read_text())
    assert probe["prompt"] == "Hello, I'm a language model,"
    assert probe["input_ids"] == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert len(probe["top_ids"]) == 10
    done = verify(exported)
    assert done.returncode == 0, done.stderr
    files = len([p for p in exported.iterdir() if p.name != bundle.CHECKSUMS])
    assert f"checksums: {files} files match" in done.stdout
    assert "pipeline('text-generation') gave 5 continuations" in done.stdout
    assert "neo verify PATH" in (exported / "README.md").read_text()


def _copy(exported, tmp_path):
    import shutil

    shutil.copytree(exported, tmp_path / "copy")
    return tmp_path / "copy"


def test_damage_is_named(exported, tmp_path):
    copy = _copy(exported, tmp_path)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    done = verify(copy)
    assert done.returncode == 2
    assert "model.safetensors: sha256 differs from checksums.sha256" in done.stderr

    copy = _copy(exported, tmp_path / "b")
    (copy / "tokenizer.json").unlink()
    (copy / "notes.txt").write_text("mine")
    done = verify(copy)
    assert done.returncode == 2 and "missing: tokenizer.json" in done.stderr

    # Weights changed and the checksums written again: the probe still catches it.
    copy = _copy(exported, tmp_path / "c")
    weights = load_file(copy / "model.safetensors")
    weights["transformer.ln_f.bias"] = weights["transformer.ln_f.bias"] + 0.5
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    write_checksums(copy)
    done = verify(copy, "usage=false")
    assert done.returncode == 2 and "probe.json: transformers' logits differ" in done.stderr


def test_a_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "ckpt")

    def fails(*args, **kwargs):
        raise bundle.VerifyError("probe differs")

    monkeypatch.setattr(bundle, "verify", fails)
    with pytest.raises(bundle.VerifyError):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))


def test_a_model_without_a_tokenizer_exports_and_says_so(tmp_path, caplog):
    """A custom vocabulary of 211 tokens and no tokenizer (an imported HF directory, say): the
    model is exported without tokenizer files (no GPT-2 tokenizer fits), and verifies."""
    config = tiny_config(
        vocab_size=211,
        hidden_size=32,
        num_heads=2,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
    )
    model = GPT(config).init_weights(torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "ckpt", config, model.state_dict(), None)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert "no tokenizer and none fits vocab_size=211" in caplog.text
    done = verify(tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    assert "no tokenizer in the directory" in done.stdout
    assert "none was exported with it" in (tmp_path / "hf" / "README.md").read_text()


@pytest.mark.slow
def test_the_card_is_written_from_the_run_records(tmp_path, corpus):  # noqa: F811
    """A real run: the card names its data (the prep manifest's sources), its steps, tokens,
    layout and final validation, and the evaluation results given, beside GPT-Neo's numbers."""
    from runs import train

    from train.evals.tasks import PUBLISHED

    run = tmp_path / "run"
    train(run, corpus, "max_steps=3", "precision=fp32", "export_hf=false")  # exported below
    results = tmp_path / "results.json"
    results.write_text(
        json.dumps(
            {
                "settings": {"num_fewshot": 0, "limit": 100},
                "results": {
                    "lambada_openai": {
                        "metrics": {"acc": 0.0123, "perplexity": 9876.5},
                        "stderr": {"acc": 0.011},
                    }
                },
                "published": {"lambada_openai": PUBLISHED["lambada_openai"]},
            }
        )
    )
    export_hf(run, tmp_path / "hf", eval_results=str(results))
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    manifest = json.loads((corpus / "manifest.json").read_text())
    for source, values in manifest["sources"].items():
        assert f"| {source} | {values['documents']:,} | {values['tokens']:,} |" in card
    assert "- 3 steps, 1,536 tokens seen; global batch 8 x 64 tokens" in card
    assert "- 1 ranks, ZeRO-0, fp32" in card and "final validation (step 3): val/loss" in card
    assert "| lambada_openai | acc | 0.0123 | 0.0110 | 0.3736 | 0.5723 | 0.6222 |" in card
    assert "flash_attention_2" in card


def test_sharded_export_loads_and_verifies(tmp_path):
    """Above max_shard_size the weights are shards with an index, as save_pretrained writes
    them; transformers loads them, neo verify checks them, and neo import reads them back."""
    from transformers import AutoModelForCausalLM

    from train.checkpoints.hf import import_hf
    from train.checkpoints.load import load_model

    model = make_checkpoint(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_size="2MB")
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    ids = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    assert verify(tmp_path / "hf", "usage=false").returncode == 0
    import_hf(tmp_path / "hf", tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "back")(ids), model(ids))


def test_a_truncated_checkpoint_is_named_and_nothing_is_written(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    command = [NEO, "export", f"input={tmp_path / 'ckpt'}", f"output={tmp_path / 'hf'}"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{weights}: cannot be read as safetensors, truncated or corrupt" in done.stderr
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))


def test_import_eval_and_generate_refuse_a_directory_its_checksums_disown(exported, tmp_path, neo):
    """A flipped byte in model.safetensors: `neo import` wrote a checkpoint, `neo eval` printed
    loss nan and `neo generate` a traceback. Every loader checks checksums.sha256 now."""
    copy = _copy(exported, tmp_path)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    said = f"{copy / 'model.safetensors'}: sha256 differs from checksums.sha256"
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    for args in (
        ("import", f"input={copy}", f"output={tmp_path / 'imported'}"),
        ("eval", f"checkpoint={copy}", "tasks=[doc]", f"+task.doc={{type: text, path: {text}}}"),
        ("generate", f"checkpoint={copy}", "max_new_tokens=2"),
    ):
        proc = neo(*args, check=False)
        assert proc.returncode == 2 and said in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "imported").exists()
    # A file added beside the listed ones is not a reason to refuse loading (neo verify says).
    extra = _copy(exported, tmp_path / "extra")
    (extra / "notes.txt").write_text("mine")
    assert neo("import", f"input={extra}", f"output={tmp_path / 'ok'}").returncode == 0


def test_a_non_finite_score_is_an_error_not_a_result(tmp_path, neo):
    model = make_checkpoint(tmp_path / "ckpt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["transformer.ln_f.weight"][0] = float("nan")
    save_checkpoint(tmp_path / "nan", model.config, state, load_tokenizer("gpt2"))
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    task = f"+task.doc={{type: text, path: {text}}}"
    proc = neo("eval", f"checkpoint={tmp_path / 'nan'}", "tasks=[doc]", task, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the model's outputs are not finite" in proc.stderr and "nan" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "nan" / "eval").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["my model, v2 (it's é)", "a=b"])
def test_the_verify_hint_after_export_pastes_into_a_shell(tmp_path, name):
    """`neo export` ends with the `neo verify` command for what it wrote; pasted into a shell
    it checks that directory, whatever its name holds (spaces, commas, quotes, `=`)."""
    import shlex

    from train.config.shell import override

    make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / name
    command = [NEO, "export", f"input={tmp_path / 'ckpt'}", override("output", out), "usage=false"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    hint = (done.stdout + done.stderr).split("check it again with ")[1].splitlines()[0]
    assert hint.startswith("neo verify ")
    pasted = subprocess.run(
        ["bash", "-c", shlex.quote(NEO) + hint.removeprefix("neo") + " usage=false"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert pasted.returncode == 0, pasted.stderr
    assert "checksums:" in pasted.stdout
