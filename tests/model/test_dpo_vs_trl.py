"""neo dpo's log-probabilities, losses and rewards against TRL's DPOTrainer (TRL 1.16, a dev
dependency): the same tiny GPT-Neo as a policy and as a reference, the same pairs, TRL's own
tokenization, collator and loss code driven one pair at a time (its loss is a mean over the
batch, so one pair per batch gives each pair's loss)."""

import json
import logging

import numpy as np
import pairs
import pytest
import torch
import trl  # the dev dependency itself; its trainer is imported where it is used (below)
from conftest import tiny_config
from datasets import Dataset
from transformers import AutoTokenizer, GPTNeoForCausalLM

from data_prep.tokenizers import load_tokenizer
from train.checkpoints.export import export_hf
from train.checkpoints.model_format import save_checkpoint
from train.data.preference import collate_pairs, read_pairs
from train.model.preference import DpoLoss, PreferenceGPT, dpo_losses, metric_sums

# the shared records (tests/pairs.py), and a short chosen response against a long rejected one
RECORDS = [
    *pairs.RECORDS,
    {
        "prompt": "Q: 2 + 2 =",
        "chosen": " 4",
        "rejected": " 5 or so, I think, though it could be more",
    },
]


@pytest.fixture(scope="module", autouse=True)
def wandb_logger_as_found():
    """Importing TRL's trainers imports wandb, which makes its "wandb" logger keep every record
    (level DEBUG, its own handlers): a later test's wandb run would then hand wandb's records to
    pytest's log capture (tests/loop/test_metrics.py). Left as this module found it."""
    logger = logging.getLogger("wandb")
    found = logger.level, logger.propagate, list(logger.handlers)
    yield
    logger.setLevel(found[0])
    logger.propagate = found[1]
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    for handler in found[2]:
        logger.addHandler(handler)


def ulp(x: float) -> float:
    """The gap between x and the next fp32 number."""
    return float(np.spacing(np.float32(abs(x))))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two random tiny GPT-Neo models with GPT-2's vocabulary (policy, reference), as ours
    and as transformers loads them from `neo export`'s directories."""
    root = tmp_path_factory.mktemp("dpo_trl")
    tokenizer = load_tokenizer("gpt2")
    config = tiny_config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
    )
    out = {}
    for name, seed in (("policy", 1), ("reference", 2)):
        model = PreferenceGPT(config, DpoLoss())
        model.init_weights(torch.Generator().manual_seed(seed))
        save_checkpoint(root / name, config, model.state_dict(), tokenizer)
        export_hf(root / name, root / f"{name}-hf")
        out[name] = model.eval()
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return out, root, tokenizer, data


def trl_per_pair(root, loss_type: str, beta: float, label_smoothing: float = 0.0):
    """For each pair alone: TRL's ids (prompt, chosen, rejected), its loss and metrics, and
    the log-probabilities its loss code read: (chosen, rejected) of the policy and of the
    reference, caught at the models' outputs and summed as TRL sums them."""
    from trl import DPOConfig, DPOTrainer  # here: it imports wandb (see wandb_logger_as_found)

    assert trl.__version__ == "1.16.0"  # the version pyproject.toml's dev extra pins
    policy = GPTNeoForCausalLM.from_pretrained(root / "policy-hf").eval()
    reference = GPTNeoForCausalLM.from_pretrained(root / "reference-hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "policy-hf")
    args = DPOConfig(
        output_dir=str(root / "trl"),
        per_device_train_batch_size=1,
        report_to=[],
        use_cpu=True,
        loss_type=[loss_type],
        beta=beta,
        label_smoothing=label_smoothing,
        max_length=128,
        bf16=False,  # fp32 as ours: TRL would autocast the reference model it prepares
        dataset_num_proc=None,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(RECORDS[:1]),
        processing_class=tokenizer,
    )
    caught = {}
    for name, model in (("policy", policy), ("reference", reference)):
        model.register_forward_hook(
            lambda module, args, output, name=name: caught.update({name: output.log_probs})
        )
    out = []
    for record in RECORDS:  # each alone: TRL reads a dataset's form from its first record
        dataset = Dataset.from_list([record])
        example = trainer._prepare_dataset(dataset, tokenizer, args, "pair")[0]
        batch = trainer.data_collator([example])
        with torch.no_grad():
            loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
        metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items() if v}
        ids = (example["prompt_ids"], example["chosen_ids"], example["rejected_ids"])
        logps = {name: caught[name].sum(dim=1) for name in caught}  # as TRL: (2,) per model
        tokens = batch["completion_mask"].sum(dim=1)
        out.append((ids, float(loss), metrics, logps, tokens))
    return out


