"""neo sft head=reward's pairs, loss and metrics against TRL's RewardTrainer (TRL 1.16, a dev
dependency): the same tiny GPT-Neo reward model, ours and as transformers loads its export,
the same records, TRL's own tokenization, collator and compute_loss on the whole batch."""

import json

import pairs
import pytest
import torch
import trl  # the dev dependency itself; its trainer is imported where it is used (below)
from conftest import tiny_config
from datasets import Dataset
from test_dpo_vs_trl import wandb_logger_as_found  # noqa: F401 (autouse: TRL imports wandb)
from transformers import AutoTokenizer, GPTNeoForSequenceClassification

from data_prep.tokenizers import load_tokenizer
from train.checkpoints.export import export_hf
from train.checkpoints.model_format import save_checkpoint
from train.data.reward import collate_rewards, read_reward_pairs
from train.data.sft import CHAT_TEMPLATES
from train.model.heads import TaskHead
from train.model.reward import METRICS, RewardGPT

# the shared records (tests/pairs.py): TRL scores an implicit prompt's whole texts, as we do;
# and a text that already ends with the end-of-text token gets no second one (TRL's add_eos)
TEXT = [
    *pairs.RECORDS,
    {"prompt": "Q: 2 + 2 =", "chosen": " 4<|endoftext|>", "rejected": " 5 or so, I think"},
]
MARGINS = [1.5, 0.0, -0.25, 3.0]
CHATS = [
    {
        "prompt": [{"role": "user", "content": "What does `len` do?"}],
        "chosen": [{"role": "assistant", "content": "Return the number of items."}],
        "rejected": [{"role": "assistant", "content": "It sorts a list."}],
    },
    {
        "chosen": [
            {"role": "user", "content": "Is the sky blue?"},
            {"role": "assistant", "content": "Yes, on a clear day."},
        ],
        "rejected": [
            {"role": "user", "content": "Is the sky blue?"},
            {"role": "assistant", "content": "Bananas."},
        ],
    },
]
REWARD = TaskHead("reward", [], {}, {})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random tiny reward model with GPT-2's vocabulary (its score row large enough that the
    rewards differ), ours and as `neo export` writes it."""
    root = tmp_path_factory.mktemp("reward_trl")
    tokenizer = load_tokenizer("gpt2")
    config = tiny_config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
    )
    ours = RewardGPT(config, REWARD).init_weights(torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    save_checkpoint(root / "ckpt", config, ours.state_dict(), tokenizer, head=REWARD)
    export_hf(root / "ckpt", root / "hf")
    return ours.eval(), root, tokenizer


def trl_batch(root, records, center=None):
    """TRL's token ids of each record, its loss on the whole batch and its logged metrics."""
    from trl import RewardConfig, RewardTrainer  # here: it imports wandb

    assert trl.__version__ == "1.16.0"  # the version pyproject.toml's dev extra pins
    hf = GPTNeoForSequenceClassification.from_pretrained(root / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    tokenizer.chat_template = CHAT_TEMPLATES["neotrain"]
    args = RewardConfig(
        output_dir=str(root / "trl"),
        report_to=[],
        use_cpu=True,
        max_length=128,
        center_rewards_coefficient=center,
        bf16=False,
        dataset_num_proc=None,
    )
    first = Dataset.from_list(records[:1])
    trainer = RewardTrainer(model=hf, args=args, train_dataset=first, processing_class=tokenizer)
    # each record prepared alone (TRL reads a dataset's form from its first record, so explicit
    # and implicit prompts cannot share one), then collated into one batch
    examples = [
        trainer._prepare_dataset(Dataset.from_list([r]), tokenizer, args, "pair")[0]
        for r in records
    ]
    batch = trainer.data_collator(examples)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items() if v}
    ids = [(e["chosen_ids"], e["rejected_ids"]) for e in examples]
    return ids, float(loss), metrics


def ours_batch(model, tokenizer, path, template=None):
    pairs = read_reward_pairs(str(path), tokenizer, 128, chat_template=template)
    assert pairs.skipped.count == 0, pairs.skipped.examples
    batch = {k: torch.from_numpy(v) for k, v in collate_rewards(pairs.examples, 50256).items()}
    with torch.no_grad():
        out = model(**batch)
    return pairs.examples, out


@pytest.mark.parametrize(
    "kind, center",
    [("text", None), ("text", 0.01), ("margin", None), ("chat", 0.1)],
)
def test_pairs_loss_and_metrics_equal_trl(model, tmp_path, kind, center):
    """The same token ids as TRL (prompt and response as one text; EOS added once to text, not
    to conversations), and on the same batch TRL's loss (Bradley-Terry, with margins and
    centering) and its accuracy, margin and mean reward, within 1e-5."""
    ours, root, tokenizer = model
    records = {
        "text": TEXT,
        "margin": [{**r, "margin": m} for r, m in zip(TEXT, MARGINS, strict=True)],
        "chat": CHATS,
    }[kind]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    template = CHAT_TEMPLATES["neotrain"] if kind == "chat" else None
    ours.center = center
    pairs, out = ours_batch(ours, tokenizer, path, template)
    ids, loss, metrics = trl_batch(root, records, center)
    assert [(p.chosen, p.rejected) for p in pairs] == ids
    if kind != "chat":
        assert all(c[-1] == r[-1] == tokenizer.eod_id for c, r in ids)
        assert sum(c.count(tokenizer.eod_id) for c, _ in ids) == len(ids)  # never twice
    assert int(out.count) == len(records)
    assert float(out.total) / len(records) == pytest.approx(loss, abs=1e-5)
    means = (out.sums / len(records)).tolist()
    for name, value in zip(METRICS, means, strict=True):
        assert value == pytest.approx(metrics[name], abs=1e-5), name
    assert 0 < metrics["accuracy"] < 1  # the pairs do not all agree: accuracy is tested
