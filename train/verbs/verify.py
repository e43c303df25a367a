"""`neo verify DIR`: check an exported directory (checksums, transformers loads it offline, the
probe's logits, the model card's pipeline usage); exits 2 naming the first failure."""

from __future__ import annotations

import logging

from train.checkpoints.verify import verify
from train.config.resolve import Resolved, resolve_plain
from train.config.tools import VerifyConfig

log = logging.getLogger("neo.verify")


def main(cfg: VerifyConfig) -> None:
    run(resolve_plain(cfg))


def run(resolved: Resolved[VerifyConfig]) -> None:
    cfg = resolved.cfg
    for line in verify(cfg.dir, usage=cfg.usage):
        log.info("ok  %s", line)
    log.info("%s: verified", cfg.dir)
