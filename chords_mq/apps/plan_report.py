"""``chords plan``'s report: a CHORDS schedule, as a JSON-ready dict and as text."""

from __future__ import annotations

from typing import Any

from chords_mq.algorithms import ChordsPlan
from chords_mq.local import SimulationResult


def plan_report(
    steps: int,
    sequence: list[int],
    speedup: float | None,
    stop: str,
    the_plan: ChordsPlan,
    result: SimulationResult,
) -> dict[str, Any]:
    def hit_entry(hit: Any) -> dict[str, Any]:
        return {"core": hit.core, "round": hit.round, "speedup": round(steps / hit.round, 3)}

    return {
        "steps": steps,
        "cores": len(sequence),
        "init_sequence": sequence,
        "speedup_target": speedup,
        "stop": stop,
        "hits": [hit_entry(hit) for hit in result.hits],
        "returned": hit_entry(result.returned),
        "evaluations": result.evaluations,
        "sequential_evaluations": steps,
        "rounds": [[list(pair) for pair in pairs] for pairs in result.rounds],
        "rectifications": [
            {"core": r.core, "round": r.round, "anchor": r.anchor, "target": r.target}
            for r in the_plan.rectifications
        ],
    }


def render_report(report: dict[str, Any]) -> str:
    steps, cores, sequence = report["steps"], report["cores"], report["init_sequence"]
    lines = [f"CHORDS plan: N={steps} steps, K={cores} cores"]
    target = report["speedup_target"]
    rule = "" if target is None else f" (Theorem 2.5 rule, s={target:g}, horizon 0.96 N)"
    lines.append(f"init sequence: {sequence}{rule}")
    lines.append(f"stop rule: {report['stop']}")
    lines.append("")
    lines.append("hits, in order:")
    lines.append("   core  round  speedup (N/round)")
    for hit in report["hits"]:
        note = ""
        if hit["core"] == 0:
            note = f"  zero-th hit: one jump {sequence[-1]} -> {steps}"
        elif hit["core"] == 1:
            note = "  core 1 = sequential solve"
        lines.append(f"   {hit['core']:>4}  {hit['round']:>5}  {hit['speedup']:>7.3f}x{note}")
    returned = report["returned"]
    lines.append(
        f"returned: core {returned['core']} at round {returned['round']} "
        f"({returned['speedup']:.3f}x)"
    )
    lines.append(
        f"evaluations: {report['evaluations']} (sequential: {report['sequential_evaluations']})"
    )
    lines.append("")
    lines.append("rounds: the step each core evaluates ('.' idle, '*' rectified after it)")
    rectified = {(r["round"], r["core"]) for r in report["rectifications"]}
    width = max(3, len(str(steps)) + 1)
    header = "".join(f"{'c' + str(k):>{width + 1}}" for k in range(1, cores + 1))
    lines.append(f"  round calls |{header}")
    for number, pairs in enumerate(report["rounds"], start=1):
        by_core = {core: step for step, core in pairs}
        cells = []
        for k in range(1, cores + 1):
            if k in by_core:
                mark = "*" if (number, k) in rectified else " "
                cells.append(f"{by_core[k]:>{width}}{mark}")
            else:
                cells.append(f"{'.':>{width}} ")
        lines.append(f"  {number:>5} {len(pairs):>5} |{''.join(cells)}")
    return "\n".join(lines)
