"""Commands shown to users paste into a shell as printed, and their overrides read back through
Hydra's grammar as the very path they name."""

import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from train.config.shell import command, override, verify_command

AWKWARD = [
    "runs/demo",
    "my exports/model",
    "a,b",
    "it's",
    'say "hi"',
    "~/models",
    "é/ü",
    "a=b",
    "back\\slash\\",
    "end\\'",
    "(x)[y]{z}",
    "$HOME `id`; rm -rf x",
    "${oc.env:HOME}",
    "  spaces  ",
    "null",
    "1",
    "1e3",
    "-dash",
]


@pytest.mark.parametrize("path", AWKWARD)
def read_back(override_text: str) -> tuple[str, str]:
    """(key, value) as Hydra parses an override and OmegaConf then reads the value."""
    parsed = OverridesParser.create().parse_overrides([override_text])[0]
    return parsed.key_or_group, OmegaConf.create({"value": parsed.value()}).value


@pytest.mark.parametrize("path", AWKWARD)
def test_an_override_reads_back_as_the_path_through_shell_and_hydra(path):
    line = command("neo", "export", override("output", path))
    words = shlex.split(line)
    assert words[:2] == ["neo", "export"] and len(words) == 3
    assert read_back(words[2]) == ("output", path)


def test_plain_paths_stay_readable():
    assert command("neo", "plot", override("run_dir", "runs/tiny")) == "neo plot run_dir=runs/tiny"
    assert verify_command("runs/demo/export") == "neo verify runs/demo/export"


@pytest.mark.parametrize("path", AWKWARD)
def test_the_verify_hint_reaches_neo_verify_as_the_path(path, monkeypatch):
    """`neo verify DIR` pasted: train/cli.py turns what the shell gives it into dir=DIR, which
    Hydra must read back as DIR."""
    from train import cli

    seen = []
    monkeypatch.setattr(cli, "run_verb", lambda name, argv: seen.append((name, argv)))
    cli.main(shlex.split(verify_command(path))[1:])
    [(name, [argv])] = seen
    assert name == "verify" and read_back(argv) == ("dir", path)
