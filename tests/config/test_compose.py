"""Composing a verb's config: a key the verb does not read, a `+key` Hydra would add, a wrong
type, an unknown option or a renamed key is one line naming the key, and exit 2."""

import subprocess

import pytest
from conftest import NEO

from train.config import compose
from train.errors import ConfigError

ONE_LINE_MISTAKES = [
    (
        ["sft", "data.path=/nonexistent/x.jsonl", "max_steps=1"],
        "neo sft reads its data from sft.path",
    ),
    (["sft", "eval.tasks=[lambada_openai]"], "eval.tasks is not a key of neo sft"),
    (["train", "+foo=1"], "foo is not a key of neo train"),
    (["train", "foo=1"], "foo is not a key of neo train"),
    (["info", "+model.hiden_size=1"], "neo info: did you mean model.hidden_size?"),
    (["eval", "tasks=[nope]"], "tasks: unknown task 'nope'"),
    (["train", "model=nope"], "model=nope: no such option; configs/model/ has gpt3_13b"),
    (["info", "world_size=abc"], "world_size=abc: Value 'abc' of type 'str' could not be"),
    (["train", "max_steps=[1"], "max_steps=[1: "),
    (["train", "-m", "max_steps=2,abc"], "max_steps=abc: Value 'abc' of type 'str'"),
    (["eval", "model=runs/demo"], "the checkpoint is checkpoint= now"),
    (["generate", "model=runs/demo"], "the checkpoint is checkpoint= now"),
    (["sft", "task=classification"], "the task head is head= now"),
    (["train", "eval.val_tokens=5"], "neo train's validation budget is eval_tokens"),
    (["train", "max_step=3"], "did you mean max_steps?"),
    (["train", "-m", "max_steps=1,2", "--cfg", "job"], "--multirun and --cfg: give one of them"),
    (["train", "optim.name=sgd"], "optim.name='sgd' is not one of adamw, muon"),
    (["train", "optim.schedule=linear"], "optim.schedule='linear' is not one of cosine, wsd"),
    (["train", "optim.cooldown=0"], "optim.cooldown=0.0 must be in (0, 1]"),
]


@pytest.mark.parametrize(("args", "message"), ONE_LINE_MISTAKES, ids=lambda v: str(v)[:40])
def test_every_composition_mistake_is_one_line_and_exit_2(tmp_path, args, message):
    proc = subprocess.run([NEO, *args], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"neo {args[0]}: error: ") and message in lines[0], lines[0]
    assert not list(tmp_path.iterdir())  # nothing ran: no run directory, no data


@pytest.mark.parametrize(
    ("verb", "key"),
    [
        ("train", "deepspeed.extra.zero_optimization.overlap_comm"),  # raw DeepSpeed keys
        ("train", "data.blend"),
        ("train", "eval.task.mine"),  # a task of the user's own
        ("eval", "task.mine.path"),
        ("sft", "head.tokens.start"),
        ("train", "hydra.job.chdir"),
        ("train", "hydra/launcher"),
    ],
)
def test_keys_inside_mappings_and_hydra_keys_are_the_owners_business(verb, key):
    compose.check_key(verb, key)


def test_sweeps_are_checked_job_by_job():
    assert compose.jobs(["a=1,2", "b=x,y"]) == [
        ["a=1", "b=x"],
        ["a=1", "b=y"],
        ["a=2", "b=x"],
        ["a=2", "b=y"],
    ]
    wide = compose.jobs([f"k{i}=0,1" for i in range(7)])  # 128 jobs: the first 64, and each
    assert len(wide) == compose.MAX_JOBS_CHECKED + 1  # value alone (k0=1 is not among them)
    assert ["k0=1"] + [f"k{i}=0" for i in range(1, 7)] in wide
    with pytest.raises(ConfigError, match="max_steps=abc"):
        compose.check("train", ["max_steps=1,abc"], multirun=True)
    compose.check("train", ["max_steps=1,2", "optim.lr=1e-3,2e-3"], multirun=True)


def test_a_composed_config_is_the_verbs_schema():
    from train.config.sft import SftConfig

    cfg = compose.to_schema(
        compose.compose("sft", ["head=classification", "epochs=2", "run_dir=r"])
    )
    assert isinstance(cfg, SftConfig) and cfg.head.type == "classification" and cfg.epochs == 2
    assert cfg.max_steps is None  # one of epochs and max_steps: resolve decides the steps


def test_a_mistake_found_after_hydra_made_the_run_directory_removes_only_what_it_made(tmp_path):
    """Hydra makes runs/<name> before the verb checks its values: a refused run removes it
    again, and leaves alone the folders that were there before (and anything in them)."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mine.txt").write_text("a user's file")
    proc = subprocess.run(
        [NEO, "train", "optim.schedule=linear"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mine.txt"]
