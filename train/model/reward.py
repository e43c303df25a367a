"""A reward model on our GPT: a scalar score of a whole sequence, trained on preference pairs with
the pairwise Bradley-Terry loss, as TRL 1.16's RewardTrainer trains one.

The score is GPT-1's linear head without bias (`score`, one row) on the final hidden state at
the sequence's last token that is not the end-of-text token: where
GPTNeoForSequenceClassification reads it with `pad_token_id` = end-of-text, so the exported model
scores a sequence as we do. (TRL closes each text with the tokenizer's EOS, which for GPT-2's
tokenizer is the padding too: the score is read at the token before it, there and here.)

For a pair with rewards r_c (chosen) and r_r (rejected) and an optional margin m:

    loss = -logsigmoid(r_c - r_r - m)  [+ center_rewards_coefficient * (r_c + r_r)^2]

averaged over the pairs (summed here, divided once by the pairs of a step or a validation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.model.heads import TaskGPT, TaskHead
from train.model.preference import PreferenceLoss

# What a step or a validation reports besides the loss, as sums over pairs (TRL's names; TRL's
# min_reward and max_reward are not sums, and are left out).
METRICS = ("accuracy", "margin", "mean_reward")


def reward_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center: float | None = None,
) -> torch.Tensor:
    """(B,) per-pair losses from (B,) rewards: TRL's loss before its mean over the batch."""
    delta = chosen - rejected
    if margin is not None:
        delta = delta - margin
    losses = -F.logsigmoid(delta)
    if center is not None:
        losses = losses + center * (chosen + rejected) ** 2
    return losses


def metric_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(len(METRICS),) sums over the pairs, in fp64: divided by the pairs they are TRL's
    accuracy, margin and mean reward (the mean over both rows of every pair)."""
    chosen, rejected = chosen.detach().double(), rejected.detach().double()
    parts = [(chosen > rejected).double(), chosen - rejected, (chosen + rejected) / 2]
    return torch.stack([p.sum() for p in parts])


class RewardGPT(TaskGPT):
    """GPT with a one-row `score` head, trained on micro-batches of chosen rows then rejected
    rows (train/data/reward.py collate_rewards)."""

    def __init__(self, config, head: TaskHead, center: float | None = None):
        super().__init__(config, head, lm_coef=0.0)
        self.center = center

    def rewards(self, input_ids: torch.Tensor, score_at: torch.Tensor) -> torch.Tensor:
        """(R, T) rows, (R,) positions of their last non-padding token -> (R,) fp32 rewards."""
        h = self.hidden_states(input_ids)
        rows = torch.arange(input_ids.shape[0], device=h.device)
        return self.score(h[rows, score_at]).squeeze(-1).float()

    def forward(
        self, input_ids: torch.Tensor, score_at: torch.Tensor, margin: torch.Tensor
    ) -> PreferenceLoss:
        chosen, rejected = self.rewards(input_ids, score_at).chunk(2)
        losses = reward_losses(chosen, rejected, margin.float(), self.center)
        count = torch.tensor(len(losses), device=losses.device)
        return PreferenceLoss(losses.sum(), count, metric_sums(chosen, rejected))
