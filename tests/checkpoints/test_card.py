"""The model card's metadata: what Hugging Face reads from it must be what it expects."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

from data_prep.tokenizers import load_tokenizer
from train.checkpoints.card import RunRecords, hub_id, model_card

CACHED = "/home/me/.cache/huggingface/hub/models--EleutherAI--gpt-neo-125M/snapshots/21def0"


def card_of_sft(base: str) -> tuple[dict, str]:
    """(the card's YAML metadata, its text) for a fine-tuning of `base`."""
    records = RunRecords(run_dir=Path("runs/demo-sft"), verb="sft", config={"base": base})
    card = model_card(tiny_config(), load_tokenizer("gpt2"), torch.float32, None, records)
    _, front, text = card.split("---\n", 2)
    return yaml.safe_load(front), text


@pytest.mark.parametrize("base", ["runs/demo", "/data/models/gpt-neo-125M", "EleutherAI/x"])
def test_a_local_base_is_named_in_the_text_not_as_base_model(base):
    """base_model is a Hub repo id for Hugging Face; a local path (even one shaped like an id:
    neo sft reads only local paths) goes into the card's text."""
    meta, text = card_of_sft(base)
    assert "base_model" not in meta
    assert f"- fine-tuned (`neo sft`) from `{base}`" in text


def test_a_base_from_the_hub_cache_is_its_hub_id():
    meta, text = card_of_sft(CACHED)
    assert meta["base_model"] == "EleutherAI/gpt-neo-125M"
    assert f"from `{CACHED}` (Hugging Face Hub: EleutherAI/gpt-neo-125M)" in text


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (CACHED, "EleutherAI/gpt-neo-125M"),
        ("/cache/hub/models--gpt2/snapshots/abc", "gpt2"),
        ("/cache/hub/models--a--b--c/snapshots/abc", "a/b--c"),
        ("/data/models--mine/weights", None),
        ("runs/demo", None),
        (None, None),
    ],
)
def test_hub_ids_come_only_from_the_hub_cache_layout(path, expected):
    assert hub_id(path) == expected


def test_a_dpo_card_names_its_base_data_loss_and_held_out_reward_accuracy():
    config = {
        "base": CACHED,
        "dpo": {"path": "pairs.jsonl", "loss_type": "robust", "beta": 0.2, "label_smoothing": 0.1},
        "lora": {"r": 0},
    }
    final = {
        "step": 40,
        "val/loss": 0.61,
        "val/rewards/accuracies": 0.75,
        "val/rewards/margins": 0.3,
    }
    records = RunRecords(run_dir=Path("runs/dpo"), verb="dpo", config=config, final=final)
    card = model_card(tiny_config(), load_tokenizer("gpt2"), torch.float32, None, records)
    _, front, text = card.split("---\n", 2)
    assert yaml.safe_load(front)["base_model"] == "EleutherAI/gpt-neo-125M"
    assert (
        f"- preference-tuned (`neo dpo`, DPO) from `{CACHED}` (Hugging Face Hub: "
        "EleutherAI/gpt-neo-125M), which is also the reference"
    ) in text
    assert "- data: `pairs.jsonl` (chosen and rejected responses); robust loss, beta 0.2, " in text
    assert "- held-out pairs (step 40): reward accuracy 0.7500, reward margin 0.3000" in text
