"""Errors the `neo` command reports as one line, importable without torch (train/cli.py
catches them, and every `neo` verb starts faster when that import is light)."""


class CheckpointError(ValueError):
    """A checkpoint directory is missing something or does not match what is asked of it."""


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite steps) after saving a checkpoint."""
