"""Conventions the command lines share: exit codes, endpoints, config files, the environment,
and a probe that says why a broker cannot be reached.

Every option of ``chords-broker`` and ``chords-worker`` may also come from its ``CHORDS_*``
variable (the option's name in capitals, dashes as underscores: ``--client-bind`` is
``CHORDS_CLIENT_BIND``) and from a TOML file given with ``--config`` (the same names, dashes or
underscores: ``client-bind = "tcp://127.0.0.1:5555"``). The command line wins over the
environment, which wins over the file, which wins over the defaults. ``chords`` reads
``CHORDS_BROKER`` for ``--broker`` and ``CHORDS_CURVE_SECRET`` / ``CHORDS_BROKER_KEY``.

A daemon's settings are the fields of one frozen dataclass (``BrokerConfig``, ``WorkerConfig``),
each written once with its default. A field whose metadata is ``option(...)`` is on the command
line: ``config_options(Config)`` adds its click option (type, range, default and help from the
field) and ``config_from_options(Config, values)`` builds the config from what click parsed.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import socket
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import click
import tomllib

from chords_mq.errors import ChordsError

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C")
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


# -- sizes -----------------------------------------------------------------------------------------

_SIZE_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE_UNITS.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1})


def parse_bytes(text: str) -> int:
    """``8GiB``, ``512MiB``, ``1e9`` or a plain number of bytes; ``ValueError`` otherwise."""
    cleaned = text.strip().lower()
    for suffix, factor in sorted(_SIZE_UNITS.items(), key=lambda item: -len(item[0])):
        if cleaned.endswith(suffix):
            number, scale = cleaned[: -len(suffix)].strip(), factor
            break
    else:
        number, scale = cleaned, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a size such as 8GiB or 512MiB") from None
    if not value >= 1:
        raise ValueError(f"{text!r}: a size must be at least one byte")
    return int(value)


def format_bytes(size: int) -> str:
    """The shortest exact spelling ``parse_bytes`` reads back: ``8GiB``, ``100MB``, ``1000``."""
    for suffix in ("TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "KB"):
        factor = _SIZE_UNITS[suffix.lower()]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


class ByteSize(click.ParamType):  # type: ignore[type-arg]  # generic in newer click stubs
    """A number of bytes, written as ``parse_bytes`` reads it."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        try:
            return parse_bytes(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


BYTE_SIZE = ByteSize()


# -- a daemon's settings as one dataclass ----------------------------------------------------------

OPTION_KEY = "chords_mq.option"  # the dataclass field metadata key ``option`` fills


@dataclasses.dataclass(frozen=True)
class Unit:
    """How a field's value is written on the command line when the two differ: the option's
    type (``int``, ``float`` or a click type) and the conversions either way."""

    type: type | click.ParamType  # type: ignore[type-arg]  # generic in newer click stubs
    to_field: Callable[[Any], Any]
    to_option: Callable[[Any], Any]


# A field in seconds set by an option in whole milliseconds (``heartbeat_s``: ``--heartbeat-ms``).
MILLISECONDS = Unit(int, lambda ms: ms / 1000.0, lambda seconds: round(seconds * 1000))
# A field in bytes set by an option that reads ``8GiB`` (``parse_bytes``) and shows it so.
BYTES = Unit(BYTE_SIZE, int, format_bytes)


@dataclasses.dataclass(frozen=True)
class Option:
    """How a config field appears on the command line (see ``option``)."""

    help: str | None = None
    name: str | None = None
    min: float | None = None
    max: float | None = None
    unit: Unit | None = None


def option(
    help: str | None = None,
    *,
    name: str | None = None,
    min: float | None = None,
    max: float | None = None,
    unit: Unit | None = None,
) -> dict[str, Option]:
    """Field metadata that puts a config field on the command line:
    ``liveness: int = field(default=3, metadata=option("Missed heartbeats ...", min=1))``.

    The option is ``--`` and the field's name with dashes, or ``--NAME``; its parameter name
    (so its ``CHORDS_*`` variable and its ``--config`` key) follows the option's name. Its click
    type comes from the field's annotation (``int`` / ``float`` with the ``min`` / ``max``
    range, ``bool`` a ``--x/--no-x`` flag, ``Literal[...]`` a choice, ``str``; ``X | None``
    as ``X``, unset by default) or from ``unit``, whose conversion also turns the field's
    default into the option's (``min`` and ``max`` are in the option's unit)."""
    return {OPTION_KEY: Option(help=help, name=name, min=min, max=max, unit=unit)}


@dataclasses.dataclass(frozen=True)
class _Exposed:
    field: str
    param: str  # click's parameter name: the keyword the command gets
    flag: str  # the option as typed, ``--heartbeat-ms``
    spec: Option
    annotation: Any
    default: Any  # the field's


def _exposed(cls: type[Any]) -> list[_Exposed]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    hints = get_type_hints(cls)
    out = []
    for item in dataclasses.fields(cls):
        spec = item.metadata.get(OPTION_KEY)
        if spec is None:
            continue
        if item.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{item.name}: an option needs a plain default")
        flag = spec.name or item.name.replace("_", "-")
        param = flag.replace("-", "_")
        out.append(_Exposed(item.name, param, f"--{flag}", spec, hints[item.name], item.default))
    return out


def _click_type(item: _Exposed) -> Any:
    spec = item.spec
    base = spec.unit.type if spec.unit is not None else _optional_of(item.annotation)
    ranged = spec.min is not None or spec.max is not None
    if base in (int, float):
        if base is int and ranged:
            low = None if spec.min is None else int(spec.min)
            high = None if spec.max is None else int(spec.max)
            return click.IntRange(min=low, max=high)
        if ranged:
            return click.FloatRange(min=spec.min, max=spec.max)
        return click.INT if base is int else click.FLOAT
    if ranged:
        raise TypeError(f"{item.field}: min and max need an int or float option")
    if get_origin(base) is Literal:
        choices = get_args(base)
        if not all(isinstance(choice, str) for choice in choices):
            raise TypeError(f"{item.field}: an option's Literal choices must be strings")
        return click.Choice(choices)
    if base is str:
        return click.STRING
    if isinstance(base, click.ParamType):
        return base
    raise TypeError(f"{item.field}: no command-line type for {base!r}")


def _optional_of(hint: Any) -> Any:
    """``X`` for ``X | None`` (an option that may be left unset), else ``hint``."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def config_options(cls: type[Any]) -> Callable[[F], F]:
    """A decorator that adds one click option for each field of the dataclass ``cls`` whose
    metadata is ``option(...)``, in the fields' order, each with its default shown."""
    exposed = _exposed(cls)

    def decorate(func: F) -> F:
        for item in reversed(exposed):  # click lists a command's options in reverse
            spec = item.spec
            default = item.default if spec.unit is None else spec.unit.to_option(item.default)
            if item.annotation is bool and spec.unit is None:
                flag = item.flag.removeprefix("--")
                decl = click.option(
                    f"--{flag}/--no-{flag}",
                    item.param,
                    default=default,
                    show_default=True,
                    help=spec.help,
                )
            else:
                decl = click.option(
                    item.flag,
                    item.param,
                    type=_click_type(item),
                    default=default,
                    show_default=True,
                    help=spec.help,
                )
            func = decl(func)
        return func

    return decorate


def config_from_options(cls: type[C], values: Mapping[str, Any], **fields: Any) -> C:
    """``cls`` from click's values for the options ``config_options(cls)`` added (each through
    its unit), and ``fields`` set directly; a field with neither keeps its default. A name
    that is not one of those options is a ``TypeError``."""
    exposed = {item.param: item for item in _exposed(cls)}
    unknown = set(values) - set(exposed)
    if unknown:
        raise TypeError(f"not options of {cls.__name__}: {', '.join(sorted(unknown))}")
    kwargs = dict(fields)
    for param, value in values.items():
        unit = exposed[param].spec.unit
        kwargs[exposed[param].field] = value if unit is None else unit.to_field(value)
    return cls(**kwargs)


def config_option_names(cls: type[Any]) -> dict[str, str]:
    """``{field: option}`` for the fields of ``cls`` on the command line:
    ``{"heartbeat_s": "--heartbeat-ms", ...}``."""
    return {item.field: item.flag for item in _exposed(cls)}
