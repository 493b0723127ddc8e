"""chords-worker's identity and exposure, in-process: ``--worker-name`` (what an insecure pool
keys a worker's standing by) and the warning a worker prints when it runs off loopback
without CURVE."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

from chords_mq.workers.worker import WorkerConfig, _data_server
from chords_mq.workers.worker import main as worker_main


@pytest.mark.parametrize("name", ["", "two words", "x" * 129, "tab\there"])
def test_a_bad_worker_name_is_a_usage_error(name):
    result = CliRunner().invoke(worker_main, ["--worker-name", name])
    assert result.exit_code == 2 and "--worker-name" in result.output


def test_an_insecure_data_endpoint_off_loopback_warns_loudly(caplog):
    config = WorkerConfig(data_bind="tcp://0.0.0.0:0")
    with caplog.at_level(logging.WARNING, logger="chords.worker"):
        server = _data_server("tcp://127.0.0.1:1", config, None, True, "cpu")
    server.close()
    (warning,) = [r.getMessage() for r in caplog.records if "INSECURE" in r.getMessage()]
    assert "tcp://0.0.0.0:0" in warning and "--curve-secret" in warning


def test_a_loopback_worker_says_nothing_of_the_kind(caplog):
    config = WorkerConfig(data_bind="tcp://127.0.0.1:0")
    with caplog.at_level(logging.WARNING, logger="chords.worker"):
        server = _data_server("tcp://127.0.0.1:1", config, None, False, "cpu")
    server.close()
    assert not [r for r in caplog.records if "INSECURE" in r.getMessage()]
