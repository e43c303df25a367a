"""LoRA in `neo sft` (peft's adapters): only the adapters train, the merge is what the adapted
model computes, and what we write is what peft and transformers load."""

import pytest
import torch
from conftest import tiny_config
from peft import PeftModel
from safetensors.torch import load_file
from test_sft import instructions, losses, sft  # noqa: F401 (a fixture)
from transformers import GPTNeoForCausalLM

from data_prep.tokenizers import load_tokenizer
from train.checkpoints.load import load_model, model_from_state
from train.checkpoints.zero import consolidated_state_dict
from train.config.finetune import LoraConfig
from train.errors import ConfigError
from train.model import lora
from train.model.gpt import GPT

LORA = ("lora.r=4", "lora.dropout=0", "lora.target_modules=[q_proj,v_proj,c_fc]")


def adapted(config, settings: LoraConfig, seed=0) -> GPT:
    """A random GPT with random (not zero) adapters."""
    torch.manual_seed(seed)
    model = lora.inject(GPT(config).init_weights(), settings)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("scale", [False, True])
def test_merge_equals_the_adapted_forward(scale):
    """peft's layers compute the adapted model; merging gives a plain GPT with the same
    logits (GPT-3 sizes' attention scale included)."""
    config = tiny_config(scale_attn_weights=scale)
    settings = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "c_fc"])
    model = adapted(config, settings)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == {
        "q_proj",
        "v_proj",
        "c_fc",
    }
    merged = model_from_state(config, lora.merge(model.state_dict(), settings)).eval()
    ids = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), atol=1e-5, rtol=1e-5)
        plain = GPT(config).eval()
        plain.load_state_dict(lora.split(model.state_dict())[0])
        assert (plain(ids) - model(ids)).abs().max() > 1e-2  # the adapters do something


def test_bad_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"lora.target_modules=\['query'\].*q_proj"):
        LoraConfig(r=8, target_modules=["query"]).validate()
    with pytest.raises(ConfigError, match="lora.r=-1"):
        LoraConfig(r=-1).validate()
    with pytest.raises(ConfigError, match="lora.dropout=1"):
        LoraConfig(r=8, dropout=1.0).validate()
    # LoRA off: its settings are not read, so setting one is a mistake, named (it was accepted
    # silently before every key a verb does not read became an error).
    with pytest.raises(ConfigError, match=r"lora.target_modules=\['query'\] is not read"):
        LoraConfig(r=0, target_modules=["query"]).validate()
    LoraConfig(r=0).validate()


@pytest.mark.slow
def test_lora_run_trains_only_adapters_and_peft_loads_them(
    tmp_path,
    trained_gpt2_model,
    instructions,  # noqa: F811
):
    """ZeRO-2 on one rank and ZeRO-3 on two: the same losses; the base weights never change;
    the adapters load with peft on the base's HF export and give the merged export's logits;
    the merged export loads in transformers; a run with lora.merge=false writes only the
    adapters, and its checkpoint still loads as the model it computes."""
    base = trained_gpt2_model / "ckpt"
    common = (*LORA, "max_steps=6", "eval_every=6", "save_every=6", "optim.lr=3e-3")
    sft(tmp_path / "z2", "deepspeed=zero2", *common, base=base, data=instructions)
    sft(
        tmp_path / "z3",
        "deepspeed=zero3",
        "lora.merge=false",
        *common,
        base=base,
        data=instructions,
        ranks=2,
    )
    a, b = losses(tmp_path / "z2"), losses(tmp_path / "z3")
    assert a.keys() == b.keys() == set(range(1, 7))
    assert [a[s] for s in a] == pytest.approx([b[s] for s in a], rel=1e-4)
    assert a[6] < a[1]

    # Only the adapters changed.
    raw = consolidated_state_dict(tmp_path / "z2" / "checkpoints", "step_00000006")
    plain, pairs = lora.split(raw)
    original = load_model(base).state_dict()
    assert len(pairs) == 3 * 2  # three targets in two layers
    for name, tensor in plain.items():
        assert torch.equal(tensor, original[name]), name
    assert all(b.abs().max() > 0 for _, b in pairs.values())  # B starts at zero

    # peft on the base's export + our adapters == our merged export, in transformers.
    ids = torch.tensor([load_tokenizer("gpt2").encode("What does `textwrap.dedent` do?")])
    merged_hf = GPTNeoForCausalLM.from_pretrained(tmp_path / "z2" / "hf").eval()
    with_adapters = PeftModel.from_pretrained(
        GPTNeoForCausalLM.from_pretrained(trained_gpt2_model / "hf"), tmp_path / "z2" / "adapter"
    ).eval()
    with torch.no_grad():
        expected = merged_hf(ids).logits
        torch.testing.assert_close(with_adapters(ids).logits, expected, atol=1e-4, rtol=1e-4)
        folded = with_adapters.merge_and_unload().state_dict()
        ours = load_file(tmp_path / "z2" / "hf" / "model.safetensors")
        for name, tensor in ours.items():
            torch.testing.assert_close(folded[name], tensor, atol=1e-6, rtol=1e-5)

    # merge=false: adapters only; the run's checkpoint reads as the merged model.
    z3 = tmp_path / "z3"
    assert (z3 / "adapter" / "adapter_model.safetensors").is_file()
    assert not (z3 / "model").exists() and not (z3 / "hf").exists()
    adapters3 = load_file(z3 / "adapter" / "adapter_model.safetensors")
    adapters2 = load_file(tmp_path / "z2" / "adapter" / "adapter_model.safetensors")
    assert adapters3.keys() == adapters2.keys()
    assert all(k.startswith("base_model.model.transformer.h.") for k in adapters3)
    with torch.no_grad():
        from_checkpoint = load_model(z3).eval()(ids)
        torch.testing.assert_close(from_checkpoint, expected, atol=1e-3, rtol=1e-3)
