import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
# The installed console script itself, so that packaging (entry point, configs as package data)
# is under test too.
NEO = str(Path(sys.executable).with_name("neo"))

# Tests run offline, always: no hub lookups from transformers/datasets/wandb.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def machine_cache(tmp_path_factory):
    """The measured matmul peaks (train/machine.py) are cached for this session only, never in
    the developer's ~/.cache; every `neo` subprocess inherits the variable. (Not
    XDG_CACHE_HOME: DeepSpeed's JIT-built ops are cached under it and would be rebuilt.)"""
    os.environ["NEOTRAIN_CACHE_DIR"] = str(tmp_path_factory.mktemp("neotrain_cache"))


def tiny_config(**overrides) -> ModelConfig:
    """A random small model: 2-4 layers, window shorter than the sequences tests use."""
    values = dict(
        name="test",
        vocab_size=1000,
        max_position_embeddings=128,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        attention_types=[[["global", "local"], 2]],
        window_size=8,
        sparse_stride=8,
    )
    values.update(overrides)
    return ModelConfig(**values).validate()


@pytest.fixture
def neo(tmp_path):
    """Run the `neo` console script in a subprocess, in a scratch working directory."""

    def run(*args, check=True, cwd=None):
        proc = subprocess.run(
            [NEO, *args],
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"neo {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    return run
