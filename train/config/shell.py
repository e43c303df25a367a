"""Commands shown to users (in hints, errors and logs), written so that they can be pasted into
a shell as printed: every word quoted for the shell (shlex.quote), and a `key=value` override's
value quoted for Hydra's override grammar wherever it holds more than plain path characters (a
comma there makes a sweep, a quote or a non-ASCII letter a parse error, `null` or `1` no string).
"""

from __future__ import annotations

import re
import shlex

# What Hydra reads unquoted as the same string: letters, digits and path punctuation.
_PLAIN = re.compile(r"[A-Za-z0-9_./@%+-]+")
# Hydra's unquoted words that are no strings.
_NOT_STRINGS = {"true", "false", "null", "inf", "-inf", "+inf", "nan"}


def hydra_value(value: str) -> str:
    """`value` as Hydra and OmegaConf read it back unchanged: as it is where that is safe,
    else quoted."""
    if _PLAIN.fullmatch(value) and value.lower() not in _NOT_STRINGS and not _number(value):
        return value
    return hydra_quoted(value)


def hydra_quoted(value: str) -> str:
    """`value` as a Hydra quoted string. Inside the quotes a backslash is literal except where it
    precedes a quote or ends the string: those runs are doubled, and every quote escaped; `${`
    is escaped so that OmegaConf reads no interpolation."""
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    escaped = escaped.replace("'", "\\'").replace("${", "\\${")
    return f"'{escaped}'"


def override(key: str, value: str) -> str:
    """`key=value`, the value quoted for Hydra where needed."""
    return f"{key}={hydra_value(str(value))}"


def command(*words: str) -> str:
    """A command line to paste: each word quoted for the shell where needed."""
    return " ".join(shlex.quote(str(w)) for w in words)


def verify_positional(argument: str) -> bool:
    """Whether `neo verify ARG` reads ARG as the directory (train/cli.py): not an override
    (no `=`) and not an option (no leading `-`)."""
    return "=" not in argument and not argument.startswith("-")


def verify_command(directory: str) -> str:
    """`neo verify DIR`, or `neo verify dir=DIR` for a path the short form cannot carry."""
    directory = str(directory)
    if verify_positional(directory):
        return command("neo", "verify", directory)
    return command("neo", "verify", override("dir", directory))


def _number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True
