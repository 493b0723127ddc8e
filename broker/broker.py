"""chords-broker: runs each request's plan and dispatches its tasks to workers over ZeroMQ.

Placeholder until the engine lands: it answers --help and says so when started.
"""

from __future__ import annotations

import sys

import click

from chords_mq import __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chords-broker")
def main() -> None:
    """Run the chords-mq broker: owns every request's schedule and streams hits to clients.

    Not implemented yet: the ZeroMQ engine is tracked in issue 3. Until then use
    `chords plan` to inspect schedules.
    """
    click.echo("chords-broker: the ZeroMQ engine is not implemented yet (issue 3)", err=True)
    sys.exit(1)
