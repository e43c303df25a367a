"""The loop's parts, one at a time: the resume decision, run-checkpoint pruning and identity,
the run state, and validation as sums over documents (the same on 1 and 2 ranks, bits per
byte counted on the text)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_config
from run_ranks import run_distributed

from data_prep.tokenizers import load_tokenizer
from train.checkpoints.run_format import CHECKPOINTS, STATE_FILE, differences, tag
from train.config import compose
from train.config.resolve import World, resolve_train
from train.data.pretrain import load as load_data
from train.data.records import Skipped
from train.distributed.collectives import merged
from train.distributed.devices import ACCELERATORS
from train.errors import ConfigError
from train.evals.items import Item
from train.evals.scoring import Scorer
from train.evals.suite import prepare_task
from train.evals.val import val_task
from train.loop.checkpointing import RunCheckpoints
from train.loop.engine import Layout
from train.loop.state import TrainState
from train.model.gpt import GPT
from train.verbs.train import run_identity

# --------------------------------------------------------------------------------------------
# resume decisions


@pytest.mark.parametrize(
    ("saved", "now", "mode"),
    [
        ((2, 2, "bf16"), (2, 2, "bf16"), "exact"),
        ((2, 2, "bf16"), (4, 2, "bf16"), "universal"),  # world size, within ZeRO-1/2
        ((2, 1, "bf16"), (2, 2, "bf16"), "universal"),
        ((2, 2, "bf16"), (2, 2, "fp32"), "universal"),  # precision=auto on another machine
        ((2, 3, "fp32"), (8, 3, "fp32"), "universal"),  # within ZeRO-3
        ((2, 2, "fp32"), (2, 3, "fp32"), "consolidated"),  # across the families
        ((2, 3, "fp32"), (2, 1, "fp32"), "consolidated"),
        ((1, 0, "fp32"), (2, 0, "fp32"), "consolidated"),  # ZeRO-0 has no universal form
        ((2, 0, "fp32"), (2, 2, "fp32"), "consolidated"),
        ((1, 0, "fp32"), (1, 0, "bf16"), "consolidated"),
    ],
)
def test_resume_mode_follows_the_two_layouts(saved, now, mode):
    assert Layout(*now).resume_mode(Layout(*saved)) == mode


def test_identity_differences_name_the_key_and_both_values():
    saved = {
        "model": {"hidden_size": 64, "num_layers": 2},
        "data": {"components": [{"manifest": "aa", "weight": 1.0}], "seed": 1},
    }
    now = {
        "model": {"hidden_size": 32, "num_layers": 2},
        "data": {"components": [{"manifest": "bb", "weight": 1.0}], "seed": 1},
    }
    assert differences(saved, now) == [
        "data.components[0].manifest: 'aa' -> 'bb'",
        "model.hidden_size: 64 -> 32",
    ]
    assert differences(saved, saved) == []


def test_prune_keeps_the_last_whole_checkpoints(tmp_path):
    ckpts = RunCheckpoints(tmp_path, keep_last=2, rank=0, acc=ACCELERATORS["cpu"])
    for step in (1, 2, 3, 4):
        (ckpts.directory / tag(step)).mkdir(parents=True)
        (ckpts.directory / tag(step) / STATE_FILE).write_text("{}")
    (ckpts.directory / f"{tag(1)}_universal").mkdir()
    (ckpts.directory / tag(5)).mkdir()  # a save that died before its trainer_state.json
    ckpts._prune()
    left = sorted(p.name for p in ckpts.directory.iterdir())
    assert left == [tag(3), tag(4), tag(5)]


def test_run_state_advances_and_round_trips_through_json():
    state = TrainState()
    state.advance(samples=8, tokens=512, applied=True)
    state.advance(samples=8, tokens=512, applied=False)
    state.advance(samples=8, tokens=512, applied=False)
    assert state == TrainState(3, 24, 1536, bad_steps_in_row=2, skipped_steps=2)
    state.advance(samples=8, tokens=512, applied=True)
    assert state.bad_steps_in_row == 0 and state.skipped_steps == 2
    saved = json.loads(json.dumps({**state.as_dict(), "world_size": 2}))
    assert TrainState.from_dict(saved) == state


# --------------------------------------------------------------------------------------------
# validation: the split's documents as a val task, summed over ranks


def validation_task():
    """Twelve documents of two sources with their UTF-8 bytes, as the trainer loads them."""
    tok = load_tokenizer("gpt2")
    texts = [("Easy", "the cat sat on the mat. " * (3 + i)) for i in range(6)]
    texts += [("Hard", f"zq{i} xv wök {i * 7919} ¿qué? " * (2 + i)) for i in range(6)]
    items = [
        Item(0, f"doc{n}", tokens=tok.encode(t), bytes=len(t.encode()), source=s)
        for n, (s, t) in enumerate(texts)
    ]
    task = val_task("val", items, None, 0, Skipped(), "test")
    return prepare_task(task, tok, 16, 0, 0)


def _validate_on_rank(world: int) -> dict:
    import torch.distributed as dist

    scorer = Scorer(model(), "cpu", 16, batch_tokens=64, rank=dist.get_rank(), world_size=world)
    result = validation_task().run(scorer, merged)
    return {"metrics": result.metrics, "per_source": result.per_source}


def model() -> GPT:
    config = tiny_config(vocab_size=load_tokenizer("gpt2").vocab_size, max_position_embeddings=16)
    return GPT(config).init_weights(torch.Generator().manual_seed(1)).eval()


def test_validation_sums_documents_and_is_equal_on_one_and_two_ranks():
    net = model()
    prepared = validation_task()
    nll, count, text_bytes = 0.0, 0, 0
    with torch.no_grad():  # every document on its own, window by window, by hand
        for item, requests in zip(prepared.task.items, prepared.requests, strict=True):
            for r in requests:
                seq = list(r.context + r.continuation)[-17:]
                logits = net(torch.tensor([seq[:-1]]))[0, -len(r.continuation) :]
                nll += F.cross_entropy(logits, torch.tensor(r.continuation), reduction="sum").item()
                count += len(r.continuation)
            text_bytes += item.bytes
    assert count == sum(len(i.tokens) for i in prepared.task.items)
    one = run_distributed(_validate_on_rank, 1, 1)[0]
    two = run_distributed(_validate_on_rank, 2, 2)
    assert two[0] == two[1]  # every rank gets the gathered numbers
    assert one["metrics"]["loss"] == pytest.approx(nll / count, rel=1e-6)
    assert one["metrics"]["bits_per_byte"] == pytest.approx(
        nll / text_bytes / math.log(2), rel=1e-6
    )
    for key, value in one["metrics"].items():
        assert two[0]["metrics"][key] == pytest.approx(value, rel=1e-9)
    sources = one["per_source"]
    assert set(sources) == {"Easy", "Hard"}
    weighted = sum(s["loss"] * s["tokens"] for s in sources.values()) / count
    assert one["metrics"]["loss"] == pytest.approx(weighted, rel=1e-9)


# --------------------------------------------------------------------------------------------
# runs written before the config restructure


BEFORE = ROOT / "tests" / "assets" / "trainer_state_before_restructure.json"


def test_a_checkpoint_written_before_the_restructure_resumes_exactly(tmp_path, corpus):
    """A trainer_state.json `neo train` wrote before the config and the layout changed (the
    same corpus, prepared the same way): the same command today finds the same identity and
    resumes it as is (no universal or consolidated load). Resumed for real by the new code, its
    losses were those of the old code's uninterrupted run, bit for bit (the note of issue 22)."""
    before = json.loads(BEFORE.read_text())
    saved = before["trainer_state"]
    overrides = [*before["overrides"], f"data.path={corpus}", f"run_dir={tmp_path}"]
    resolved = resolve_train(compose.to_schema(compose.compose("train", overrides)), World())
    cfg = resolved.cfg
    identity = run_identity(cfg, load_data(cfg.data, cfg.seq_len).identity)
    assert differences(saved["identity"], identity) == []
    tag_dir = tmp_path / CHECKPOINTS / tag(saved["step"])
    tag_dir.mkdir(parents=True)
    (tag_dir / STATE_FILE).write_text(json.dumps(saved))
    (tmp_path / CHECKPOINTS / "latest").write_text(tag(saved["step"]))
    layout = Layout(1, cfg.deepspeed.zero_stage, cfg.precision)
    checkpoints = RunCheckpoints(tmp_path, keep_last=2, rank=0, acc=ACCELERATORS["cpu"])
    resume = checkpoints.plan_resume(identity, layout, cfg.optim.name)
    assert resume.mode == "exact" and resume.tag == tag(4)


