"""Where a process runs: its rank, its accelerator, the machine's facts (native bf16, matmul
peak), the one process-group start, collectives, stop signals, and model placement."""
