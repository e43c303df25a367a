"""The layout is the architecture (../shared/ARCHITECTURE.md): imports run one way, no module
imports one above it, no cycle, no module over 400 lines, and what must stay torch-free does."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

# Each folder of train/ and its place in the order; a module imports only its own folder and
# the ones before it. data and checkpoints stand side by side and do not import each other.
LAYERS = {
    "errors": 0,
    "config": 1,
    "model": 2,
    "data": 3,
    "checkpoints": 3,
    "distributed": 4,
    "loop": 5,
    "evals": 6,
    "verbs": 7,
    "cli": 8,
}
MAX_LINES = 400


def modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of a top-level package."""
    out = {}
    for file in sorted((ROOT / package).rglob("*.py")):
        parts = file.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = file
    return out


def imports(file: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


TRAIN = modules("train")
ALL = {**TRAIN, **modules("data_prep"), **modules("launch")}


def layer(module: str) -> str:
    """train.loop.fit -> loop; train.cli -> cli; train (its __init__: the version) -> errors."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"


def internal(module: str, target: str) -> set[str]:
    """The project's modules among `target`'s imports (module names only, not attributes)."""
    return {t for t in imports(ALL[module]) if t in ALL and t != module}


@pytest.mark.parametrize("module", sorted(TRAIN))
def test_train_imports_run_one_way(module):
    mine = layer(module)
    for target in internal(module, module):
        if not target.startswith("train"):
            continue
        theirs = layer(target)
        assert LAYERS[theirs] <= LAYERS[mine], f"{module} imports {target}: upward"
        if LAYERS[theirs] == LAYERS[mine]:
            assert theirs == mine, f"{module} imports {target}: side by side, they must not"


def test_no_cycle_between_modules():
    graph = {m: internal(m, m) for m in ALL}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, t]))
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_data_prep_and_launch_import_only_what_they_may():
    """data_prep reads corpora for any framework: train.errors only. launch runs on a login
    node: the configs (to compose and resolve as the verb will), errors, data_prep; no verb."""
    for module, file in ALL.items():
        targets = {t for t in imports(file) if t.startswith("train")}
        if module.startswith("data_prep"):
            assert targets <= {"train.errors", "train.errors.NeoError"} | {
                t for t in targets if t.startswith("train.errors")
            }, (module, targets)
        if module.startswith("launch"):
            allowed = ("train.errors", "train.config")
            assert all(t.startswith(allowed) for t in targets), (module, targets)


@pytest.mark.parametrize("prefix", ["train.config", "launch", "data_prep", "train.errors"])
def test_torch_free_parts_import_no_torch(prefix):
    for module, file in ALL.items():
        if module.startswith(prefix):
            heavy = {t for t in imports(file) if t.split(".")[0] in ("torch", "deepspeed")}
            assert not heavy, f"{module} imports {heavy}"


def test_deepspeed_and_torch_npu_are_imported_in_one_place_each():
    """DeepSpeed: the engine (and its offline checkpoint reader, for consolidating saved
    weights); torch_npu: the Ascend op module."""
    users = {"deepspeed": set(), "torch_npu": set()}
    for module, file in ALL.items():
        for target in imports(file):
            root = target.split(".")[0]
            if root in users:
                users[root].add(module)
    assert users["deepspeed"] == {"train.loop.engine", "train.checkpoints.zero"}
    assert users["torch_npu"] == {"train.model.ops.npu"}


def test_no_module_is_over_400_lines():
    long = {
        m: n
        for m, f in ALL.items()
        if not m.startswith("data_prep.sample") and (n := len(f.read_text().splitlines())) > 400
    }
    assert not long, long


def test_programs_and_parts_live_apart():
    """train/verbs holds one module per verb and nothing else imports it; the top of train/
    holds only the command and the errors."""
    top = {f.name for f in (ROOT / "train").glob("*.py")}
    assert top == {"__init__.py", "cli.py", "errors.py"}
    for module in ALL:
        if module.startswith("train.verbs") or module == "train.cli":
            continue
        verbs = {t for t in internal(module, module) if t.startswith("train.verbs")}
        assert not verbs, f"{module} imports the verbs {verbs}"


def test_every_task_type_the_config_knows_is_defined():
    from train.config.evaluation import TASK_TYPES
    from train.evals.tasks import SPECS

    assert set(SPECS) == set(TASK_TYPES)
