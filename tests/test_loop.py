"""The loop's parts, one at a time: the resume decision, run-checkpoint pruning and identity,
the run state, and validation as sums (exact with masked targets, the same on 1 and 2 ranks,
bits per byte counted on the text)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from distributed import run_distributed

from data_prep.tokenizers import load_tokenizer
from train.accelerator import ACCELERATORS
from train.engine import Layout
from train.loop.checkpoints import STATE_FILE, RunCheckpoints, differences, tag
from train.loop.state import TrainState
from train.loop.validation import IGNORE, evaluate, utf8_bytes
from train.model import GPT

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
    saved = {"model": {"hidden_size": 64, "num_layers": 2}, "data": {"components": [
        {"manifest": "aa", "weight": 1.0}], "seed": 1}}  # fmt: skip
    now = {"model": {"hidden_size": 32, "num_layers": 2}, "data": {"components": [
        {"manifest": "bb", "weight": 1.0}], "seed": 1}}  # fmt: skip
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
# validation: sums, masks, ranks, bytes


def test_bits_per_byte_counts_text_not_separators_or_ignored_targets():
    tok = load_tokenizer("gpt2")
    first, second = tok.encode("héllo wörld"), tok.encode(" abc")
    tokens = torch.tensor([*first, tok.eod_id, *second, IGNORE, IGNORE]).numpy()
    assert utf8_bytes(tok, tokens, tok.eod_id) == len("héllo wörld".encode()) + len(" abc")


def validation_batches(rank: int, world: int):
    """Four fixed (inputs, targets) batches, some targets ignored; rank r takes every
    world-th batch starting at r."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(4):
        ids = torch.randint(0, 1000, (2, 17), generator=g)
        inputs, targets = ids[:, :-1], ids[:, 1:].clone()
        targets[b % 2, : 3 + b] = IGNORE  # uneven masks: means of means would be wrong
        batches.append((inputs, targets))
    return batches[rank::world]


def model() -> GPT:
    return GPT(tiny_config()).init_weights(torch.Generator().manual_seed(1))


def _evaluate_on_rank(world: int) -> dict:
    import torch.distributed as dist

    rank = dist.get_rank()
    return evaluate(model(), validation_batches(rank, world), load_tokenizer("gpt2"), 50256, "cpu")


def test_validation_is_exact_with_masked_targets_and_equal_on_one_and_two_ranks():
    net, tok = model().eval(), load_tokenizer("gpt2")
    loss_sum, count, text_bytes = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in validation_batches(0, 1):
            logits = net(inputs).reshape(-1, 1000)
            loss_sum += F.cross_entropy(
                logits, targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
            ).item()
            count += int((targets != IGNORE).sum())
            text_bytes += sum(utf8_bytes(tok, row, 50256) for row in targets.numpy())
    one = run_distributed(_evaluate_on_rank, 1, 1)[0]
    two = run_distributed(_evaluate_on_rank, 2, 2)
    assert two[0] == two[1]  # every rank gets the all-reduced numbers
    assert one["val_loss"] == pytest.approx(loss_sum / count, rel=1e-6)
    assert two[0]["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    assert one["val_bpb"] == pytest.approx(loss_sum / text_bytes / math.log(2), rel=1e-6)
    assert two[0]["val_bpb"] == pytest.approx(one["val_bpb"], rel=1e-6)
