"""Direct preference optimization on our GPT: sequence log-probabilities, TRL's DPO losses
(TRL 1.16's definitions), and the model the engine trains (`PreferenceGPT`).

For a pair, with s = log pi(response | prompt) summed over the response tokens, the policy's
and the reference's (s_ref):

    chosen_logratios = s_chosen - s_ref_chosen,  delta = chosen_logratios - rejected_logratios
    sigmoid   -logsigmoid(beta * delta)                                   (DPO)
    hinge     relu(1 - beta * delta)                                      (SLiC)
    ipo       (delta' - 1 / (2 beta))^2, delta' with each log-ratio divided by its response
              tokens (TRL normalises IPO per token)
    robust    (-(1 - e) logsigmoid(beta * delta) + e logsigmoid(-beta * delta)) / (1 - 2e),
              e = label_smoothing, the flip probability (rDPO)

and the rewards TRL logs: beta * each log-ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from train.model.gpt import GPT

# What a step or a validation reports besides the loss, as sums over pairs (TRL's names).
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def dpo_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (B,) losses, chosen rewards and rejected rewards (detached) from (B,) summed
    log-probabilities; ipo needs the (B,) response token counts."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / (
            rejected_tokens.clamp(min=1)
        )
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        e = label_smoothing
        flipped = e * F.logsigmoid(-beta * delta)
        losses = (-(1 - e) * F.logsigmoid(beta * delta) + flipped) / (1 - 2 * e)
    else:
        raise ValueError(f"loss_type={loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def metric_sums(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
) -> torch.Tensor:
    """(len(METRICS),) sums over the pairs, in fp64: divided by the pairs once, over every
    micro-batch and rank, they are TRL's means."""
    parts = [
        chosen_rewards,
        rejected_rewards,
        (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        chosen_rewards - rejected_rewards,
        chosen.detach(),
        rejected.detach(),
    ]
    return torch.stack([p.double().sum() for p in parts])


@dataclass(frozen=True)
class DpoLoss:
    """Which loss, with its settings (train/config/dpo.py)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0


class PreferenceLoss(NamedTuple):
    """The summed loss over the pairs, their count, and the sums behind METRICS."""

    total: torch.Tensor
    count: torch.Tensor
    sums: torch.Tensor


class PreferenceGPT(GPT):
    """GPT trained on preference pairs: the forward takes a micro-batch of chosen sequences then
    rejected ones, one per row or packed (train/data/preference.py collate_pairs), with the
    reference's log-probabilities and returns the pairs' summed DPO loss."""

    def __init__(self, config, loss: DpoLoss):
        super().__init__(config)
        self.loss = loss

    def sequence_logps(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
        sequences: torch.Tensor | None = None,
        count: int | None = None,
    ) -> torch.Tensor:
        """(R, T) rows -> fp32 sums of log p(target) over the positions whose target is not
        -100: (R,), one per row, or with packed rows (collate_pairs: positions, documents and
        `sequences`, each position's sequence) (count,), one per sequence. Only those positions
        are projected onto the vocabulary (the prompt's and the padding's logits are never
        made)."""
        h = self.hidden_states(input_ids, None, positions, documents)
        keep = targets != -100
        owner = torch.nonzero(keep, as_tuple=True)[0] if sequences is None else sequences[keep]
        logits = self.lm_head(h[keep]).float()  # (N, V), N: response tokens
        picked = torch.log_softmax(logits, dim=-1).gather(1, targets[keep][:, None])[:, 0]
        n = input_ids.shape[0] if sequences is None else count
        sums = torch.zeros(n, dtype=torch.float32, device=h.device)
        return sums.index_add(0, owner, picked)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        response_tokens: torch.Tensor,
        reference: torch.Tensor,
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
        sequences: torch.Tensor | None = None,
    ) -> PreferenceLoss:
        logps = self.sequence_logps(
            input_ids, targets, positions, documents, sequences, len(response_tokens)
        )
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = reference.float().chunk(2)
        tokens_chosen, tokens_rejected = response_tokens.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.loss.beta,
            loss_type=self.loss.loss_type,
            label_smoothing=self.loss.label_smoothing,
            chosen_tokens=tokens_chosen,
            rejected_tokens=tokens_rejected,
        )
        count = torch.tensor(len(losses), device=losses.device)
        sums = metric_sums(chosen, rejected, chosen_rewards, rejected_rewards)
        return PreferenceLoss(losses.sum(), count, sums)
