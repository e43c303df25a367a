"""`neo import` / `neo export`: directories that transformers loads, identical outputs."""

import json
import os

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoForCausalLM, pipeline

from data_prep.files import OutputExistsError
from data_prep.tokenizers import load_tokenizer
from train.checkpoints.export import export_hf
from train.checkpoints.hf import import_hf
from train.checkpoints.load import load_model
from train.checkpoints.model_format import CheckpointError, read_checkpoint, save_checkpoint
from train.config.model import expand_attention_types
from train.model.gpt import GPT, next_token_loss

PATTERNS = {
    "global": [[["global"], 2]],
    "local": [[["local"], 3]],
    "alternating": [[["global", "local"], 2]],
}
GPT2_VOCAB = 50257  # exported models carry the bundled GPT-2 tokenizer


def make_checkpoint(path, pattern="alternating", seed=0, **overrides):
    attention_types = overrides.pop("attention_types", PATTERNS.get(pattern))
    config = tiny_config(
        vocab_size=GPT2_VOCAB,
        hidden_size=32,
        num_heads=2,
        attention_types=attention_types,
        num_layers=len(expand_attention_types(attention_types)),
        **overrides,
    )
    model = GPT(config).init_weights(torch.Generator().manual_seed(seed)).eval()
    save_checkpoint(path, config, model.state_dict(), load_tokenizer("gpt2"))
    return model


def sample_ids(n=2, T=60):
    return torch.randint(0, GPT2_VOCAB, (n, T), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_export_then_transformers_gives_same_logits_and_loss(tmp_path, pattern):
    model = make_checkpoint(tmp_path / "ckpt", pattern)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, GPTNeoForCausalLM)
    ids = sample_ids()
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        logits = model(ids)
    torch.testing.assert_close(logits, ref.logits)
    torch.testing.assert_close(next_token_loss(logits[:, :-1], ids[:, 1:]), ref.loss)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_import_of_hugging_face_directory_gives_same_logits(tmp_path, pattern):
    layers = sum(len(kinds) * n for kinds, n in PATTERNS[pattern])
    from transformers import GPTNeoConfig

    torch.manual_seed(0)
    hf = GPTNeoForCausalLM(
        GPTNeoConfig(
            vocab_size=GPT2_VOCAB,
            max_position_embeddings=128,
            hidden_size=32,
            num_layers=layers,
            num_heads=2,
            attention_types=PATTERNS[pattern],
            window_size=8,
        )
    ).eval()
    hf.save_pretrained(tmp_path / "hf")  # no tokenizer files: import works without them
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ours = load_model(tmp_path / "ckpt").eval()
    direct = load_model(tmp_path / "hf").eval()
    ids = sample_ids()
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(ours(ids), ref)
        torch.testing.assert_close(direct(ids), ref)


def test_round_trip_export_import_export(tmp_path):
    make_checkpoint(tmp_path / "a")
    export_hf(tmp_path / "a", tmp_path / "hf1")
    import_hf(tmp_path / "hf1", tmp_path / "b")
    export_hf(tmp_path / "b", tmp_path / "hf2")
    one, two = (
        load_file(tmp_path / "hf1" / "model.safetensors"),
        load_file(tmp_path / "hf2" / "model.safetensors"),
    )
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key
    assert load_tokenizer(tmp_path / "b" / "tokenizer").encode("round trip") == load_tokenizer(
        "gpt2"
    ).encode("round trip")


