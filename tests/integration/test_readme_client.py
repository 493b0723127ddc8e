"""The README's AsyncClient snippet, run as written against a real broker (only its address is
this test cluster's)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from chords_mq.request import RequestSpec
from tests.integration.conftest import local_hits

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_async_client_snippet_runs(clusters):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (code,) = [b for b in blocks if "AsyncClient(" in b and "asyncio.run" in b]
    assert '"tcp://127.0.0.1:5555"' in code
    code = code.replace("tcp://127.0.0.1:5555", clusters[4].client_address)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected = local_hits(RequestSpec(model="synthetic", cores=4, steps=30, seed=3))
    rows = [line.split()[:2] for line in lines[:-1]]
    assert rows == [[str(h.core), str(h.round)] for h in expected]
    assert lines[-1] == "granted cores: 4"