def test_a_muon_checkpoint_that_would_need_resharding_is_refused(tmp_path, corpus):
    """DeepSpeed's universal checkpoint cannot reshard Muon's momentum (DeepSpeed issue 8608):
    a resume of a Muon run on another world size is refused, naming both layouts, rather than
    restarting the momentum; the same resume of an AdamW run goes through the universal form."""
    before = json.loads(BEFORE.read_text())
    overrides = [*before["overrides"], f"data.path={corpus}", f"run_dir={tmp_path}"]
    cfg = resolve_train(compose.to_schema(compose.compose("train", overrides)), World()).cfg
    identity = run_identity(cfg, load_data(cfg.data, cfg.seq_len).identity)
    saved = {**before["trainer_state"], "world_size": 2, "zero_stage": 2, "precision": "fp32"}
    (tmp_path / CHECKPOINTS / tag(saved["step"])).mkdir(parents=True)
    (tmp_path / CHECKPOINTS / tag(saved["step"]) / STATE_FILE).write_text(json.dumps(saved))
    (tmp_path / CHECKPOINTS / "latest").write_text(tag(saved["step"]))
    checkpoints = RunCheckpoints(tmp_path, keep_last=2, rank=0, acc=ACCELERATORS["cpu"])
    one_rank = Layout(1, 2, "fp32")
    assert checkpoints.plan_resume(identity, one_rank, "adamw").mode == "universal"
    with pytest.raises(ConfigError) as error:
        checkpoints.plan_resume(identity, one_rank, "muon")
    assert "(2 ranks, ZeRO-2, fp32) cannot resume on 1 ranks at ZeRO-2, fp32" in str(error.value)
    assert "DeepSpeed issue 8608" in str(error.value)
    # Where the layout is the same, nothing needs resharding.
    assert checkpoints.plan_resume(identity, Layout(2, 2, "fp32"), "muon").mode == "exact"
