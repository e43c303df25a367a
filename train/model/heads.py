"""GPT-1's task head (Radford et al. 2018) on our GPT: what a checkpoint records about it
(`TaskHead`), the model (`TaskGPT`), and the embedding rows its added tokens get."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.config.model import ModelConfig
from train.model.gpt import GPT, TIED, LossSum


@dataclass
class TaskHead:
    """What a checkpoint records about its task head: what the rows of `score.weight` mean
    and how inputs are built."""

    type: str
    labels: list[str]  # classes in score's row order (multiple_choice, reward: none, one row)
    token_ids: dict[str, int]  # start, delim, classify (reward: none)
    tokens: dict[str, str]

    @property
    def num_outputs(self) -> int:
        return 1 if self.type in ("multiple_choice", "reward") else len(self.labels)


class TaskGPT(GPT):
    """GPT with GPT-1's task head (Radford et al. 2018): `score`, a linear map without bias (as
    in GPTNeoForSequenceClassification) from the final hidden state at each sequence's classify
    token to the classes (multiple choice: to one score per choice).

    Inputs are (B, K, T): K sequences per example (1; 2 for similarity's two orders, whose
    states are added; one per choice). The loss is the task's cross entropy plus lm_coef times
    the next-token loss on the sequences (GPT-1's auxiliary objective)."""

    def __init__(self, config: ModelConfig, head: TaskHead, lm_coef: float = 0.5):
        super().__init__(config)
        self.head, self.lm_coef = head, lm_coef
        self.score = nn.Linear(config.hidden_size, head.num_outputs, bias=False)

    def classify(
        self, input_ids: torch.Tensor, classify_at: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, T) ids, (B, K) classify positions -> (B, classes or K) logits, and the
        (B * K, T, hidden) final states."""
        b, k, t = input_ids.shape
        h = self.hidden_states(input_ids.reshape(b * k, t))
        rows = torch.arange(b * k, device=h.device)
        pooled = h[rows, classify_at.reshape(-1)].reshape(b, k, -1)
        if self.head.type == "multiple_choice":
            return self.score(pooled).squeeze(-1), h
        return self.score(pooled.sum(1)), h  # similarity: the two orders added

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        classify_at: torch.Tensor,
        lm_targets: torch.Tensor | None = None,
    ) -> LossSum:
        """Summed over the examples whose target is not -100: each one's task loss plus
        lm_coef times the micro-batch's mean next-token loss over `lm_targets` (GPT-1's
        objective, task loss + lm_coef x LM loss, per example)."""
        logits, h = self.classify(input_ids, classify_at)
        total = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
        count = (targets != -100).sum()
        if self.lm_coef and lm_targets is not None:
            lm = self.lm_head(h, lm_targets.reshape(h.shape[:2]))
            total = total + self.lm_coef * lm.total * (count / lm.count.clamp(min=1))
        return LossSum(total, count)


def with_new_rows(
    weights: dict[str, torch.Tensor], config: ModelConfig, ids: list[int], seed: int
) -> dict[str, torch.Tensor]:
    """The embedding grown to config.vocab_size, the added tokens' rows drawn from
    N(0, initializer_range) as GPT-1 initialised its special tokens (seeded)."""
    wte = weights["transformer.wte.weight"]
    grown = torch.zeros(config.vocab_size, wte.shape[1], dtype=wte.dtype)
    grown[: wte.shape[0]] = wte
    generator = torch.Generator().manual_seed(seed)
    for i in sorted(ids):
        grown[i].normal_(0.0, config.initializer_range, generator=generator)
    return {**weights, "transformer.wte.weight": grown, TIED: grown}
