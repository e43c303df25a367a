"""The reference model's log-probabilities for `neo dpo`: computed once from the base weights,
before the engine (and its copy of the weights) exists, stored in the run directory, and read
back by every resume, so the reference model is never held beside the policy and a resume, on
any world size, never loads or scores it again.

run_dir/reference_logps.safetensors holds, per split (train, validation), a (pairs, 2) fp32
tensor of the reference's summed log-probabilities of the chosen and the rejected response,
and in its metadata the digest of the pairs they belong to.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_prep.files import owned_name
from train.config.model import ModelConfig
from train.data.dpo import pairs_digest
from train.data.preference import Pair, collate_pairs
from train.errors import CheckpointError
from train.model.preference import DpoLoss, PreferenceGPT

log = logging.getLogger("neo.dpo")
REFERENCE_FILE = "reference_logps.safetensors"


@torch.no_grad()
def score(
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    pairs: list[Pair],
    device: torch.device,
    dtype: torch.dtype,
    micro_batch: int,
    pad_id: int,
    rank: int = 0,
    world_size: int = 1,
    packed_len: int | None = None,
    order: list[int] | None = None,
) -> torch.Tensor:
    """(len(pairs), 2) fp32 summed log-probabilities of each pair's chosen and rejected
    response under the model of `weights`, computed in `dtype` (the run's precision, so that
    the policy starts with rewards of zero); this rank's share only: micro-batches rank,
    rank + world_size, ..., zeros elsewhere, so the ranks' outputs sum to the whole, and each
    pair is scored in the same micro-batch on any world size, in the layout training uses
    (`packed_len`: collate_pairs). `order`: the pairs' order in the training's first epoch,
    whose consecutive micro-batches these are; the same micro-batches, not only the same
    layout, so that the policy's first log-probabilities are these bit for bit (in bf16 a
    sequence's score depends on the length its micro-batch is padded to). None: file order (as
    the validation scores its pairs). The model is freed when this returns."""
    with torch.device("meta"):
        model = PreferenceGPT(config, DpoLoss())
    model.to_empty(device=device)
    model.tie_weights()
    for name, param in model.named_parameters():
        param.copy_(weights[name])
    model.to(dtype).eval()
    order = list(range(len(pairs))) if order is None else order
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    for first in range(rank * micro_batch, len(pairs), world_size * micro_batch):
        indices = order[first : first + micro_batch]
        arrays = collate_pairs([pairs[i] for i in indices], pad_id, packed_len)
        rows = {
            k: torch.from_numpy(arrays[k]).to(device)
            for k in ("input_ids", "targets", "positions", "documents", "sequences")
            if k in arrays
        }
        logps = model.sequence_logps(**rows, count=2 * len(indices)).float().cpu()
        out[indices] = torch.stack(logps.chunk(2), dim=1)
    del model
    return out


def attach(splits: dict[str, list[Pair]], logps: dict[str, torch.Tensor]) -> None:
    """Each pair's reference log-probabilities, from its split's tensor."""
    for name, pairs in splits.items():
        for pair, (chosen, rejected) in zip(pairs, logps[name].tolist(), strict=True):
            pair.reference = (chosen, rejected)


def save(run_dir: Path, splits: dict[str, list[Pair]], logps: dict[str, torch.Tensor]) -> Path:
    """The file, written under a temporary name and renamed into place."""
    file = run_dir / REFERENCE_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    metadata = {f"{name}_digest": pairs_digest(pairs) for name, pairs in splits.items()}
    tmp = owned_name(file, "tmp")
    try:
        save_file({k: v.contiguous() for k, v in logps.items()}, str(tmp), metadata=metadata)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file


def load(run_dir: Path, splits: dict[str, list[Pair]]) -> dict[str, torch.Tensor]:
    """The stored log-probabilities, checked to belong to these pairs."""
    file = run_dir / REFERENCE_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing: the run's checkpoints need the reference log-probabilities "
            "computed when it started (a new run_dir starts afresh)"
        )
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            logps = {name: f.get_tensor(name) for name in splits}
    except Exception as e:  # safetensors' errors have no common base class
        raise CheckpointError(f"{file}: cannot be read ({e})") from None
    for name, pairs in splits.items():
        if metadata.get(f"{name}_digest") != pairs_digest(pairs):
            raise CheckpointError(
                f"{file}: computed for other {name} pairs than this run's data makes; resume "
                "with the data the run started with, or start a new run_dir"
            )
        if tuple(logps[name].shape) != (len(pairs), 2):
            raise CheckpointError(f"{file}: {name} holds {tuple(logps[name].shape)} values")
    return logps