NAMES = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]


def test_pairs_and_log_probs_equal_trl(models):
    """The same tokens as TRL's (prompt, responses, the end-of-text token closing each), and
    the same summed log-probabilities of the policy and the reference. These are fp32 sums of
    ~10 tokens of ~-11 nats each (a random model over 50,257 tokens): one ulp of a sum near
    -140 is 1.5e-5 and the order of the additions moves the last bit, so they are compared
    within 1e-5 plus that ulp."""
    ours, root, tokenizer, data = models
    pairs = read_pairs(str(data), tokenizer, 128).pairs
    assert len(pairs) == len(RECORDS)
    for pair, ((prompt, chosen, rejected), _, _, logps, _) in zip(
        pairs, trl_per_pair(root, "sigmoid", 0.1), strict=True
    ):
        assert pair.chosen == prompt + chosen and pair.rejected == prompt + rejected
        assert pair.prompt_length == len(prompt)
        assert chosen[-1] == rejected[-1] == tokenizer.eod_id
        batch = {k: torch.from_numpy(v) for k, v in collate_pairs([pair], 0).items()}
        for name in ("policy", "reference"):
            with torch.no_grad():
                mine = ours[name].sequence_logps(batch["input_ids"], batch["targets"]).tolist()
            for value, theirs in zip(mine, logps[name].tolist(), strict=True):
                assert value == pytest.approx(theirs, abs=1e-5 + ulp(theirs)), name


@pytest.mark.parametrize(
    "loss_type, beta, smoothing",
    [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("hinge", 2.0, 0.0), ("robust", 0.3, 0.2)],
)
def test_losses_and_rewards_equal_trl_on_the_same_log_probs(models, loss_type, beta, smoothing):
    """Each pair's loss, rewards, accuracy, margin and log-probabilities as TRL's DPOTrainer
    computes them from the log-probabilities its models gave (within 1e-5), and the model's
    own forward (its log-probabilities, with the reference's stored) as close as those are."""
    ours, root, tokenizer, data = models
    pairs = read_pairs(str(data), tokenizer, 128).pairs
    model = ours["policy"]
    model.loss = DpoLoss(beta, loss_type, smoothing)
    for pair, (_, loss, metrics, logps, tokens) in zip(
        pairs, trl_per_pair(root, loss_type, beta, smoothing), strict=True
    ):
        (chosen, rejected), (ref_chosen, ref_rejected) = logps["policy"], logps["reference"]
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            chosen[None],
            rejected[None],
            ref_chosen[None],
            ref_rejected[None],
            beta=beta,
            loss_type=loss_type,
            label_smoothing=smoothing,
            chosen_tokens=tokens[:1],
            rejected_tokens=tokens[1:],
        )
        assert float(losses[0]) == pytest.approx(loss, abs=1e-5)
        sums = metric_sums(chosen[None], rejected[None], chosen_rewards, rejected_rewards)
        for name, value in zip(NAMES, sums.tolist(), strict=True):
            assert value == pytest.approx(metrics[name], abs=1e-5), name

        # end to end: our forward, with the reference's log-probabilities as neo dpo stores them
        pair.reference = (float(ref_chosen), float(ref_rejected))
        batch = {k: torch.from_numpy(v) for k, v in collate_pairs([pair], 0).items()}
        with torch.no_grad():
            result = model(**batch)
        assert result.count == 1
        # the loss moves by at most max|d loss / d delta| x the log-probabilities' rounding
        slope = beta / (1 - 2 * smoothing) if loss_type != "ipo" else 1.0
        rounding = 2 * (ulp(float(chosen)) + ulp(float(rejected)))
        assert float(result.total) == pytest.approx(loss, abs=1e-5 + slope * rounding)
