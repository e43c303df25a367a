"""One error base class for every mistake a user can fix, and its kinds. torch-free, so that
data_prep and the `neo` command import it cheaply.

`neo` (train/cli.py) catches only NeoError: it prints the message (which names the key, file,
line or rank and says what was expected) as one line and exits with `exit_code`. Any other
exception is a bug and keeps its traceback.
"""


class NeoError(Exception):
    """A mistake the user can fix."""

    exit_code = 2
    prefix = "error"  # neo VERB: PREFIX: the message


class ConfigError(NeoError, ValueError):
    """A configuration value breaks a rule; the message names the key and the numbers."""


class CheckpointError(NeoError, ValueError):
    """A checkpoint directory is missing something or does not match what is asked of it."""


class NotFound(NeoError, FileNotFoundError):
    """A file or directory the user named does not exist or holds nothing usable."""


class SetupError(NeoError, RuntimeError):
    """The machine or the launcher is not what the config asks for (no such device, no
    rendezvous address for several ranks)."""


class EvalError(NeoError):
    """An evaluation gave no usable number (a non-finite score: a broken model)."""


class TrainingStopped(NeoError):
    """Training stopped on purpose (too many non-finite steps) after saving a checkpoint."""

    exit_code = 1


class Interrupted(NeoError):
    """Ctrl-C: the run saved what it had (or was told twice and stopped at once)."""

    exit_code = 130  # 128 + SIGINT, as shells report it
    prefix = "interrupted"
