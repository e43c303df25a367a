"""Nothing loaded runs code: every reader of a pickled file, DeepSpeed's included, refuses a
file that asks for any callable besides tensors and DeepSpeed's checkpoint types. Each test
plants a payload that would create a file when unpickled; the file must not appear."""

import builtins
import os
import shutil
from pathlib import Path

import pytest
import torch
from runs import BF16, train

from train.checkpoints.hf import read_hf_state_dict
from train.checkpoints.pickles import FORCE, read_tensors, weights_only
from train.checkpoints.zero import checkpoint_layout, consolidated_state_dict, deepspeed_types
from train.errors import CheckpointError


class Payload:
    """Unpickling it opens (creates) `marker`: any callable would do as well, os.system too."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def plant(file: Path, marker: Path) -> None:
    """Add the payload to a pickled dict file, keeping everything else."""
    state = read_tensors(file, deepspeed_types(), mmap=False)
    state["planted"] = Payload(marker)
    torch.save(state, file)


def refused(error: CheckpointError, where) -> None:
    line = str(error)
    assert "\n" not in line and str(where) in line, line
    assert "asks to call io.open" in line and "would run code" in line, line
    assert "weights_only=False" not in line and "will likely succeed" not in line, line


def test_a_pickled_state_dict_is_read_weights_only(tmp_path):
    file, marker = tmp_path / "pytorch_model.bin", tmp_path / "PWNED"
    torch.save({"w": torch.ones(2), "planted": Payload(marker)}, file)
    with pytest.raises(CheckpointError) as e:
        read_hf_state_dict(tmp_path)
    refused(e.value, file)
    assert not marker.exists()


def test_a_damaged_file_is_not_called_unsafe(tmp_path):
    file = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(1000)}, file)
    file.write_bytes(file.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        read_tensors(file)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)


def test_a_library_asking_for_unsafe_loads_gets_weights_only_inside(tmp_path, monkeypatch):
    """DeepSpeed's readers call torch.load(weights_only=False): inside the context torch reads
    weights only regardless, and the environment is restored after."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    file, marker = tmp_path / "x.pt", tmp_path / "PWNED"
    torch.save({"planted": Payload(marker)}, file)
    with pytest.raises(CheckpointError) as e, weights_only([], "the checkpoint"):
        torch.load(file, weights_only=False)
    refused(e.value, "the checkpoint")
    assert not marker.exists()
    assert FORCE not in os.environ and os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, bf16_corpus) -> Path:
    """Two steps of ZeRO-2 in bf16 (an optimizer state file with DeepSpeed's own types)."""
    run = tmp_path_factory.mktemp("pickles") / "run"
    common = ("deepspeed=zero2", *BF16, "max_steps=2", "save_every=2", "eval_every=100")
    train(run, bf16_corpus, *common, "export_hf=false")
    return run


def test_every_file_of_a_deepspeed_checkpoint_reads_with_the_allow_list(zero2_run):
    files = sorted((zero2_run / "checkpoints" / "step_00000002").glob("*.pt"))
    assert len(files) == 2
    for file in files:
        assert read_tensors(file, deepspeed_types())


def copy_with_payload(run: Path, tmp_path: Path, pattern: str) -> tuple[Path, Path]:
    copy, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(run, copy)
    (file,) = (copy / "checkpoints" / "step_00000002").glob(pattern)
    plant(file, marker)
    return copy, marker


@pytest.mark.parametrize("pattern", ["mp_rank_00_model_states.pt", "*optim_states.pt"])
def test_consolidation_refuses_a_planted_payload(zero2_run, tmp_path, pattern):
    copy, marker = copy_with_payload(zero2_run, tmp_path, pattern)
    with pytest.raises(CheckpointError) as e:
        checkpoint_layout(copy / "checkpoints", "step_00000002")
        consolidated_state_dict(copy / "checkpoints", "step_00000002")
    assert "step_00000002" in str(e.value) and "would run code" in str(e.value)
    assert not marker.exists()


@pytest.mark.slow
def test_export_and_resume_refuse_a_planted_payload(zero2_run, tmp_path, bf16_corpus, neo):
    """`neo export` of the run (consolidation) and `neo train` resuming it (DeepSpeed's own
    load_checkpoint): one line each, exit 2, and the payload never runs."""
    copy, marker = copy_with_payload(zero2_run, tmp_path, "*optim_states.pt")
    out = tmp_path / "out"
    proc = neo("export", f"input={copy / 'checkpoints'}", f"output={out}", check=False)
    assert proc.returncode == 2 and "would run code" in proc.stderr, proc.stderr
    # Besides DeepSpeed's progress bar over the shards it read, one line.
    lines = [x for x in proc.stderr.splitlines() if x and not x.startswith("Loading checkpoint")]
    assert len(lines) == 1, proc.stderr
    common = ("deepspeed=zero2", *BF16, "max_steps=3", "save_every=2", "eval_every=100")
    proc = train(copy, bf16_corpus, *common, "export_hf=false", check=False)
    assert proc.returncode == 2 and "would run code" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists() and not out.exists()
    assert (copy / "checkpoints" / "latest").read_text().strip() == "step_00000002"
