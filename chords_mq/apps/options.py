"""The ``chords`` command's option blocks, shared by its commands, and their parsers."""

from __future__ import annotations

import json
from typing import Any

import click

from chords_mq.options import ENDPOINT
from chords_mq.request import METHODS as METHOD_CHOICES


def parse_init(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: expected comma-separated step indices, e.g. 0,2,4,8", param_hint="--init"
        ) from None


def parse_params(values: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--param")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw  # plain strings need no quotes: --param prompt=a cat
    return params


def request_options(func: Any) -> Any:
    options = [
        click.option("--model", default="synthetic", show_default=True, help="Model spec."),
        click.option(
            "--method",
            type=click.Choice(list(METHOD_CHOICES)),
            default="chords",
            show_default=True,
            help="Sampling method: CHORDS, plain sequential, or a baseline.",
        ),
        click.option(
            "--cores",
            "-k",
            type=click.IntRange(min=1),
            default=None,
            help="Cores K: workers used at once (default 4, or the length of --init).",
        ),
        click.option(
            "--tolerance",
            type=click.FloatRange(min=0),
            default=None,
            help="paradigms: error tolerance tau (default 0.1).",
        ),
        click.option(
            "--iterations",
            type=click.IntRange(min=1),
            default=None,
            help="srds-parareal: iteration cap P (default B = floor(sqrt(N)), exact).",
        ),
        click.option("--steps", "-n", type=click.IntRange(min=1), default=50, show_default=True),
        click.option(
            "--init", "init_text", default=None, metavar="I1,I2,...", help="Explicit init sequence."
        ),
        click.option(
            "--stop",
            "stop_text",
            default=None,
            metavar="core-index:M|residual:TAU|residual-cores:TAU",
            help="Stop rule (default: none).",
        ),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True),
        click.option(
            "--param",
            "param_values",
            multiple=True,
            metavar="KEY=VALUE",
            help="Model parameter, VALUE as JSON or a plain string; repeatable.",
        ),
        click.option(
            "--out",
            "out_dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Save each hit and summary.json in this directory.",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0),
            default=None,
            help="Give up after this many seconds.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


# A running broker's client endpoint, for the commands that talk to one.
broker_option = click.option(
    "--broker",
    type=ENDPOINT,
    envvar="CHORDS_BROKER",
    default="tcp://127.0.0.1:5555",
    show_default=True,
    help="The broker's client endpoint (host:port means tcp://host:port).",
)


def curve_options(func: Any) -> Any:
    """--curve-secret and --broker-key, for commands that talk to a CURVE broker."""
    func = click.option(
        "--broker-key",
        type=click.Path(dir_okay=False),
        envvar="CHORDS_BROKER_KEY",
        default=None,
        help="The broker's public key (broker.key), with --curve-secret.",
    )(func)
    return click.option(
        "--curve-secret",
        type=click.Path(dir_okay=False),
        envvar="CHORDS_CURVE_SECRET",
        default=None,
        help="Your CURVE key pair (NAME.key_secret from chords keygen).",
    )(func)
