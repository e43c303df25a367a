"""openMind (Ascend's `from openmind import pipeline`, the GPT-Neo 1.3B card's usage on NPU)
on our export. openmind 1.0.0 cannot be installed beside neotrain: it requires Python < 3.11
and pins transformers <= 4.45.2, deepspeed <= 0.15.4 and torch 2.1.0 with torch-npu, where we
need transformers >= 4.46 and deepspeed >= 0.16. So it gets an environment of its own: its
PyTorch pipeline with the transformers it pins (4.45.2), on this Python (3.11, hence
--ignore-requires-python) and torch 2.13 CPU (2.1.0 would be a multi-GB CUDA download; no
torch-npu, which needs Ascend's CANN)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from data_prep.tokenizers import load_tokenizer
from train.checkpoints.export import export_hf
from train.checkpoints.model_format import save_checkpoint
from train.config.model import ModelConfig
from train.model.gpt import GPT

CHECK = ROOT / "tests" / "assets" / "openmind_check.py"
PINS = [
    "torch==2.13.0",
    "transformers==4.45.2",
    "numpy<2",
    "accelerate==1.0.0rc1",
    "einops==0.8.0",
    "tabulate",
    "openmind-hub==1.3.0",
]


def pip(venv: Path, *args: str) -> None:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_openmind_pipeline_loads_the_export(tmp_path):
    config = ModelConfig(
        hidden_size=64,
        num_heads=4,
        num_layers=2,
        window_size=16,
        attention_types=[[["global", "local"], 1]],
    )
    model = GPT(config).init_weights(torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "ckpt", config, model.state_dict(), load_tokenizer("gpt2"))
    export_hf(tmp_path / "ckpt", tmp_path / "fp32", usage=False)
    export_hf(tmp_path / "ckpt", tmp_path / "bf16", dtype=torch.bfloat16, usage=False)

    venv = tmp_path / "openmind"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip(venv, *PINS)
    pip(venv, "--no-deps", "--ignore-requires-python", "openmind==1.0.0")
    for name, tolerance in (("fp32", 1e-5), ("bf16", 0.05)):  # bf16 read back as fp32 by 4.45
        done = subprocess.run(
            [str(venv / "bin" / "python"), str(CHECK), str(tmp_path / name)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        line = done.stdout.strip().splitlines()[-1]
        assert line.startswith("openmind ok: transformers 4.45.2, GPTNeoForCausalLM"), line
        assert float(line.rsplit(" ", 1)[1]) < tolerance, line
