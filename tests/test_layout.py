"""The package's layers: a folder is a concern, nothing imports upward, commands are imported by none.

Read from the source (every import, the lazy ones inside functions too), so a new upward import
fails here before it becomes a cycle. The old flat names kept for one release still import.
"""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

import rtrain

PACKAGE = Path(rtrain.__file__).resolve().parent
BASE = {"cli", "config", "errors", "precision", "ray_session", "storage"}  # below every concern
# Each concern may import the base, itself and the concerns listed before it.
LAYERS = ["models", "data", "runs", "evaluation", "deploy", "training", "search"]
COMMANDS = {"fit", "tune", "evaluate", "predict", "export", "visualize", "compare", "__main__"}
SHIMS = {"runner", "inference"}  # old names, re-exports for one release


def _rtrain_imports(path: Path) -> set[str]:
    """The first component under rtrain of every `rtrain.*` module `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "rtrain":
                names += [f"rtrain.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # relative: inside its own package
            continue
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("rtrain.")}
    return found - {"__version__"}


def _concern(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_module_lives_in_a_concern_or_is_a_command_or_the_base():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == COMMANDS | BASE | SHIMS, sorted(top ^ (COMMANDS | BASE | SHIMS))
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == set(LAYERS)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_upward_or_a_command(path):
    concern = _concern(path)
    imported = _rtrain_imports(path)
    if path.name == "__main__.py" or concern in COMMANDS or concern in SHIMS:
        assert not imported & (COMMANDS - {concern}), f"{path}: a command imports another command"
        return
    assert not imported & COMMANDS, f"{path} imports the command(s) {sorted(imported & COMMANDS)}"
    assert not imported & SHIMS, f"{path} imports an old name {sorted(imported & SHIMS)}"
    if concern in BASE or concern == "__init__":
        allowed = BASE
    else:
        allowed = BASE | set(LAYERS[: LAYERS.index(concern) + 1])
    assert imported <= allowed, f"{path} ({concern}) imports upward: {sorted(imported - allowed)}"


def test_the_documented_old_imports_still_work_and_say_where_they_went():
    import sys

    for old, new, name in (("rtrain.runner", "rtrain.training.runner", "fit"),
                           ("rtrain.inference", "rtrain.deploy.inference", "decode")):
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert getattr(module, name) is getattr(importlib.import_module(new), name)
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
