"""`neo import`: a Hugging Face GPT-Neo directory (e.g. a downloaded EleutherAI/gpt-neo-1.3B)
-> a neotrain checkpoint.

    neo import input=~/models/gpt-neo-1.3B output=ckpt/gpt-neo-1.3b
"""

from __future__ import annotations

import logging

from train.checkpoints.hf import import_hf
from train.config.resolve import Resolved, resolve_plain
from train.config.tools import ImportConfig
from train.model.sizes import count_parameters

log = logging.getLogger("neo.import")


def main(cfg: ImportConfig) -> None:
    run(resolve_plain(cfg))


def run(resolved: Resolved[ImportConfig]) -> None:
    cfg = resolved.cfg
    config = import_hf(cfg.input, cfg.output, overwrite=cfg.overwrite)
    log.info(
        "imported %s (%s parameters, %d layers) from %s into the neotrain checkpoint %s",
        config.name,
        f"{count_parameters(config).total / 1e6:,.1f}M",
        config.num_layers,
        cfg.input,
        cfg.output,
    )
