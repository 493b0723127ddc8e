"""The daemons' options come from their config classes: one option per exposed field, with the
field's default, under the names (so ``CHORDS_*`` variables and ``--config`` keys) users know."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import click
import pytest
from click.testing import CliRunner

from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.server import main as broker_main
from chords_mq.options import (
    BYTES,
    config_from_options,
    config_option_names,
    config_options,
    format_bytes,
    option,
    parse_bytes,
)
from chords_mq.workers.worker import WorkerConfig
from chords_mq.workers.worker import main as worker_main

# The broker's command line as users, scripts and the README know it.
BROKER_OPTIONS = {
    "heartbeat_s": "--heartbeat-ms",
    "liveness": "--liveness",
    "worker_timeout_s": "--worker-timeout",
    "drain_timeout_s": "--drain-timeout",
    "max_task_retries": "--max-task-retries",
    "max_lost_inputs": "--max-lost-inputs",
    "max_request_bytes": "--max-request-bytes",
    "max_sessions": "--max-sessions",
    "max_client_requests": "--max-client-requests",
    "max_queued_tasks": "--max-queued-tasks",
    "quarantine_after": "--quarantine-after",
    "quarantine_s": "--quarantine-s",
    "verify": "--verify",
    "verify_trusted_after": "--verify-trusted-after",
    "verify_half_life": "--verify-half-life",
    "verify_floor": "--verify-floor",
    "verify_tolerance": "--verify-tolerance",
    "placement": "--placement",
    "cores_policy": "--cores-policy",
    "data_plane": "--data-plane",
    "link_placement": "--link-placement",
    "chain": "--chain",
    "push": "--push",
    "push_local": "--push-local",
    "hit_parts": "--hit-parts",
}
# What each shows as its default in --help.
BROKER_SHOWN = {
    "--heartbeat-ms": "250",
    "--liveness": "3",
    "--worker-timeout": "30.0",
    "--drain-timeout": "30.0",
    "--max-task-retries": "3",
    "--max-lost-inputs": "3",
    "--max-request-bytes": "8GiB",
    "--max-sessions": "1024",
    "--max-client-requests": "64",
    "--max-queued-tasks": "65536",
    "--quarantine-after": "2",
    "--quarantine-s": "600.0",
    "--verify": "sample",
    "--verify-trusted-after": "500",
    "--verify-half-life": "10",
    "--verify-floor": "0.05",
    "--placement": "eft",
    "--cores-policy": "adaptive",
    "--data-plane": "data-plane",
    "--chain": "4",
}
BROKER_HAND_WRITTEN = {
    "config",
    "client_bind",
    "worker_bind",
    "curve_dir",
    "insecure",
    "metrics_bind",
    "log_level",
    "log_format",
    "version",
}


@pytest.fixture(autouse=True)
def _no_chords_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("CHORDS_"):
            monkeypatch.delenv(name)


def parse(command: click.Command, *args: str) -> dict[str, Any]:
    """The values click parses for ``args`` (the environment and ``--config`` included)."""
    with command.make_context(command.name, list(args)) as ctx:
        return dict(ctx.params)


def settings(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {
        flag.removeprefix("--").replace("-", "_") for flag in config_option_names(cls).values()
    }
    return {name: value for name, value in values.items() if name in names}


def broker_config(*args: str) -> BrokerConfig:
    return config_from_options(BrokerConfig, settings(BrokerConfig, parse(broker_main, *args)))


def test_every_exposed_broker_field_has_exactly_one_option_under_its_old_name():
    assert config_option_names(BrokerConfig) == BROKER_OPTIONS
    for flag in BROKER_OPTIONS.values():
        assert sum(flag in param.opts for param in broker_main.params) == 1, flag
    generated = {flag.removeprefix("--").replace("-", "_") for flag in BROKER_OPTIONS.values()}
    names = [param.name for param in broker_main.params]
    assert len(names) == len(set(names))
    assert set(names) == BROKER_HAND_WRITTEN | generated  # no config field written by hand


def test_each_broker_option_defaults_to_its_field_default():
    ctx = click.Context(broker_main)
    defaults = {f.name: f.default for f in fields(BrokerConfig)}
    for field_name, flag in BROKER_OPTIONS.items():
        (param,) = [p for p in broker_main.params if flag in p.opts]
        assert param.show_default
        value = param.type_cast_value(ctx, param.get_default(ctx))
        assert param.name is not None
        built = config_from_options(BrokerConfig, {param.name: value})
        assert getattr(built, field_name) == defaults[field_name], flag
    assert broker_config() == BrokerConfig()  # with no options: exactly the default config


def help_entries(command: click.Command) -> dict[str, str]:
    """``--help`` as ``{option: its text}``, a wrapped entry's lines joined."""
    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0, result.output
    entries: dict[str, str] = {}
    current = None
    for line in result.output.splitlines():
        if line.startswith("  -"):
            current = line.split()[0]
            entries[current] = line.strip()
        elif current is not None and line.startswith("    "):
            entries[current] += " " + line.strip()
    return entries


def test_broker_help_lists_every_option_with_its_default():
    lines = help_entries(broker_main)
    for flag, shown in BROKER_SHOWN.items():
        assert re.search(rf"\[default: {re.escape(shown)}[;\]]", lines[flag]), lines[flag]
    assert "INTEGER RANGE" in lines["--heartbeat-ms"] and "x>=20" in lines["--heartbeat-ms"]
    assert "[eft|fifo]" in lines["--placement"]
    assert "[adaptive|fixed]" in lines["--cores-policy"]
    assert "SIZE" in lines["--max-request-bytes"]
    assert "declared dead" in lines["--liveness"]


