"""Typed errors and warnings shared by every layer of chords-mq.

Failures are values: each one a caller may want to handle has its own class here, so the broker,
the CLI and the client can tell "your input is wrong" from "something broke".
"""

from __future__ import annotations


class ChordsError(Exception):
    """Base class of every error chords-mq raises on purpose."""


class InvalidInitSequence(ChordsError, ValueError):
    """An init sequence breaks ``0 = i_1 < i_2 < ... < i_K <= N-1`` (or is not integers)."""


class InvalidPlanConfig(ChordsError, ValueError):
    """A plan was built with bad arguments (steps, latent, stop rule, speedup ...)."""


class ModelPathError(ChordsError, ValueError):
    """A worker's ``--model`` (or its registry entry) names nothing it can load: no such folder, a
    file, a folder without ``model_index.json``, a pipeline class no adapter serves, a hub id."""


class SchedulerError(ChordsError, ValueError):
    """A model folder's scheduler is one CHORDS cannot solve with (stochastic, not supported
    yet, or a configuration it cannot set up): said in one line naming the folder and what to
    use instead."""


class InvalidPipelineConfig(ChordsError, ValueError):
    """A ``ChordsPipeline`` was made with bad arguments (devices, cores, dtype)."""


class PipelineError(ChordsError, RuntimeError):
    """A ``ChordsPipeline`` cannot serve a call: its daemons did not start, one of them exited,
    or the pipeline is closed."""


class PipelineStartError(PipelineError):
    """A ``ChordsPipeline``'s broker or worker exited while starting, or the workers did not
    register in time. ``process`` names it (``chords-worker 1 on cuda:1``), ``returncode`` is
    its exit status (None: still running at the deadline), ``log_tail`` its log's last lines."""

    def __init__(
        self, text: str, process: str = "", returncode: int | None = None, log_tail: str = ""
    ) -> None:
        super().__init__(text)
        self.process = process
        self.returncode = returncode
        self.log_tail = log_tail


class PipelineClosed(PipelineError):
    """A ``ChordsPipeline`` was called after ``close()`` (or after its ``with`` block)."""


class PlanProtocolError(ChordsError, RuntimeError):
    """A plan was driven wrongly: unknown or repeated task id, or an output of the wrong shape."""


class ChordsWarning(UserWarning):
    """Base class of chords-mq warnings."""


class DuplicateCoreWarning(ChordsWarning):
    """An init sequence has a gap of 1: that core repeats the slower one and adds no speed."""


class BadResult(PlanProtocolError):
    """A worker's result that failed the broker's checks. ``reason`` is ``non_finite`` (NaN or
    Inf), ``dtype`` (not the request's dtype) or ``malformed`` (wrong targets or shape)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason
