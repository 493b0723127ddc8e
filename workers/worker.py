"""chords-worker: one process per device that holds a diffusers model and runs tasks.

Placeholder until the engine lands: it answers --help and says so when started.
"""

from __future__ import annotations

import sys

import click

from chords_mq import __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--gpu",
    type=click.IntRange(min=0),
    default=None,
    help="CUDA device index this worker owns (default: the CPU).",
)
@click.version_option(__version__, prog_name="chords-worker")
def main(gpu: int | None) -> None:
    """Run one chords-mq worker on one device (a GPU, or the CPU).

    Not implemented yet: the ZeroMQ engine is tracked in issue 3.
    """
    click.echo("chords-worker: the ZeroMQ engine is not implemented yet (issue 3)", err=True)
    sys.exit(1)