def test_gpt3_scaling_is_folded_into_q_proj(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt", scale_attn_weights=True)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits)
    assert "folded into each q_proj" in (tmp_path / "hf" / "README.md").read_text()


def test_export_refuses_strided_and_names_the_layers(tmp_path):
    make_checkpoint(tmp_path / "ckpt", attention_types=[[["global", "strided"], 2]])
    with pytest.raises(CheckpointError, match=r"strided attention in layers \[1, 3\]"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_exported_directory_has_everything_inference_needs(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype=torch.bfloat16)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= files
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in weights
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt_neo" and config["eos_token_id"] == 50256
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("Hello, I'm a language model,")["input_ids"] == [
        15496,
        11,
        314,
        1101,
        257,
        3303,
        2746,
        11,
    ]
    assert "flash_attention_2" in (tmp_path / "hf" / "README.md").read_text()


def test_exported_directory_runs_in_text_generation_pipeline(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    generate = pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    outputs = generate("Once upon a time", max_new_tokens=8, do_sample=True, num_return_sequences=5)
    assert len(outputs) == 5
    assert all(o["generated_text"].startswith("Once upon a time") for o in outputs)


def test_export_never_overwrites_without_asking(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="overwrite=true"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep me"
    # overwrite=true replaces only an earlier export (issue 23: it deleted whatever was there)
    with pytest.raises(OutputExistsError, match="holds 1 entry: mine.txt, and it is not"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep me"
    (tmp_path / "hf" / "mine.txt").unlink()
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    export_hf(tmp_path / "ckpt", tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "config.json").is_file()
    assert not list(tmp_path.glob(".hf.*")), "no temporary directories left behind"


def test_failed_export_leaves_no_output(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "ckpt")
    import train.checkpoints.hf

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(train.checkpoints.hf, "save_hf_tokenizer", boom)
    with pytest.raises(OSError, match="disk full"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".hf.*"))


def test_import_reads_sharded_and_legacy_checkpoints(tmp_path):
    """Old GPT-Neo checkpoints are pytorch_model.bin with attention-mask buffers in them;
    large ones are sharded with an index file."""
    model = make_checkpoint(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_dir = tmp_path / "hf"
    (hf_dir / "checksums.sha256").unlink()  # old checkpoints have none (and these are edited)
    state = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    legacy = dict(state)
    legacy["transformer.h.0.attn.attention.bias"] = torch.ones(1, 1, 128, 128, dtype=torch.bool)
    legacy["transformer.h.0.attn.attention.masked_bias"] = torch.tensor(-1e9)
    legacy["lm_head.weight"] = state["transformer.wte.weight"]
    torch.save(legacy, hf_dir / "pytorch_model.bin")
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(load_model(hf_dir)(ids), model(ids))

    (hf_dir / "pytorch_model.bin").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": keys[:half],
        "model-00002-of-00002.safetensors": keys[half:],
    }
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, hf_dir / name)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with torch.no_grad():
        torch.testing.assert_close(load_model(hf_dir)(ids), model(ids))


def test_import_rejects_other_model_types(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")


def test_import_reports_broken_config_with_line(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{\n  "model_type": "gpt_neo",\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"config.json:3: not valid JSON"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")


def test_checkpoint_without_weights_is_named(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        read_checkpoint(tmp_path / "ckpt")


def test_weights_get_the_permissions_of_every_other_file(tmp_path):
    """safetensors creates its file 0600: a model handed to another team could not be read."""
    make_checkpoint(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    for directory in ("ckpt", "hf"):
        files = (p for p in (tmp_path / directory).iterdir() if p.is_file())
        modes = {p.name: p.stat().st_mode & 0o777 for p in files}
        assert modes["model.safetensors"] == 0o666 & ~current_umask(), modes
        assert len(set(modes.values())) == 1, modes


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_import_refuses_weights_that_do_not_fit_the_config(tmp_path, neo):
    """A config.json of 2,000 layers beside a 10 x 10 embedding was imported (exit 0) into a
    checkpoint that could never load."""
    make_checkpoint(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["num_layers"] = 6
    config["attention_types"] = [[["global"], 6]]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "checksums.sha256").unlink()
    proc = neo("import", f"input={tmp_path / 'hf'}", f"output={tmp_path / 'out'}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "the weights do not fit its config: 26 missing (transformer.h.4." in proc.stderr
    assert not (tmp_path / "out").exists()
