"""Validation loss, perplexity and bits per byte, added up as sums over batches and ranks: a
(loss sum, target tokens, text bytes) triple, so masked targets and uneven batches stay exact."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from train.loop.distributed import all_sum

IGNORE = -100  # targets that carry no loss (Hugging Face's convention)


@torch.no_grad()
def evaluate(
    model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], tokenizer, eod_id: int, device
) -> dict:
    """Loss, perplexity and BPB of `model` (which returns the mean loss over its targets that
    are not IGNORE) on (inputs, targets) batches, summed over this rank's batches and all
    ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, tokens, bytes
    for inputs, targets in batches:
        counted = int((targets != IGNORE).sum())
        totals[0] += model(inputs, targets).double() * counted
        totals[1] += counted
        totals[2] += sum(utf8_bytes(tokenizer, row, eod_id) for row in targets.cpu().numpy())
    all_sum(totals)
    model.train()
    loss_sum, tokens, text_bytes = totals.tolist()
    loss = loss_sum / tokens
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_bpb": loss_sum / text_bytes / math.log(2),
    }


def utf8_bytes(tokenizer, tokens: np.ndarray, eod_id: int) -> int:
    """UTF-8 length of the text the tokens encode; document separators and ignored targets
    count as no text."""
    total = 0
    for piece in np.split(tokens, np.flatnonzero((tokens == eod_id) | (tokens == IGNORE))):
        piece = piece[(piece != eod_id) & (piece != IGNORE)]
        if len(piece):
            total += len(tokenizer.decode(piece.tolist()).encode("utf-8"))
    return total
