import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zstandard
from filelock import FileLock

from data_prep.config import PrepConfig, SentencePieceConfig
from data_prep.prep import prepare
from train.config.model import ModelConfig

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
    """The measured matmul peaks (train/distributed/machine.py) are cached for this session
    only, never in the developer's ~/.cache; every `neo` subprocess inherits the variable. (Not
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


SHARED_EVAL = ROOT.parent / "shared" / "eval"
needs_shared_eval = pytest.mark.skipif(
    not SHARED_EVAL.is_dir(),
    reason=f"{SHARED_EVAL} (the real LAMBADA, WikiText-2 and PubMedQA files) is not here; "
    "it always is in CI",
)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), keep together what must
    not run at once or would be built twice: every test on the real one-node SLURM goes to one
    worker (the `slurm` fixture may start it; a second worker would start it again), and the
    tests of a module that share a module-scoped fixture go to one worker, which builds it
    once."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = fixtures.name2fixturedefs if fixtures else {}
        if "slurm" in defs:
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif any(d[-1].scope == "module" for d in defs.values()):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


def built_once(tmp_path_factory, name: str, build) -> Path:
    """build(directory) for this test session, once: with pytest-xdist, each worker is a session
    of its own whose base directory lies inside the run's, so the first worker builds under a
    lock there and the others wait and read its result; serially, the session's own."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    directory = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (directory / ".built").is_file():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            build(directory)
            (directory / ".built").touch()
    return directory


@pytest.fixture(scope="session")
def trained_gpt2_model(tmp_path_factory):
    """A small model with GPT-2's vocabulary, trained for a few hundred steps on the bundled
    sample corpus (so that its predictions are not uniform), as a neotrain checkpoint and as
    the Hugging Face directory `neo export` writes. Built once per run (about a minute)."""
    return built_once(tmp_path_factory, "trained_gpt2", _train_gpt2_model)


def _train_gpt2_model(root: Path) -> None:
    from data_prep.tokenizers import load_tokenizer
    from train.checkpoints.export import export_hf
    from train.checkpoints.model_format import save_checkpoint
    from train.model.gpt import GPT

    tokenizer = load_tokenizer("gpt2")
    sample = ROOT / "data_prep" / "sample" / "pile_sample.jsonl.zst"
    with zstandard.open(sample, "rb") as f:
        lines = io.TextIOWrapper(f, encoding="utf-8").read().splitlines()
    ids = []
    for line in lines[:150]:
        ids += tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eod_id]
    config = tiny_config(
        name="evaltest",
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        window_size=16,
    )
    torch.manual_seed(0)
    model = GPT(config).init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor(ids)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 65, (8,), generator=generator)
        batch = torch.stack([data[s : s + 65] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_checkpoint(root / "ckpt", config, model.state_dict(), tokenizer)
    export_hf(root / "ckpt", root / "hf")


# --------------------------------------------------------------------------------------------
# prepared corpora, for the tests that train (tests/verbs, tests/config)


@pytest.fixture(scope="session")
def documents(tmp_path_factory) -> Path:
    """300 documents of the bundled sample, cut to 8 kB each: the corpus the golden loss
    curve was pinned on, written by the accelerator check's own function (bench/device_runs.py),
    so that the check trains on it too."""
    sys.path.insert(0, str(ROOT / "bench"))
    from device_runs import write_documents

    return write_documents(tmp_path_factory.mktemp("documents") / "small.jsonl")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, documents) -> Path:
    """The documents prepared by `neo prep` with the GPT-2 tokenizer."""
    output = tmp_path_factory.mktemp("corpus") / "data"
    prepare(
        PrepConfig(input=str(documents), output=str(output), workers=1, validation_fraction=0.05)
    )
    return output


@pytest.fixture(scope="session")
def bf16_corpus(tmp_path_factory, documents) -> Path:
    """The same documents with a 512-token SentencePiece BPE trained on them, for the bf16
    runs (with BF16 below): on a CPU without native bf16 (AVX2 only), bf16 matmuls are
    emulated, about 100x slower than fp32, and a 50,257-token head made each bf16 test take
    ten minutes there. The bf16 code paths do not depend on the vocabulary size."""
    output = tmp_path_factory.mktemp("bf16_corpus") / "data"
    prepare(
        PrepConfig(
            input=str(documents),
            output=str(output),
            workers=1,
            validation_fraction=0.05,
            tokenizer="sentencepiece",
            sentencepiece=SentencePieceConfig(vocab_size=512),
        )
    )
    return output
