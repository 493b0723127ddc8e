"""From the command line to the engine: a request from options, the keys to reach a CURVE broker,
a reachability check that fails fast, and running a client coroutine with one-line errors."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import click

from chords_mq.apps.options import parse_init, parse_params
from chords_mq.errors import ChordsError, DuplicateCoreWarning
from chords_mq.request import RequestSpec


def build_request(
    model: str,
    method: str,
    cores: int | None,
    steps: int,
    init_text: str | None,
    stop_text: str | None,
    seed: int,
    param_values: tuple[str, ...],
    batch: int = 1,
    output: str = "latent",
    tolerance: float | None = None,
    iterations: int | None = None,
    exact_cores: bool = False,
) -> RequestSpec:
    """The request the options describe; a bad one is a usage error (one line), and warnings
    about it are printed (not the one about our own default init sequence for this N)."""
    init = parse_init(init_text) if init_text is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            spec = RequestSpec(
                model=model,
                method=method,
                steps=steps,
                cores=cores,
                init_sequence=None if init is None else tuple(init),
                stop=stop_text,
                seed=seed,
                params=parse_params(param_values),
                batch=batch,
                output=output,
                tolerance=tolerance,
                iterations=iterations,
                exact_cores=exact_cores,
            )
        except ChordsError as exc:
            raise click.UsageError(str(exc)) from None
    for warning in caught:
        if init is None and issubclass(warning.category, DuplicateCoreWarning):
            continue  # about our own default sequence for this N: nothing the user can fix
        click.echo(f"warning: {warning.message}", err=True)
    return spec


def broker_keys(curve_secret: str | None, broker_key: str | None) -> dict[str, Any]:
    from chords_mq.keys import KeyFileError, curve_client

    try:
        curve_client(curve_secret, broker_key)  # both or neither, and readable
    except KeyFileError as exc:
        raise click.UsageError(str(exc)) from None
    return {"curve_secret": curve_secret, "broker_key": broker_key}


def reachable(broker: str, timeout: float | None) -> None:
    """Fail within 5 s, with the address and the reason, when nothing listens at ``broker``
    (exit code 3)."""
    from chords_mq.options import BrokerUnreachable, Unreachable, probe

    try:
        probe(broker, min(5.0, timeout or 5.0))
    except BrokerUnreachable as exc:
        raise Unreachable(str(exc)) from None


def run_engine(coroutine: Any) -> Any:
    """Run a client coroutine; each class of failure is one line and its exit code
    (``chords_mq.options.ExitCode``)."""
    from chords_mq.client import BrokerLost, BrokerSilent, RequestFailed
    from chords_mq.options import ConfigError, Unreachable

    try:
        return asyncio.run(coroutine)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BrokerLost as exc:
        raise Unreachable(f"request failed: {exc}") from None
    except BrokerSilent as exc:
        raise Unreachable(str(exc)) from None
    except RequestFailed as exc:
        if exc.code == "wrong_port":
            raise ConfigError(str(exc.message)) from None
        raise click.ClickException(f"request failed: {exc}") from None
    except ChordsError as exc:  # a request's own --timeout included
        raise click.ClickException(str(exc)) from None
