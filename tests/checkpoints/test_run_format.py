"""A run's checkpoint records, damaged or hand-edited: named, one line, never followed
elsewhere."""

import json

import pytest

from train.checkpoints.run_format import find, read_state
from train.errors import CheckpointError


def test_latest_names_a_checkpoint_here_not_a_path_elsewhere(tmp_path, neo):
    elsewhere = tmp_path / "elsewhere" / "step_00000001"
    elsewhere.mkdir(parents=True)
    (elsewhere / "trainer_state.json").write_text("{}")
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "latest").write_text("../../elsewhere/step_00000001\n")
    with pytest.raises(CheckpointError, match=r"latest: holds '\.\./\.\./elsewhere.*not a"):
        find(tmp_path / "run")
    proc = neo("export", f"input={tmp_path / 'run'}", f"output={tmp_path / 'out'}", check=False)
    assert proc.returncode == 2 and "not a checkpoint's tag" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"step": 4,\n "identity": }', r"trainer_state.json:2: not valid JSON"),
        ('{"step": 4}', r"identity, model, world_size, zero_stage, precision missing"),
        ("[1, 2]", r"step, identity, .* missing"),
    ],
)
def test_a_damaged_trainer_state_is_named(tmp_path, text, message):
    (tmp_path / "trainer_state.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        read_state(tmp_path)


def test_a_current_trainer_state_reads(tmp_path):
    from conftest import ROOT

    fixture = ROOT / "tests" / "assets" / "trainer_state_before_restructure.json"
    saved = json.loads(fixture.read_text())["trainer_state"]
    (tmp_path / "trainer_state.json").write_text(json.dumps(saved))
    assert read_state(tmp_path)["step"] == saved["step"]
