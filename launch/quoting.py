"""Every value `neo launch` writes for another program to read, checked or quoted for that
reader: bash (job scripts, torchrun commands), sbatch (its `#SBATCH` lines), and DeepSpeed's
launcher (`.deepspeed_env`, and over pdsh the command line each node's shell runs). A value
that reader would take as code or as more options is refused: one line naming the key, exit 2.
Torch-free."""

from __future__ import annotations

import re
import shlex

from train.config.shell import hydra_quoted
from train.errors import ConfigError

# C0 and C1 control characters and DEL: a newline ends a script's line (and with it a comment
# or an #SBATCH line), the rest are invisible in a script someone reviews.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# SLURM reads 'hetjob' (or the older 'packjob') anywhere in an #SBATCH line as the start of
# the next component of a heterogeneous job.
HETJOB = re.compile(r"hetjob|packjob", re.IGNORECASE)
# What DeepSpeed's pdsh runner passes to a node's shell unquoted (its own test, less `%`, which
# pdsh itself replaces: %h, %n, %u).
PDSH_WORD = re.compile(r"[\w@+=:,./-]*")
# Inside the double quotes DeepSpeed puts around such values: what the shell still reads, and
# `%` for pdsh.
IN_DOUBLE_QUOTES = set('"$`\\%')


def one_line(key: str, value: str) -> str:
    """`value` when it is one line of printable text; else a ConfigError naming `key`."""
    if CONTROL.search(value):
        raise ConfigError(
            f"{key}={value!r}: holds a newline or another control character; what neo launch "
            "writes into a job script is one line of printable text"
        )
    return value


def shell_word(text: str) -> str:
    """One bash word that reads back as `text`: shlex's quoting, or bash's $'...' where the
    text holds a newline or another control character (so that every word stays on its line:
    a prompt may span lines)."""
    if not CONTROL.search(text):
        return shlex.quote(text)
    # \xHH is one byte: a C1 control (U+0080-U+009F) is written as its two UTF-8 bytes.
    escaped = "".join(
        "".join(f"\\x{b:02x}" for b in c.encode()) if CONTROL.match(c) else "\\" * (c in "\\'") + c
        for c in text
    )
    return f"$'{escaped}'"


def shell_join(words: list[str]) -> str:
    return " ".join(shell_word(w) for w in words)


def sbatch_option(key: str, option: str) -> str:
    """An `#SBATCH` line for one option. sbatch splits these lines at spaces, reads quotes and
    backslashes, and ends them at an unquoted `#` (slurm src/sbatch/opt.c, _get_argument): an
    option holding any of those is double-quoted, its quotes and backslashes escaped."""
    one_line(key, option)
    if HETJOB.search(option):
        raise ConfigError(
            f"{key}: {option!r} holds 'hetjob' or 'packjob', which sbatch reads in an #SBATCH "
            "line as the start of another heterogeneous job component"
        )
    if any(c in " \"'\\#" for c in option):
        option = '"' + option.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"#SBATCH {option}"


def deepspeed_value(key: str, value: str) -> str:
    """A value of `.deepspeed_env`. DeepSpeed's runner reads the file line by line (NAME=value),
    strips each value, and double-quotes one holding anything but [\\w@%+=:,./-] in the
    `export NAME="value";` it puts before the command each node runs (over pdsh: in that node's
    shell). Refused: what that shell reads inside double quotes (" $ ` \\), % (pdsh's own
    substitutions), and spaces at either end (stripped)."""
    one_line(key, value)
    bad = sorted(IN_DOUBLE_QUOTES & set(value))
    if bad or value != value.strip():
        what = " ".join(bad) if bad else "spaces at either end"
        raise ConfigError(
            f"{key}={value!r}: launcher=hostfile carries it to every node in .deepspeed_env, "
            f'which DeepSpeed writes as export NAME="value" into a shell command; {what} '
            "would be read by that shell or lost there"
        )
    return value


def pdsh_word(key: str, value: str, hosts: int, quoted_if_spaced: bool = True) -> str:
    """A word of the command DeepSpeed's pdsh runner has each node's shell run (several hosts):
    the workdir (`cd DIR;`) and the interpreter as they are, every argument of the verb
    double-quoted when it holds a space (`quoted_if_spaced`), else as it is. Refused: what that
    shell would read inside double quotes, and in a word left unquoted anything but
    [\\w@+=:,./-] (quotes, ;, |, $, globs, brackets, braces are all syntax there)."""
    one_line(key, value)
    bad = sorted(IN_DOUBLE_QUOTES & set(value))
    quoted = quoted_if_spaced and " " in value
    if not bad and (quoted or PDSH_WORD.fullmatch(value)):
        return value
    if not bad:
        bad = sorted({c for c in value if not PDSH_WORD.fullmatch(c)})
    advice = (
        "write a list as [a, b], with a space, or use launch.ds_launcher=openmpi, which passes "
        "arguments as they are"
        if quoted_if_spaced
        else "choose one of letters, digits and _ @ + = : , . / -"
    )
    shown = " ".join("space" if c == " " else c for c in bad)
    raise ConfigError(
        f"{key}: {value!r}: over pdsh ({hosts} hosts) DeepSpeed hands this to every node's shell"
        f"{', double-quoted only when it holds a space' if quoted_if_spaced else ' unquoted'}; "
        f"{shown} would be read as shell syntax there ({advice})"
    )


def hydra_path(path) -> str:
    """A path as an override value Hydra reads back unchanged."""
    text = str(path)
    plain = all(c.isalnum() or c in "/._-+@%" for c in text) and text.isascii()
    return text if plain else hydra_quoted(text)
