"""The package's imports run one way: faces -> roles -> event log -> transport -> vocabulary."""

from __future__ import annotations

import ast
from pathlib import Path

import streamsched

PACKAGE = Path(streamsched.__file__).parent
#: Lower numbers sit lower; a module may import its own layer and the ones below it.
LAYERS = {"vocabulary": 0, "transport": 1, "eventlog": 2, "roles": 3, "faces": 4, "bench": 4}
VOCABULARY = {"model", "subjects", "errors", "config", "registry", "tracing", "logs"}


def layer_of(module: str) -> str:
    """``module`` is a dotted name under ``streamsched`` (``roles.worker``, ``model``)."""
    top = module.split(".")[0]
    if top in ("transport", "eventlog", "roles", "bench"):
        return top
    return "vocabulary" if top in VOCABULARY else "faces"


def imports_of(path: Path) -> set[str]:
    """The ``streamsched`` modules ``path`` imports, relative to the package, at any depth."""
    module = path.relative_to(PACKAGE).with_suffix("").parts
    package = module[:-1]  # an __init__'s package is the package it starts
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("streamsched"):
                target = node.module.split(".")[1:]
            else:
                continue
            if node.module is None:  # from . import a, b
                found.update(".".join([*target, alias.name]) for alias in node.names)
            elif target:
                found.add(".".join(target))
    return found


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        own = layer_of(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for target in imports_of(path):
            if LAYERS[layer_of(target)] > LAYERS[own]:
                upward.append(f"{path.relative_to(PACKAGE)} ({own}) imports {target} ({layer_of(target)})")
    assert upward == []


def test_the_layout_check_sees_an_upward_import() -> None:
    assert layer_of("roles.worker") == "roles"
    assert layer_of("transport.streams") == "transport"
    assert "roles.projector" in imports_of(PACKAGE / "roles" / "rebuild.py")
    assert LAYERS[layer_of("roles.projector")] > LAYERS[layer_of("transport.streams")]
