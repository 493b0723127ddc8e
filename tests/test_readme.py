"""The README's library example runs and says what it claims."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example():
    text = README.read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "simulate" in c]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert [(h.core, h.round) for h in result.hits] == [(0, 8), (8, 17)]
    assert result.evaluations == 108
    assert "# [(0, 8), (8, 17)]" in code and "108 evaluations" in code


def test_readme_quick_start_has_exactly_two_commands():
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in quick.splitlines() if line.strip()]
    assert commands[0].split("#")[0].strip() == "deploy/dev.sh chords run"
    assert commands[1].startswith("deploy/dev.sh pytest")
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    assert "deploy/dev.sh pytest\n" in ci
