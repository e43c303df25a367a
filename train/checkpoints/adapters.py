"""LoRA adapters on disk, in peft's format (adapter_config.json, adapter_model.safetensors),
named for GPTNeoForCausalLM so that peft loads them onto the base's Hugging Face export."""

from __future__ import annotations

from pathlib import Path

import torch

from data_prep.files import OutputKind, atomic_dir, marked_by
from train.checkpoints.model_format import save_tensors
from train.config.finetune import LoraConfig
from train.config.model import ModelConfig
from train.model.lora import peft_config, split

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_KIND = OutputKind(f"LoRA adapters ({ADAPTER_CONFIG})", marked_by(ADAPTER_CONFIG))


def save_adapter(
    directory: str | Path,
    state: dict[str, torch.Tensor],
    lora: LoraConfig,
    model: ModelConfig,
    base: str | None,
    overwrite: bool = True,
) -> None:
    """The adapters in peft's format (adapter_config.json, adapter_model.safetensors), named for
    GPTNeoForCausalLM. GPT-3 sizes fold their attention scale into q_proj on export
    (train/checkpoints/hf.py), so a q_proj adapter's B is scaled the same way."""

    _, pairs = split(state)
    tensors = {}
    for module, (a, b) in pairs.items():
        if model.scale_attn_weights and module.endswith("q_proj"):
            b = b.float() * model.attention_scale
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.float().contiguous()
    config = peft_config(
        lora, task_type="CAUSAL_LM", base_model_name_or_path=base, inference_mode=True
    )
    with atomic_dir(directory, overwrite, kind=ADAPTER_KIND) as tmp:
        config.save_pretrained(str(tmp))
        save_tensors(tensors, tmp / ADAPTER_WEIGHTS)
