"""Rule 1 of the architecture: the algorithms and solvers are pure (no zmq, asyncio, models)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import chords_mq

PACKAGE = Path(chords_mq.__file__).parent
PURE = [*sorted((PACKAGE / "algorithms").glob("*.py")), PACKAGE / "solvers.py"]
FORBIDDEN = {"zmq", "asyncio", "diffusers", "transformers", "broker", "workers", "socket"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_pure_modules_import_no_io_or_models():
    assert len(PURE) >= 6
    for path in PURE:
        bad = imported_roots(path) & FORBIDDEN
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_the_algorithms_loads_neither_zmq_nor_diffusers():
    code = (
        "import sys, chords_mq.algorithms, chords_mq.solvers, chords_mq.local; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'zmq', 'diffusers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# The applications on top of the library (chords_mq/apps/): they may start daemons, load models
# and import the broker and the workers; nothing else in chords_mq may.
APPLICATIONS = PACKAGE / "apps"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_library_part_of_chords_mq_imports_neither_the_apps_the_broker_nor_the_workers():
    library = [p for p in sorted(PACKAGE.rglob("*.py")) if APPLICATIONS not in p.parents]
    assert len(library) >= 15
    for path in library:
        bad = imported_roots(path) & {"broker", "workers"}
        bad |= {name for name in imported_modules(path) if name.startswith("chords_mq.apps")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_the_applications_live_in_chords_mq_apps():
    apps = {p.name for p in APPLICATIONS.glob("*.py")}
    assert {"cli.py", "bench.py", "runner.py", "cluster.py", "streaming.py"} <= apps
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert not top & {"cli.py", "bench.py", "runner.py", "cluster.py"}
