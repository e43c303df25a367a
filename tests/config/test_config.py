"""Config validation, the named sizes, and what `neo info` computes from them."""

import pytest
from conftest import ROOT, tiny_config
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from train.config.model import expand_attention_types
from train.config.schemas import register_configs
from train.config.tools import InfoConfig
from train.errors import ConfigError
from train.model.sizes import (
    count_parameters,
    flops_per_token,
    mean_visible_keys,
    zero_memory_bytes,
)

SIZES = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))

# Nominal sizes from Brown et al. 2020, Table 2.1.
GPT3_NOMINAL = {
    "gpt3_small": 125e6,
    "gpt3_medium": 350e6,
    "gpt3_large": 760e6,
    "gpt3_xl": 1.3e9,
    "gpt3_2.7b": 2.7e9,
    "gpt3_6.7b": 6.7e9,
    "gpt3_13b": 13.0e9,
    "gpt3_175b": 175.0e9,
}


def load_size(name: str) -> InfoConfig:
    register_configs()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        cfg = compose(config_name="info", overrides=[f"model={name}"])
    return OmegaConf.to_object(cfg)


def test_all_named_sizes_exist():
    expected = {"tiny", "gpt_neo_125m", "gpt_neo_1.3b", "gpt_neo_2.7b", *GPT3_NOMINAL}
    assert set(SIZES) == expected


@pytest.mark.parametrize("name", SIZES)
def test_named_size_is_valid_and_cites_a_source(name):
    config = load_size(name).model
    config.validate()
    assert config.name == name
    text = (ROOT / "configs" / "model" / f"{name}.yaml").read_text()
    assert text.startswith("#"), "every size file starts with a comment naming its source"


def test_gpt_neo_1_3b_parameter_count_is_published_count():
    assert count_parameters(load_size("gpt_neo_1.3b").model).total == 1_315_575_808


@pytest.mark.parametrize("name", sorted(GPT3_NOMINAL))
def test_gpt3_sizes_within_3_percent_of_nominal(name):
    config = load_size(name).model
    assert config.scale_attn_weights, "GPT-3 scales attention scores"
    kinds = config.layer_kinds()
    assert kinds[0::2] == ["global"] * (len(kinds) // 2) and kinds[1::2] == ["local"] * (
        len(kinds) // 2
    )
    total = count_parameters(config).total
    assert abs(total / GPT3_NOMINAL[name] - 1) < 0.03, f"{name}: {total:,}"


@pytest.mark.parametrize("name", ["gpt_neo_125m", "gpt_neo_1.3b", "gpt_neo_2.7b"])
def test_gpt_neo_sizes_do_not_scale_attention(name):
    config = load_size(name).model
    assert not config.scale_attn_weights and config.window_size == 256


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            dict(hidden_size=1000, num_heads=12),
            "model.num_heads=12 does not divide model.hidden_size=1000",
        ),
        (dict(num_layers=5), r"expands to 4 layers, but model.num_layers=5"),
        (
            dict(window_size=0),
            "model.window_size=0 must be between 1 and model.max_position_embeddings=128",
        ),
        (dict(window_size=129), r"model.window_size=129 must be between 1"),
        (dict(attention_types=[[["global", "sparse"], 2]]), "unknown attention kind 'sparse'"),
        (dict(attention_types=[["global", 2]]), r"must be \[\[kinds...\], repeat\]"),
        (dict(activation_function="swish"), "model.activation_function='swish' is not one of"),
        (dict(attention_backend="cuda"), "model.attention_backend='cuda' is not one of"),
        (dict(resid_dropout=1.0), r"model.resid_dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_validation_names_key_and_numbers(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_strided_needs_valid_stride():
    with pytest.raises(ConfigError, match="model.sparse_stride=0"):
        tiny_config(attention_types=[[["strided"], 4]], sparse_stride=0)


def test_expand_attention_types_is_gpt_neo_form():
    assert expand_attention_types([[["global", "local"], 2], [["strided"], 1]]) == [
        "global",
        "local",
        "global",
        "local",
        "strided",
    ]


def test_mean_visible_keys_counts_the_mask():
    from train.model.attention import attention_mask

    for kind in ("global", "local", "strided"):
        mask = attention_mask(kind, 100, 7, 9)
        assert mean_visible_keys(kind, 100, 7, 9) == pytest.approx(mask.sum().item() / 100)


def test_flops_per_token_matches_6n_rule_for_global_model():
    """For a global-only model, 6N + 6 * L * d * (T + 1) (Kaplan et al.'s count with causal
    attention seeing (T+1)/2 keys on average), with N the non-embedding matmul parameters plus
    the logits layer."""
    config = tiny_config(attention_types=[[["global"], 4]])
    d, L, T, V = config.hidden_size, config.num_layers, 64, config.vocab_size
    n_matmul = L * 12 * d * d + V * d
    expected = 6 * n_matmul + 6 * L * d * (T + 1)
    assert flops_per_token(config, T) == pytest.approx(expected)


def test_zero_memory_partitions():
    n = 1_000_000
    full = zero_memory_bytes(n, 0, 8)["total"]
    assert full == 16 * n
    assert zero_memory_bytes(n, 1, 8)["total"] == 4 * n + 12 * n / 8
    assert zero_memory_bytes(n, 2, 8)["total"] == 2 * n + 14 * n / 8
    assert zero_memory_bytes(n, 3, 8)["total"] == 16 * n / 8
