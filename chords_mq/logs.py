"""Log set-up of the daemons: ``--log-level`` and ``--log-format text|json``.

JSON lines carry ``ts`` (ISO 8601, UTC), ``level``, ``daemon``, ``logger`` and ``message`` (and
``exc`` with a traceback's text), one object per line, for log shippers.

Third-party noise shows only at ``--log-level DEBUG``: the progress bars of diffusers,
transformers and huggingface_hub ("Loading pipeline components...", "Fetching N files"), their
warnings (transformers' "... requires torchvision ..."), and Python warnings other than
chords-mq's own (``ChordsWarning``, logged as ``chords.warnings``). Their errors always show.
Their records go through the daemon's handler, in its format, once ``adopt_third_party_logs``
has seen the library imported; the environment set here quiets what logs before that.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

import click

from chords_mq.errors import ChordsWarning

F = TypeVar("F", bound=Callable[..., Any])

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")

# Libraries whose progress bars and warnings a daemon shows only at DEBUG.
THIRD_PARTY = ("diffusers", "transformers", "huggingface_hub")
# Read by those libraries when they are imported: quiet from their first line.
QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
}

_debug: bool | None = None  # set by setup_logging; None: not a daemon, leave the libraries alone
_showwarning = warnings.showwarning


class JsonFormatter(logging.Formatter):
    def __init__(self, daemon: str) -> None:
        super().__init__()
        self.daemon = daemon

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "daemon": self.daemon,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(daemon: str, level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt``; third-party bars and warnings only at DEBUG.

    Call it first thing in a daemon's ``main``, before diffusers or transformers are imported:
    below DEBUG it sets ``QUIET_ENVIRONMENT`` (where the operator has not set those variables)
    for them to read at import."""
    global _debug
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(daemon))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {daemon} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _debug = level.upper() == "DEBUG"
    if not _debug:
        for name, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    warnings.showwarning = _log_warning
    logging.getLogger("py.warnings").setLevel(logging.NOTSET if _debug else logging.ERROR)
    adopt_third_party_logs()


def adopt_third_party_logs(load: bool = False) -> None:
    """Send the logs of diffusers, transformers and huggingface_hub through the daemon's handler
    (not their own), below ERROR only at DEBUG, and turn their progress bars off below DEBUG.

    Acts on the libraries imported by now, and with ``load`` imports their logging modules
    first (call it so before loading a pipeline: diffusers' "Loading pipeline components..."
    bar heeds no environment variable). Does nothing unless ``setup_logging`` ran: a library
    user's logging is theirs."""
    if _debug is None:
        return
    for name in THIRD_PARTY:
        module = sys.modules.get(f"{name}.utils.logging")
        if module is None and load and importlib.util.find_spec(name) is not None:
            module = importlib.import_module(f"{name}.utils.logging")
        if module is None:
            continue
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the library's own, to stderr
                logger.removeHandler(handler)
        logger.propagate = True
        if not _debug:
            logger.setLevel(logging.ERROR)
            disable = getattr(module, "disable_progress_bar", None)
            if disable is not None:
                disable()


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` in a daemon: one log line, as ``chords.warnings`` for chords-mq's
    own warnings (always shown) and ``py.warnings`` for the rest (shown at DEBUG)."""
    if file is not None:  # written to a given stream on purpose
        _showwarning(message, category, filename, lineno, file, line)
        return
    own = issubclass(category, ChordsWarning)
    logger = logging.getLogger("chords.warnings" if own else "py.warnings")
    logger.warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)


def log_options(func: F) -> F:
    """``--log-level`` and ``--log-format``, as every daemon takes them."""
    func = click.option(
        "--log-format",
        type=click.Choice(FORMATS),
        default="text",
        show_default=True,
        help="json: one JSON object per line (ts, level, daemon, logger, message).",
    )(func)
    return click.option(
        "--log-level",
        type=click.Choice(LEVELS, case_sensitive=False),
        default="INFO",
        show_default=True,
    )(func)
