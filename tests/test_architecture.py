"""No import runs upward (docs/ARCHITECTURE.md): each module of detkit imports only from its own floor's package
or from the floors below it, checked on the source of every module (module-level and function-level imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import detkit

PACKAGE = Path(detkit.__file__).parent

#: The floors, bottom up: a module may import its own package and any lower floor, never a higher one; on floor 2
#: data and models do not import each other (floor 1's small modules may: paths registers run_config's resolvers).
FLOORS = [
    {"structures", "errors"},                                   # 0: the shared types and the user-error base
    {"paths", "run_config", "config_check", "host_sync"},       # 1: config tree, resolvers, checks, sync counter
    {"data", "models"},                                         # 2: datasets and transforms; networks and losses
    {"eval"},                                                   # 3: metrics, reports, SSL probes
    {"lit"},                                                    # 4: Lightning modules (training loops)
    {"export"},                                                 # 5: checkpoint -> ONNX
    {"cli"},                                                    # 6: the commands
]
LEVEL = {name: i for i, floor in enumerate(FLOORS) for name in floor}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "detkit" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return out


def test_every_detkit_module_is_on_a_floor():
    tops = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    tops |= {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert tops - {"conf"} == set(LEVEL), "a new module or package: give it a floor in FLOORS and ARCHITECTURE.md"


def test_no_import_runs_upward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        me = _part(".".join(rel.parts))
        if me is None or me == "__init__":
            continue
        for module, line in _imports(path):
            other = _part(module)
            if other is None or other == me:
                continue
            if LEVEL[other] > LEVEL[me] or (LEVEL[other] == LEVEL[me] == 2):
                upward.append(f"{rel}.py:{line} ({me}, floor {LEVEL[me]}) imports {module} (floor {LEVEL[other]})")
    assert not upward, "\n".join(upward)
