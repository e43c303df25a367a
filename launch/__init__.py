"""`neo launch`: run a verb here, on SLURM, over a DeepSpeed hostfile or as a multi-node
torchrun. Torch-free (it runs on login nodes without torch)."""
