"""Conventions the command lines share: exit codes, endpoints, config files, the environment,
and a probe that says why a broker cannot be reached.

Every option of ``chords-broker`` and ``chords-worker`` may also come from its ``CHORDS_*``
variable (the option's name in capitals, dashes as underscores: ``--client-bind`` is
``CHORDS_CLIENT_BIND``) and from a TOML file given with ``--config`` (the same names, dashes or
underscores: ``client-bind = "tcp://127.0.0.1:5555"``). The command line wins over the
environment, which wins over the file, which wins over the defaults. ``chords`` reads
``CHORDS_BROKER`` for ``--broker`` and ``CHORDS_CURVE_SECRET`` / ``CHORDS_BROKER_KEY``.
"""

from __future__ import annotations

import enum
import re
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import click
import tomllib

from chords_mq.errors import ChordsError

F = TypeVar("F", bound=Callable[..., Any])
ENV_PREFIX = "CHORDS"
_HOST = re.compile(r"^(\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+)$")


class ExitCode(enum.IntEnum):
    """One exit code per class of error, the same for ``chords``, ``chords-broker`` and
    ``chords-worker`` (the README lists them). A signal ends ``chords run`` with 128 + its
    number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""

    OK = 0
    FAILED = 1  # the request failed (the broker's typed error), or a daemon broke at run time
    USAGE = 2  # a bad option, config file, key, endpoint or model path; a port in use or wrong
    UNREACHABLE = 3  # no broker answers at the address, or it went silent mid-request


class ConfigError(click.ClickException):
    """A configuration error found after the options parsed (a port in use, the wrong port):
    one ``Error:`` line, exit code 2 like a usage error, without the usage text."""

    exit_code = ExitCode.USAGE


class Unreachable(click.ClickException):
    """No broker answers, or it went silent while a request ran: exit code 3."""

    exit_code = ExitCode.UNREACHABLE


class EndpointError(ChordsError, ValueError):
    """An endpoint that ZeroMQ could not use."""


class BrokerUnreachable(ChordsError):
    """Nothing answers at a broker's address: the reason (refused, unresolvable, timed out)."""


def endpoint(text: str) -> str:
    """``tcp://host:port``, ``ipc://path`` or ``inproc://name``; a bare ``host:port`` is
    ``tcp://host:port``. Anything else raises ``EndpointError`` naming what is wrong."""
    value = text.strip()
    if "://" not in value:
        value = f"tcp://{value}"
    scheme, _, rest = value.partition("://")
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise EndpointError(f"{text!r}: {scheme}:// needs a name")
        return value
    if scheme != "tcp":
        raise EndpointError(f"{text!r}: the transport must be tcp, ipc or inproc, not {scheme!r}")
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise EndpointError(f"{text!r}: expected host:port, e.g. tcp://127.0.0.1:5555")
    if not _HOST.match(host):
        raise EndpointError(f"{text!r}: {host!r} is not a host name or address")
    if not (port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
        raise EndpointError(f"{text!r}: the port must be 1..65535, got {port!r}")
    return value


class Endpoint(click.ParamType):  # type: ignore[type-arg]  # generic in newer click stubs
    name = "endpoint"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return endpoint(str(value))
        except EndpointError as exc:
            self.fail(str(exc), param, ctx)


ENDPOINT = Endpoint()


class MetricsBind(click.ParamType):  # type: ignore[type-arg]  # generic in newer click stubs
    """``HOST:PORT`` (or ``:PORT``, loopback) for an HTTP listener."""

    name = "host:port"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        host, sep, port = str(value).strip().rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            self.fail(f"{value!r}: expected HOST:PORT, e.g. 127.0.0.1:9100", param, ctx)
        host = host.strip("[]") or "127.0.0.1"
        if not _HOST.match(host) or host == "*":
            self.fail(f"{value!r}: {host!r} is not a host name or address", param, ctx)
        return host, int(port)


METRICS_BIND = MetricsBind()


def probe(address: str, timeout: float = 5.0) -> None:
    """Raise ``BrokerUnreachable`` unless a TCP connection to ``address`` opens within
    ``timeout`` seconds (ipc and inproc endpoints are not probed)."""
    value = endpoint(address)
    if not value.startswith("tcp://"):
        return
    host, _, port = value[len("tcp://") :].rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except socket.gaierror as exc:
        why = f"the host {host!r} does not resolve ({exc.strerror})"
    except ConnectionRefusedError:
        why = "the connection was refused: no broker listens there (is chords-broker running?)"
    except TimeoutError:
        why = f"no answer in {timeout:g}s (a firewall, or the host is down)"
    except OSError as exc:
        why = exc.strerror or str(exc)
    raise BrokerUnreachable(f"cannot reach a broker at {value}: {why}")


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE``: its keys become the command's defaults (below env and options)."""
    if value is None:
        return None
    try:
        with open(value, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}") from None
    known = {p.name for p in ctx.command.params if p.name}
    defaults: dict[str, Any] = {}
    for key, item in data.items():
        name = key.replace("-", "_")
        if name not in known or name == "config":
            raise click.BadParameter(f"{value}: unknown option {key!r}")
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_option(func: F) -> F:
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_config,
        help="A TOML file of option values (names as on the command line). Precedence: "
        "option > CHORDS_* environment > this file > default.",
    )(func)


# For ``click.command(context_settings=DAEMON_CONTEXT)``: every option reads CHORDS_<NAME>.
DAEMON_CONTEXT: dict[str, Any] = {"auto_envvar_prefix": ENV_PREFIX}
