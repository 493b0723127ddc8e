"""Rule 1 of the architecture, and the layers: the import-linter contracts in pyproject.toml
(`lint-imports`) hold, and importing the plans loads neither ZeroMQ nor a model library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert f"{len(contracts['contracts'])} kept, 0 broken" in out.stdout


def test_importing_the_algorithms_loads_neither_zmq_nor_diffusers():
    code = (
        "import sys, chords_mq.algorithms, chords_mq.solvers, chords_mq.local; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'zmq', 'diffusers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_installed_namespace_and_no_top_level_broker_or_workers():
    """broker/ and workers/ are chords_mq.broker and chords_mq.workers; nothing imports them
    as top-level packages (outside the repository they do not exist)."""
    for name in ("broker", "workers"):
        link = ROOT / "chords_mq" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve()
    offenders = []
    for folder in ("chords_mq", "broker", "workers", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                words = line.split()
                if (
                    words[:1] in (["import"], ["from"])
                    and len(words) > 1
                    and words[1].split(".")[0] in ("broker", "workers")
                ):
                    offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert offenders == []
