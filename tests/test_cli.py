"""The `neo` console script, run as users run it: a subprocess."""

import json
import shutil

import pytest


def test_help_lists_every_verb_with_one_line(neo):
    out = neo("--help").stdout
    for verb in ("info", "import", "export"):
        assert f"  {verb} " in out
    assert neo().stdout == out


def test_unknown_verb_fails_with_usage(neo):
    proc = neo("trian", check=False)
    assert proc.returncode == 2
    assert "unknown verb 'trian'" in proc.stderr and "info" in proc.stderr


@pytest.mark.slow
def test_info_with_no_arguments_describes_tiny(neo, tmp_path):
    out = neo("info").stdout
    assert "model tiny" in out and "7,257,472" in out
    # The machine: what precision=auto picks here and the measured matmul peaks (cached).
    assert "this machine" in out and "precision=auto" in out and "native bf16" in out
    assert "matmul peak, fp32" in out and "matmul peak, bf16" in out and "GFLOP/s" in out
    assert list(tmp_path.iterdir()) == [], "info writes nothing"


@pytest.mark.slow
def test_info_plans_175b_without_allocating(neo):
    out = neo("info", "model=gpt3_175b", "world_size=1024").stdout
    assert "model gpt3_175b" in out and "1024 device(s)" in out
    assert "174,5" in out or "174,6" in out  # 174.6B parameters, printed in full


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("precision=fp8", "precision='fp8' is not one of auto, bf16, fp16, fp32"),
        ("logger.log_every=0", "logger.log_every=0 must be >= 1"),
        ("eval_tokens=0", "eval_tokens=0 must be >= 1"),
        ("deepspeed.offload_param=true", "deepspeed.offload_param=true needs"),
        ("accelerator=tpu", "accelerator='tpu' is not one of auto, cpu, cuda, npu"),
    ],
)
def test_train_config_errors_come_before_anything_starts(neo, tmp_path, override, message):
    """On a fresh directory: the error, and nothing tokenized, no process group, no model (the
    config is checked before the verb's module, torch and DeepSpeed, is even imported)."""
    proc = neo("train", override, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "data").exists()
    assert "Traceback" not in proc.stderr and "precision auto" not in proc.stdout


@pytest.mark.slow
def test_a_bug_keeps_its_traceback(neo, tmp_path):
    """Only neotrain's own errors are one-line user errors; anything else is a bug."""
    import subprocess
    import sys

    script = (
        "import train.verbs.info\n"
        "def broken(cfg): raise ValueError('an internal bug')\n"
        "train.verbs.info.run = broken\n"
        "from train.cli import main\n"
        "main(['info'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "ValueError: an internal bug" in proc.stderr


@pytest.mark.slow
def test_bad_model_config_is_a_clear_error(neo):
    proc = neo("info", "model.num_heads=5", check=False)
    assert proc.returncode == 2
    assert "model.num_heads=5 does not divide model.hidden_size=128" in proc.stderr
    unknown = neo("info", "model.num_head=5", check=False)
    assert unknown.returncode != 0 and "num_head" in unknown.stderr


@pytest.mark.slow
def test_export_and_import_round_trip_through_the_cli(neo, tmp_path):
    import torch

    from data_prep.tokenizers import load_tokenizer
    from train.checkpoints.load import load_model
    from train.checkpoints.model_format import save_checkpoint
    from train.config.model import ModelConfig
    from train.model.gpt import GPT

    config = ModelConfig(
        hidden_size=32, num_heads=2, num_layers=2, attention_types=[[["global", "local"], 1]]
    )
    model = GPT(config).init_weights(torch.Generator().manual_seed(0))
    missing = neo("export", check=False)  # no demo run yet
    assert missing.returncode == 2 and "make demo" in missing.stderr
    # What `make demo` leaves: the run's final model in runs/demo/model.
    save_checkpoint(
        tmp_path / "runs/demo/model", config, model.state_dict(), load_tokenizer("gpt2")
    )

    out = neo("export").stdout  # the embedded defaults: runs/demo -> exports/demo
    assert "exported tiny" in out and "exports/demo" in out and "verified" in out
    assert "the card's usage: pipeline('text-generation') gave 5 continuations" in out
    exported = tmp_path / "exports/demo"
    assert json.loads((exported / "config.json").read_text())["model_type"] == "gpt_neo"
    assert "verified" in neo("verify", str(exported)).stdout
    shutil.copytree(exported, tmp_path / "runs/demo/hf")  # what neo import reads by default
    assert "imported hf (1.6M parameters" in neo("import").stdout  # named after its directory
    again = load_model(tmp_path / "runs/demo/imported")
    ids = torch.randint(0, 50257, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids))

    proc = neo("export", check=False)  # the output exists now
    assert proc.returncode == 2 and "overwrite=true" in proc.stderr
    missing = neo("export", "input=nowhere", "output=x", check=False)
    assert missing.returncode == 2 and "nowhere" in missing.stderr
