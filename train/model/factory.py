"""How a training engine builds the model it trains, without knowing what the model is: a
plain GPT, GPT-1's task head or a reward head on it, or either with LoRA adapters (neo sft
decides), or GPT on preference pairs (neo dpo); the engine in train/loop/engine.py only calls
`build` and `initialize`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from train.config.finetune import LoraConfig
from train.config.model import ModelConfig
from train.model import lora as adapters
from train.model.gpt import GPT, Block
from train.model.heads import TaskGPT, TaskHead
from train.model.preference import DpoLoss, PreferenceGPT
from train.model.reward import RewardGPT


@dataclass(frozen=True)
class ModelFactory:
    config: ModelConfig
    head: TaskHead | None = None  # GPT-1's task head, trained with lm_coef x the LM loss
    lm_coef: float = 0.0
    lora: LoraConfig | None = None  # adapters on a frozen model; only they (and a head) train
    dpo: DpoLoss | None = None  # trained on preference pairs (neo dpo)
    center_rewards: float | None = None  # a reward head's centering coefficient (TRL's)
    compile: bool = False  # torch.compile each transformer block (in place: same state dict)

    def prepare(self) -> None:
        """Imports that must not run while the engine builds (peft's, under ZeRO-3's
        partitioning of every parameter created)."""
        if self.lora is not None:
            import peft  # noqa: F401

    def build(self) -> GPT:
        """The module, with its parameters allocated as the caller's context says (the meta
        device, or ZeRO-3's partitions): filled afterwards from weights or `initialize`."""
        if self.dpo is not None:
            model = PreferenceGPT(self.config, self.dpo)
        elif self.head is None:
            model = GPT(self.config)
        elif self.head.type == "reward":
            model = RewardGPT(self.config, self.head, self.center_rewards)
        else:
            model = TaskGPT(self.config, self.head, self.lm_coef)
        if self.lora is not None:
            model = adapters.inject(model, self.lora)
            if self.head is not None:  # a new head is trained whole, beside the adapters
                model.score.weight.requires_grad_(True)
        if self.compile:
            for module in model.modules():
                if isinstance(module, Block):
                    module.compile(dynamic=False)
        return model

    def initialize(
        self, model: GPT, name: str, module: nn.Module, generator: torch.Generator
    ) -> None:
        """Fresh values for the parameters `module` owns directly (`name`: its first
        parameter's): an adapter as peft initialises it, anything else as GPT does."""
        first = next(module.parameters(recurse=False))
        if self.lora is not None and adapters.init_parameter(name, first, generator):
            return
        model.init_module(module, generator)
