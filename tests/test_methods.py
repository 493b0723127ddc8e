"""The method registry (chords_mq/methods.py): every method is registered, each one refuses
what it refuses with the same words, an unknown one is refused, a request resolves its K and
init sequence once, and each method's hits, working set, stop rule and plan."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

import pytest
import torch

from chords_mq import methods
from chords_mq.algorithms import ChordsPlan, SequentialPlan
from chords_mq.algorithms.paradigms import DEFAULT_TOLERANCE, ParadigmsPlan
from chords_mq.algorithms.srds import SrdsPlan
from chords_mq.apps.bench import BenchConfig, row_label
from chords_mq.apps.requests import build_request
from chords_mq.client import AsyncClient
from chords_mq.methods import REGISTRY, Method, method_for
from chords_mq.request import METHODS, InvalidRequest, RequestSpec
from chords_mq.solvers import grid_euler

NAMES = ("chords", "sequential", "paradigms", "srds", "srds-parareal")
UNKNOWN = f"method must be one of {NAMES}, got "


def spec(method: str, **fields: Any) -> RequestSpec:
    return RequestSpec("digits", method=method, **{"steps": 50, **fields})


# ------------------------------------------------------------------------------- registry


def test_every_method_is_registered_in_order() -> None:
    assert tuple(REGISTRY) == NAMES == METHODS == methods.NAMES
    for name in NAMES:
        rules = method_for(name)
        assert isinstance(rules, Method) and rules.name == name and REGISTRY[name] is rules
        assert spec(name).rules is rules
    assert len({type(rules) for rules in REGISTRY.values()}) == len(NAMES)


@pytest.mark.parametrize("name", ["bogus", "CHORDS", "", 5, None, ["chords"]])
def test_an_unknown_method_is_refused(name: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        method_for(name)
    assert str(caught.value) == UNKNOWN + repr(name)
    with pytest.raises(InvalidRequest) as caught:
        RequestSpec("digits", method=name)
    assert str(caught.value) == UNKNOWN + repr(name)
    with pytest.raises(InvalidRequest, match="must be one of"):
        RequestSpec.from_dict({"model": "digits", "method": name})


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("method", "fields", "message"),
    [
        ("sequential", {"cores": 2}, "method 'sequential' takes no cores, init sequence or stop"),
        ("sequential", {"init_sequence": (0,)}, "method 'sequential' takes no cores, init"),
        ("sequential", {"stop": "core-index:1"}, "method 'sequential' takes no cores, init"),
        ("sequential", {"tolerance": 0.1}, "tolerance applies to method 'paradigms' only"),
        ("chords", {"tolerance": 0.1}, "tolerance applies to method 'paradigms' only"),
        ("srds", {"tolerance": 0.1}, "tolerance applies to method 'paradigms' only"),
        ("chords", {"iterations": 2}, "iterations applies to method 'srds-parareal' only"),
        ("paradigms", {"iterations": 2}, "iterations applies to method 'srds-parareal' only"),
        ("chords", {"cores": 0}, "cores must be an integer in 1..256, got 0"),
        ("chords", {"cores": 257}, "cores must be an integer in 1..256, got 257"),
        ("chords", {"cores": 3, "init_sequence": (0, 5)}, "cores=3 but the init sequence has 2"),
        ("chords", {"init_sequence": (5, 9)}, "the init sequence must start at step 0"),
        ("chords", {"stop": "bad"}, "bad stop rule 'bad'"),
        ("paradigms", {"init_sequence": (0, 5)}, "method 'paradigms' takes no init sequence"),
        ("paradigms", {"stop": "core-index:1"}, "method 'paradigms' stops by its tolerance"),
        ("paradigms", {"tolerance": -1.0}, "tolerance must be a finite number >= 0, got -1.0"),
        ("paradigms", {"tolerance": True}, "tolerance must be a number, got True"),
        ("paradigms", {"cores": "3"}, "cores must be an integer in 1..256, got '3'"),
        ("srds", {"init_sequence": (0, 5)}, "method 'srds' makes its own init sequence"),
        ("srds", {"cores": 9}, r"SRDS with 9 cores needs \(K-1\) \* floor\(sqrt\(N\)\) < N"),
        ("srds-parareal", {"init_sequence": (0, 5)}, "method 'srds-parareal' takes no init"),
        ("srds-parareal", {"iterations": 8}, r"iterations must be in 1..7 \(B = floor"),
        ("srds-parareal", {"iterations": 0}, "iterations must be an integer >= 1, got 0"),
        ("srds-parareal", {"steps": 1001}, "method 'srds-parareal' supports at most 1000"),
    ],
)
def test_each_method_refuses_what_it_refuses(method: str, fields: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=f"^{message}"):
        spec(method, **fields)


# a value of each optional field that every method taking it accepts (N = 50)
TAKEN = {
    "takes_cores": {"cores": 2},
    "takes_init_sequence": {"init_sequence": (0, 10)},
    "takes_stop": {"stop": "core-index:1"},
    "takes_tolerance": {"tolerance": 0.2},
    "takes_iterations": {"iterations": 2},
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("flag", sorted(TAKEN))
def test_what_a_method_says_it_takes_is_what_it_accepts(name: str, flag: str) -> None:
    if getattr(method_for(name), flag):
        spec(name, **TAKEN[flag])
    else:
        with pytest.raises(InvalidRequest):
            spec(name, **TAKEN[flag])


# ------------------------------------------------------------------------------- resolution


def test_cores_and_init_sequence_are_resolved_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = Method.requested_cores

    def counted(request: RequestSpec) -> int:
        calls.append(request.method)
        return original(request)

    monkeypatch.setattr(Method, "requested_cores", staticmethod(counted))
    x0 = torch.zeros(1, 1, 4, 4)
    solver = grid_euler(torch.linspace(1.0, 0.0, 51))
    for name in ("chords", "paradigms", "srds", "srds-parareal"):
        calls.clear()
        request = spec(name, cores=4)
        assert calls == [name]
        for _ in range(5):  # what the broker asks of one SUBMIT, and more
            request.resolved_cores()
            request.resolved_init_sequence()
            request.expected_hit_rounds()
            request.working_set_latents()
            request.build_plan(x0, solver)
        assert calls == [name]
    # a copy per call: the caller may keep or change it, the request's stays
    request = spec("chords", cores=4)
    first = request.resolved_init_sequence()
    assert first is not None and first is not request.resolved_init_sequence()
    first.append(49)
    assert request.resolved_init_sequence() == first[:-1]


def test_resolved_cores_and_init_sequence() -> None:
    assert spec("sequential").resolved_cores() == 1
    assert spec("sequential").resolved_init_sequence() is None
    assert spec("chords").resolved_cores() == methods.DEFAULT_CORES == 4
    assert spec("chords", init_sequence=[0, 8, 16, 32]).resolved_cores() == 4
    assert spec("chords", init_sequence=(0, 8, 16, 32)).resolved_init_sequence() == [0, 8, 16, 32]
    assert spec("srds", cores=4).resolved_init_sequence() == [0, 7, 14, 21]
    assert spec("paradigms", cores=6).resolved_cores() == 6
    assert spec("paradigms", cores=6).resolved_init_sequence() is None
    assert spec("srds-parareal", cores=8).resolved_init_sequence() is None


def test_to_dict_and_from_dict_know_only_the_request_fields() -> None:
    request = spec("chords", cores=4)
    assert set(request.to_dict()) == {f.name for f in fields(RequestSpec) if f.init} - {
        "exact_cores"
    }
    assert RequestSpec.from_dict(request.to_dict()) == request
    with pytest.raises(InvalidRequest, match=r"unknown request fields \['_cores'\]"):
        RequestSpec.from_dict({**request.to_dict(), "_cores": 2})
    assert ", _cores=" not in repr(request) and "_init_sequence" not in repr(request)


# ------------------------------------------------------------------------------- per method


def test_expected_hit_rounds_per_method() -> None:
    # CHORDS: core k (1-based) of init sequence i hits at round N - i_k + k - 1, the 0th at K
    n, sequence = 50, [0, 8, 16, 32]
    closed_form = [(k, n - i + k - 1) for k, i in enumerate(sequence, start=1)]
    chords = spec("chords", init_sequence=tuple(sequence))
    assert closed_form == [(1, 50), (2, 43), (3, 36), (4, 21)]
    assert chords.expected_hit_rounds() == [(0, 4), (4, 21), (3, 36), (2, 43), (1, 50)]
    # srds: the same schedule on [0, B, 2B, 3B], B = floor(sqrt(50)) = 7
    srds = spec("srds", cores=4)
    assert srds.expected_hit_rounds() == [(0, 4), (4, 32), (3, 38), (2, 44), (1, 50)]
    assert spec("sequential").expected_hit_rounds() == [(1, 50)]
    assert spec("paradigms", cores=4).expected_hit_rounds() == []  # data-dependent
    parareal = spec("srds-parareal", cores=8, iterations=3)
    assert parareal.expected_hit_rounds() == [(0, 7), (1, 14), (2, 20), (3, 26)]


def test_working_set_per_method() -> None:
    assert spec("sequential").working_set_latents() == 3
    assert spec("chords", cores=4).working_set_latents() == 4 * 4 + 2
    assert spec("srds", cores=4).working_set_latents() == 4 * 4 + 2
    assert spec("paradigms", cores=6).working_set_latents() == 4 * 6 + 3
    assert spec("srds-parareal", cores=8).working_set_latents() == 2 * 7 + 2 * 8 + 2


def test_stop_rules_per_method() -> None:
    assert spec("chords").resolved_stop() is None
    assert spec("chords", stop="core-index:2").resolved_stop() == "core-index:2"
    assert spec("srds").resolved_stop() == methods.SRDS_DEFAULT_STOP == "residual-cores:4e-4"
    assert spec("srds", stop="none").resolved_stop() == "none"
    assert spec("srds-parareal").resolved_stop() == "residual:4e-4"
    assert spec("sequential").resolved_stop() is None
    assert spec("paradigms").resolved_stop() is None


def test_build_plan_per_method() -> None:
    x0 = torch.zeros(1, 1, 4, 4)
    solver = grid_euler(torch.linspace(1.0, 0.0, 51))
    assert type(spec("sequential").build_plan(x0, solver)) is SequentialPlan
    chords = spec("chords", init_sequence=(0, 8, 16, 32)).build_plan(x0, solver)
    assert isinstance(chords, ChordsPlan) and chords.init_sequence == (0, 8, 16, 32)
    srds = spec("srds", cores=4).build_plan(x0, solver)
    assert isinstance(srds, ChordsPlan) and srds.init_sequence == (0, 7, 14, 21)
    paradigms = spec("paradigms", cores=6).build_plan(x0, solver)
    assert isinstance(paradigms, ParadigmsPlan) and paradigms.window == 6
    assert paradigms.tolerance == DEFAULT_TOLERANCE
    assert isinstance(spec("srds-parareal", cores=8).build_plan(x0, solver), SrdsPlan)


def test_only_chords_is_granted_fewer_cores() -> None:
    assert [name for name in NAMES if method_for(name).grants_fewer_cores] == ["chords"]
    assert spec("chords", cores=8).granted(4).resolved_cores() == 4
    for name in ("srds", "paradigms", "srds-parareal"):
        request = spec(name, cores=8)
        assert request.granted(4) is request


# ------------------------------------------------------------------------------- callers


def test_the_bench_asks_the_methods() -> None:
    config = BenchConfig(model="digits", methods=NAMES, cores=(4,), tolerances=(0.05, None))
    assert config.request("sequential", 4, None, 0).cores is None
    assert config.request("chords", 4, None, 0).stop == config.chords_stop
    assert config.request("srds", 4, None, 0).stop is None  # its own default
    assert config.request("paradigms", 4, None, 0, 0.05).tolerance == 0.05
    assert config.request("chords", 4, None, 0, 0.05).tolerance is None
    assert config.variants() == [
        ("paradigms", 4, 0.05),
        ("paradigms", 4, None),
        ("srds", 4, None),
        ("srds-parareal", 4, None),
        ("chords", 4, None),
    ]
    assert row_label({"method": "paradigms", "tolerance": 0.05}) == "ParaDIGMS (tau=0.05)"
    assert row_label({"method": "srds"}) == "SRDS (pipelined)"
    assert row_label({"method": "from-the-future"}) == "from-the-future"


def test_the_run_command_gives_chords_four_cores() -> None:
    assert {name: method_for(name).cli_default_cores for name in NAMES} == {
        "chords": 4,
        "sequential": None,
        "paradigms": None,
        "srds": None,
        "srds-parareal": None,
    }


def test_generate_and_the_cli_name_every_request_field() -> None:
    """The request's fields are spelt out in ``AsyncClient.generate`` (its public keywords) and
    in ``build_request``: a field added to ``RequestSpec`` must reach both, with its default."""
    spec_fields = {f.name: f for f in fields(RequestSpec) if f.init}
    client_only = {"self", "model", "timeout", "request_id", "on_progress", "wait_for_worker"}
    generate = inspect.signature(AsyncClient.generate).parameters
    assert set(generate) - client_only == set(spec_fields) - {"model"}
    for name, parameter in generate.items():
        if name in client_only or name in ("params", "init_sequence"):
            continue
        assert parameter.default == spec_fields[name].default, name
    renamed = {"init_text": "init_sequence", "stop_text": "stop", "param_values": "params"}
    cli = {renamed.get(name, name) for name in inspect.signature(build_request).parameters}
    assert cli == set(spec_fields)
