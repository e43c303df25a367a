"""`neo prep`: a corpus -> Megatron-compatible token shards + manifest.json (data_prep/; its
config's rules are data_prep's own, applied once by `prepare`)."""

from __future__ import annotations

import sys

from data_prep.config import PrepConfig
from data_prep.prep import prepare


def main(cfg: PrepConfig) -> None:
    try:
        prepare(cfg)
    except KeyboardInterrupt:
        print(
            f"neo prep: interrupted; rerun the same command to continue from the shards "
            f"already complete in {cfg.output}",
            file=sys.stderr,
        )
        sys.exit(130)