def test_broker_options_set_the_fields_in_their_units(monkeypatch, tmp_path):
    config = broker_config(
        "--heartbeat-ms", "100", "--max-request-bytes", "512MiB", "--placement", "fifo"
    )
    assert config.heartbeat_s == 0.1
    assert config.max_request_bytes == 512 << 20
    assert config.placement == "fifo"
    monkeypatch.setenv("CHORDS_WORKER_TIMEOUT", "5")
    monkeypatch.setenv("CHORDS_CORES_POLICY", "fixed")
    toml = tmp_path / "broker.toml"
    toml.write_text('max-request-bytes = "1GiB"\ndrain_timeout = 7\nheartbeat-ms = 500\n')
    config = broker_config("--config", str(toml), "--heartbeat-ms", "40")
    assert config.worker_timeout_s == 5.0 and config.cores_policy == "fixed"
    assert config.max_request_bytes == 1 << 30 and config.drain_timeout_s == 7.0
    assert config.heartbeat_s == 0.04  # the option beats the file


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-request-bytes", "lots"], "'lots' is not a size"),
        (["--heartbeat-ms", "5"], "--heartbeat-ms"),
        (["--placement", "random"], "--placement"),
        (["--liveness", "0"], "--liveness"),
        # longer than an EVAL holds (MAX_TASKS): every worker would drop the EVAL as malformed
        (["--chain", "17"], "17 is not in the range 1<=x<=16"),
    ],
)
def test_a_bad_broker_option_is_a_usage_error(args, message):
    result = CliRunner().invoke(broker_main, args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_the_worker_options_come_from_worker_config():
    assert config_option_names(WorkerConfig) == {
        "heartbeat_s": "--heartbeat-ms",
        "cache_size": "--cache-size",
        "data_bind": "--data-bind",
        "advertise": "--advertise",
    }
    values = settings(WorkerConfig, parse(worker_main))
    assert values == {"heartbeat_ms": 250, "cache_size": 16, "data_bind": None, "advertise": None}
    assert config_from_options(WorkerConfig, values) == WorkerConfig()
    values = settings(WorkerConfig, parse(worker_main, "--heartbeat-ms", "50", "--cache-size", "2"))
    assert config_from_options(WorkerConfig, values) == WorkerConfig(heartbeat_s=0.05, cache_size=2)
    lines = help_entries(worker_main)
    assert "[default: 250; x>=20]" in lines["--heartbeat-ms"]
    assert "Prepared requests kept per worker.  [default: 16; x>=1]" in lines["--cache-size"]
    assert "the address this host reaches --broker from" in lines["--data-bind"]


def test_the_data_endpoint_options_are_optional_text_from_options_env_and_file(
    monkeypatch, tmp_path
):
    args = ("--data-bind", "tcp://10.0.0.5:0", "--advertise", "gw.example:7000")
    values = settings(WorkerConfig, parse(worker_main, *args))
    config = config_from_options(WorkerConfig, values)
    assert (config.data_bind, config.advertise) == ("tcp://10.0.0.5:0", "gw.example:7000")
    toml = tmp_path / "worker.toml"
    toml.write_text('data-bind = "tcp://10.0.0.6:7001"\nadvertise = "gw:1"\n')
    monkeypatch.setenv("CHORDS_ADVERTISE", "nat.example:7002")
    values = settings(WorkerConfig, parse(worker_main, "--config", str(toml)))
    config = config_from_options(WorkerConfig, values)
    assert (config.data_bind, config.advertise) == ("tcp://10.0.0.6:7001", "nat.example:7002")


@dataclass(frozen=True)
class Toy:
    verbose: bool = field(default=False, metadata=option("Say more."))
    mode: Literal["a", "b"] = field(default="b", metadata=option())
    size: int = field(default=1000, metadata=option(unit=BYTES))
    ratio: float = field(default=0.5, metadata=option(min=0, max=1))
    label: str = field(default="x", metadata=option(name="tag"))
    hidden: int = 7


def test_types_come_from_the_annotations():
    @click.command()
    @config_options(Toy)
    def toy(**values: Any) -> None:
        click.echo(repr(config_from_options(Toy, values, hidden=8)))

    result = CliRunner().invoke(toy, ["--verbose", "--mode", "a", "--size", "2KiB", "--tag", "y"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == repr(Toy(True, "a", 2048, 0.5, "y", 8))
    assert [p.name for p in toy.params] == ["verbose", "mode", "size", "ratio", "tag"]
    assert CliRunner().invoke(toy, ["--ratio", "2"]).exit_code == 2
    assert "--no-verbose" in CliRunner().invoke(toy, ["--help"]).output
    with pytest.raises(TypeError, match="not options of Toy"):
        config_from_options(Toy, {"hidden": 1})


def test_a_field_without_a_command_line_type_is_refused():
    @dataclass(frozen=True)
    class Bad:
        items: tuple[int, ...] = field(default=(), metadata=option())

    with pytest.raises(TypeError, match="no command-line type"):
        config_options(Bad)(lambda: None)


@pytest.mark.parametrize(
    ("text", "size"),
    [("8GiB", 8 << 30), ("512 MiB", 512 << 20), ("1e9", 10**9), ("100MB", 10**8), ("3", 3)],
)
def test_sizes_read_and_print_back(text, size):
    assert parse_bytes(text) == size
    assert parse_bytes(format_bytes(size)) == size
    assert format_bytes(8 << 30) == "8GiB"


@pytest.mark.parametrize("text", ["", "GiB", "0", "-1MiB", "eight"])
def test_a_bad_size_is_a_value_error(text):
    with pytest.raises(ValueError):
        parse_bytes(text)
