"""``chords``: the command-line front end.

``chords plan`` prints a CHORDS schedule (init sequence, hits, rounds, evaluations) by driving
the real plan in-process on a toy ODE. The engine commands (run, generate, bench, status) arrive
with the broker and workers.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import click

from chords_mq import __version__
from chords_mq.algorithms import ChordsPlan, init_sequence, parse_stop
from chords_mq.algorithms.init_sequence import default_speedup
from chords_mq.errors import ChordsError
from chords_mq.local import SimulationResult, ToyODE, simulate
from chords_mq.solvers import grid_euler


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chords")
def main() -> None:
    """chords-mq: parallel-in-time diffusion sampling (CHORDS) over ZeroMQ."""


def _parse_init(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: expected comma-separated step indices, e.g. 0,2,4,8", param_hint="--init"
        ) from None


@main.command()
@click.option(
    "--steps",
    "-n",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Number of diffusion steps N.",
)
@click.option(
    "--cores",
    "-k",
    type=click.IntRange(min=1),
    default=None,
    help="Number of cores K (default 8, or the length of --init).",
)
@click.option(
    "--init",
    "init_text",
    default=None,
    metavar="I1,I2,...",
    help="Explicit init sequence, e.g. 0,2,4,8,16,24,32,40 (default: Theorem 2.5 rule).",
)
@click.option(
    "--speedup",
    "-s",
    type=float,
    default=None,
    help="Target speedup s of the Theorem 2.5 rule (default: the paper's for K).",
)
@click.option(
    "--stop",
    "stop_text",
    default="none",
    show_default=True,
    metavar="none|core-index:M|residual:TAU",
    help="Stop rule. residual is evaluated on a built-in 64-dim toy ODE.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def plan(
    steps: int,
    cores: int | None,
    init_text: str | None,
    speedup: float | None,
    stop_text: str,
    as_json: bool,
) -> None:
    """Show the CHORDS schedule: hits, their rounds and speedups, and who runs what each round."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if init_text is not None:
                if speedup is not None:
                    raise click.UsageError("--init and --speedup exclude each other")
                sequence = init_sequence(_parse_init(init_text), steps)
                if cores is not None and cores != len(sequence):
                    raise click.UsageError(
                        f"--cores {cores} but --init has {len(sequence)} entries"
                    )
            else:
                cores = 8 if cores is None else cores
                sequence = init_sequence(cores, steps, speedup)
            stop = parse_stop(stop_text)
        except ChordsError as exc:
            raise click.UsageError(str(exc)) from None
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)

    toy = ToyODE(steps)
    grid = grid_euler([i / steps for i in range(steps + 1)])
    the_plan = ChordsPlan(toy.x0, steps, sequence, solver=grid, stop=stop)
    result = simulate(the_plan, toy.velocity)
    rule_speedup = None if init_text is not None else speedup or default_speedup(len(sequence))
    report = _report(steps, sequence, rule_speedup, str(stop or "none"), the_plan, result)
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(_render(report))


def _report(
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


def _render(report: dict[str, Any]) -> str:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
