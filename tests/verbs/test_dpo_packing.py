"""dpo.packing: a micro-batch's chosen and rejected sequences packed into rows of the context
give each pair the log-probabilities, losses and gradients it has padded one per row, on any
world size, and the reference is scored in the training layout.

Tolerance: the two layouts run the same per-sequence arithmetic on rows of other lengths, so
only the order of fp32 reductions inside matmuls and softmaxes may differ (a few ulps of terms
of size ~10, summed over up to a few hundred tokens): rtol 1e-5 on sums of size 10-1000 is
~100 ulps of headroom, far below any error of layout (a sequence seeing its neighbour, a
position not restarting, a log-probability summed into the wrong sequence moves it by > 1e-2).
"""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from data_prep.tokenizers import load_tokenizer
from train.data.dpo import BUNDLED, PairBatches
from train.data.preference import collate_pairs, read_pairs
from train.loop import reference
from train.model.gpt import GPT
from train.model.preference import DpoLoss, PreferenceGPT

CONTEXT = 256


@pytest.fixture(scope="module")
def pairs():
    return read_pairs(str(BUNDLED), load_tokenizer("gpt2"), CONTEXT).pairs[:24]


def model(seed=0) -> PreferenceGPT:
    config = tiny_config(
        vocab_size=50257,
        max_position_embeddings=CONTEXT,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
    )
    m = PreferenceGPT(config, DpoLoss(beta=0.1))
    m.load_state_dict(GPT(config).init_weights(torch.Generator().manual_seed(seed)).state_dict())
    return m


def tensors(arrays):
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def test_packed_rows_hold_each_sequence_once_with_restarting_positions(pairs):
    group = pairs[:8]
    padded, packed = collate_pairs(group, 50256), collate_pairs(group, 50256, CONTEXT)
    assert packed["input_ids"].shape[1] <= CONTEXT
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # several to a row
    assert packed["input_ids"].size < padded["input_ids"].size
    sequences = [p.chosen for p in group] + [p.rejected for p in group]
    for s, row in enumerate(sequences):
        r, t = np.nonzero(packed["sequences"] == s)
        assert len(set(r.tolist())) == 1 and len(t) == len(row)  # whole, in one row
        assert list(packed["input_ids"][r, t]) == row
        assert list(packed["positions"][r, t]) == list(range(len(row)))
        assert len(set(packed["documents"][r, t].tolist())) == 1
        # the same targets as the padded row (the response's next tokens)
        assert list(packed["targets"][r, t]) == list(padded["targets"][s, : len(row)])
    padding = packed["sequences"] < 0
    assert (packed["documents"][padding] == -1).all() and (packed["targets"][padding] == -100).all()
    for key in ("response_tokens", "reference"):
        assert np.array_equal(packed[key], padded[key])


def test_packed_and_padded_give_each_pair_the_same_logps_and_losses_over_steps(pairs):
    """The same model trained 3 steps (AdamW) of 6 pairs on padded and on packed
    micro-batches: the same per-sequence log-probabilities, losses and metrics at each step,
    within fp32 reduction order; the sequences of a micro-batch never see each other (a
    changed neighbour leaves a sequence's log-probability alone)."""
    runs = {}
    for packed_len in (None, CONTEXT):
        m = model()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        out = []
        for step in range(3):
            group = pairs[6 * step : 6 * step + 6]
            batch = tensors(collate_pairs(group, 50256, packed_len))
            with torch.no_grad():
                rows = {k: v for k, v in batch.items() if k not in ("response_tokens", "reference")}
                logps = m.sequence_logps(**rows, count=2 * len(group))
            loss = m(**batch)
            opt.zero_grad()
            (loss.total / loss.count).backward()
            opt.step()
            out.append((logps, loss.total.detach(), loss.sums))
        runs[packed_len] = out
    for (a_logps, a_loss, a_sums), (b_logps, b_loss, b_sums) in zip(*runs.values(), strict=True):
        torch.testing.assert_close(b_logps, a_logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b_loss, a_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b_sums, a_sums, rtol=1e-5, atol=1e-5)
    # attention blocked per sequence: another pair beside it changes nothing
    m = model().eval()
    with torch.no_grad():
        alone = tensors(collate_pairs(pairs[:1], 50256, CONTEXT))
        crowd = tensors(collate_pairs(pairs[:1] + pairs[6:12], 50256, CONTEXT))
        one = m.sequence_logps(**{k: alone[k] for k in ROWS}, count=2)
        many = m.sequence_logps(**{k: crowd[k] for k in ROWS}, count=14)
    torch.testing.assert_close(many[[0, 7]], one, rtol=1e-5, atol=1e-5)


ROWS = ("input_ids", "targets", "positions", "documents", "sequences")


@pytest.mark.parametrize("world", [2, 3])
def test_packed_reference_shares_add_up_and_match_the_padded_scores(pairs, world):
    """reference.score with packing: the ranks' shares sum to one rank's packed scores bit for
    bit (each micro-batch packed alike on any world size), and those equal the padded scores
    within fp32 reduction order."""
    weights = model().state_dict()
    config, cpu = model().config, torch.device("cpu")

    def scores(rank, world, packed_len=CONTEXT):
        return reference.score(
            config, weights, pairs[:7], cpu, torch.float32, 2, 50256, rank, world, packed_len
        )

    whole = scores(0, 1)
    assert torch.equal(sum(scores(r, world) for r in range(world)), whole)
    torch.testing.assert_close(whole, scores(0, 1, None), rtol=1e-5, atol=1e-5)


def test_packed_micro_batches_do_not_depend_on_the_world_size(pairs):
    """Rank r of 2's micro-batch m is one rank's micro-batch 2m + r, packed into the same rows;
    the tokens a step computes are counted from them (not always fewer than padded: the rows
    are padded to the longest, which can hold more than the longest pair)."""
    one = PairBatches(pairs, 7, 0, 1, 2, 4, 50256, CONTEXT)
    two = [PairBatches(pairs, 7, r, 2, 2, 2, 50256, CONTEXT) for r in range(2)]
    for step in range(2):
        for m in range(2):
            for r in range(2):
                a, b = one.micro_batch(step, 2 * m + r), two[r].micro_batch(step, m)
                assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert one.tokens_in_step(step) == sum(
            one.micro_batch(step, m)["input_ids"].size for m in range(4)
        )


def test_packing_an_empty_prompt_and_a_row_that_fills_the_context():
    """An implicit prompt can be empty (no target at position 0, as padded) and a pair cut to
    the context fills a row alone: packed, every sequence keeps the padded layout's targets."""
    from train.data.preference import Pair

    full = list(range(1, CONTEXT + 1))
    group = [Pair("a", 0, [5, 6, 7], [5, 8]), Pair("b", 3, full, full[:4] + [9])]
    padded, packed = collate_pairs(group, 0), collate_pairs(group, 0, CONTEXT)
    assert packed["input_ids"].shape == (2, CONTEXT)
    for s in range(4):
        r, t = np.nonzero(packed["sequences"] == s)
        assert list(packed["targets"][r, t]) == list(padded["targets"][s, : len(t)])
        assert list(packed["positions"][r, t]) == list(range(len(t)))
    assert list(packed["response_tokens"]) == [3, CONTEXT - 3, 2, 2]
