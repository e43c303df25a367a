"""`neo prep`: a corpus -> Megatron-compatible token shards + manifest.json (data_prep/; its
config's rules are data_prep's own, applied once by `prepare`)."""

from __future__ import annotations

import sys

from data_prep.config import PrepConfig
from data_prep.prep import prepare
from data_prep.stages import run_stages


def main(cfg: PrepConfig) -> None:
    try:
        if cfg.tasks:
            run_stages(cfg)  # the stages a cluster runs (tasks=N, stage=, task=)
        else:
            prepare(cfg)
    except KeyboardInterrupt:
        again = "the same command" if not cfg.overwrite else "it without overwrite=true"
        print(
            f"neo prep: interrupted; rerun {again} to continue from the shards already "
            f"complete in {cfg.output}",
            file=sys.stderr,
        )
        sys.exit(130)
