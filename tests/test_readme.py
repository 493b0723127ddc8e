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


def test_readme_bench_table_is_the_committed_result():
    """The README quotes benchmarks/results/bench_digits_cpu exactly as `chords bench` wrote it."""
    import json

    from chords_mq.apps.bench import markdown

    results = README.parent / "benchmarks" / "results" / "bench_digits_cpu"
    data = json.loads((results / "bench.json").read_text())
    table = [line for line in markdown(data).splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(data["rows"])
    assert "\n".join(table) in README.read_text()
    assert (results / "bench.md").read_text() == markdown(data)


def test_benchmark_docs_quote_the_committed_bench_results():
    import json

    from chords_mq.apps.bench import markdown

    docs = (README.parent / "docs" / "benchmarks.md").read_text()
    names = (
        "bench_digits_cpu",
        "bench_synthetic_cpu",
        "bench_digits_h200",
        "bench_synthetic_h200_host",
        "core1_h200",
    )
    for name in names:
        data = json.loads(
            (README.parent / "benchmarks" / "results" / name / "bench.json").read_text()
        )
        table = [line for line in markdown(data).splitlines() if line.startswith("|")]
        assert "\n".join(table) in docs, name
        assert (README.parent / "benchmarks" / "results" / name / "bench.md").read_text() == (
            markdown(data)
        ), name


def test_gpu_core1_check_is_exact():
    """docs/benchmarks.md says CHORDS' core 1 equalled sequential exactly on the H200: check the
    committed per-sample RMSEs rather than the rounded table."""
    import json

    path = README.parent / "benchmarks" / "results" / "core1_h200" / "bench.json"
    data = json.loads(path.read_text())
    chords = [s for s in data["samples"] if s["method"] == "chords"]
    assert data["machine"]["worker_devices"] == ["cuda"]
    assert len(chords) == 20
    assert all(s["returned_core"] == 1 and s["latent_rmse"] == 0.0 for s in chords)


def test_models_doc_quotes_the_gpu_numerics_results():
    """docs/models.md's CUDA table says, per family and dtype, what the committed run measured."""
    import json

    root = README.parent
    data = json.loads((root / "benchmarks" / "results" / "device_numerics_h200.json").read_text())
    docs = (root / "docs" / "models.md").read_text()
    cells: dict[tuple[str, str], set[str]] = {}
    for row in data["rows"]:
        text = "bitwise" if row["bitwise"] else f"differs, max {row['max_abs_diff']:.3g}"
        cells.setdefault((row["family"], row["dtype"]), set()).add(text)
    families = sorted({family for family, _ in cells})
    assert len(families) == 7 and all(len(found) == 1 for found in cells.values())
    for family in families:
        (f32,), (bf16,) = cells[(family, "float32")], cells[(family, "bfloat16")]
        assert f"| {family} | {f32} | {bf16} |" in docs, family
