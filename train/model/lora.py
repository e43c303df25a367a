"""LoRA (Hu et al. 2021) through peft: adapters injected into a GPT's Linear layers, their
initialisation, the merge into the base weights, and peft's on-disk format.

peft's own layers do the forward (`inject_adapter_in_model`), so a model trained here behaves
as peft says. With adapters, a target's base weight is named `...q_proj.base_layer.weight` and
its adapter `...q_proj.lora_A.default.weight` / `lora_B`; the update is
W + (alpha / r) * B @ A. Our parameter names are GPT-Neo's, so the adapters saved in peft's
format (train/checkpoints/adapters.py) load with
`PeftModel.from_pretrained(GPTNeoForCausalLM.from_pretrained(base_hf), adapter_dir)`.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from train.config.finetune import LoraConfig
from train.errors import ConfigError

ADAPTER = "default"  # peft's adapter name in module paths


def inject(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Adapters on `lora.target_modules`, in place; every other parameter frozen."""
    import peft  # imports transformers: seconds, paid only with LoRA on

    try:
        return peft.inject_adapter_in_model(peft_config(lora), model)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules={list(lora.target_modules)}: {e}") from e


def peft_config(lora: LoraConfig, **extra):
    import peft

    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=sorted(lora.target_modules),
        bias="none",
        **extra,
    )


def init_parameter(name: str, param: torch.Tensor, generator: torch.Generator) -> bool:
    """peft's initialisation of an adapter parameter (A: Kaiming-uniform, B: zeros, so the
    model starts as the base), drawn from `generator`; False for other parameters."""
    if ".lora_A." in name:
        nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)
        return True
    if ".lora_B." in name:
        nn.init.zeros_(param)
        return True
    return False


def base_names(state: dict[str, torch.Tensor], lora: LoraConfig) -> dict[str, torch.Tensor]:
    """A base state dict renamed for the adapted model: a target's weight and bias move under
    its `.base_layer`."""
    out = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if module.rpartition(".")[2] in lora.target_modules:
            name = f"{module}.base_layer.{leaf}"
        out[name] = tensor
    return out


ADAPTER_PARAM = re.compile(rf"(.+)\.lora_([AB])\.{ADAPTER}\.weight")


def split(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, tuple]]:
    """An adapted state dict -> (base weights under their plain names, {module: (A, B)})."""
    base, pairs = {}, {}
    for name, tensor in state.items():
        if found := ADAPTER_PARAM.fullmatch(name):
            pairs.setdefault(found[1], {})[found[2]] = tensor
        else:
            base[name.replace(".base_layer.", ".")] = tensor
    return base, {m: (p["A"], p["B"]) for m, p in pairs.items()}


def merge(state: dict[str, torch.Tensor], lora: LoraConfig) -> dict[str, torch.Tensor]:
    """The plain model the adapted one computes: W + (alpha / r) * B @ A for each target."""
    base, pairs = split(state)
    scale = lora.alpha / lora.r
    for module, (a, b) in pairs.items():
        name = f"{module}.weight"
        w = base[name]
        base[name] = (w.double() + scale * (b.double() @ a.double())).to(w.dtype)
    return base
