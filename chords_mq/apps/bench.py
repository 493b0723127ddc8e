"""``chords bench``: the CHORDS paper's comparison (its Tables 1 and 2), run through the engine.

Every request goes through a real broker and real worker processes, one request at a time, each
on an idle pool (forwards a previous request left in flight finish first), so wall-clock times
are clean. For each prompt and seed, the sequential baseline runs first, then
every (K, method) pair; rows average over all prompts and seeds:

* ``round`` / ``round_speedup``: the round after which the returned sample exists, as the plan
  counts it (one network evaluation per worker per round), and ``N / mean(round)``;
* ``wall_speedup``: mean sequential wall time over the method's mean wall time, both measured by
  the client from submission to the last message, on the same pool in the same session (so they
  include prompt encoding, PREPARE and, with media output, decoding);
* ``evaluations``: network evaluations the broker accepted (the compute cost);
* ``latent_rmse``: ``sqrt(mean((x - x_seq)^2))`` of the returned latent against the sequential
  one of the same prompt and seed, averaged;
* ``quality``: for the digits demo model, the percentage of samples the digit classifier
  (``chords_mq.workers.models.digits_metrics``) reads as the requested digit; with
  ``--clip PATH``, the CLIP score ``100 * max(cos(image, text), 0)`` from a local CLIP model;
  otherwise absent.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chords_mq.algorithms.paradigms import DEFAULT_TOLERANCE
from chords_mq.client import AsyncClient
from chords_mq.errors import ChordsError
from chords_mq.methods import REGISTRY, method_for
from chords_mq.request import METHODS, RequestSpec

DEFAULT_METHODS = ("sequential", "chords", "srds", "paradigms")
# The order rows appear in within one K, as in the paper's tables: baselines, then CHORDS.
ROW_ORDER = ("paradigms", "srds", "srds-parareal", "chords")
DIGIT_PROMPTS = tuple(f"a handwritten {d}" for d in range(10))


class BenchError(ChordsError):
    """A benchmark that cannot run as configured."""


@dataclass(frozen=True)
class BenchConfig:
    model: str
    methods: tuple[str, ...] = DEFAULT_METHODS
    cores: tuple[int, ...] = (4, 6, 8)
    steps: int = 50
    prompts: tuple[str | None, ...] = (None,)
    seeds: tuple[int, ...] = (0,)
    tolerances: tuple[float | None, ...] = (None,)  # paradigms; None: the plan's default
    chords_stop: str = "core-index:1"  # the paper's setting: return the fastest core
    params: dict[str, Any] = field(default_factory=dict)
    clip: str | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise BenchError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if "sequential" not in self.methods:
            raise BenchError("the methods must include sequential: it is every row's reference")
        if not self.cores or any(k < 1 for k in self.cores):
            raise BenchError("cores must be a non-empty list of integers >= 1")
        if not self.seeds or not self.prompts:
            raise BenchError("at least one prompt and one seed are needed")

    def request(
        self,
        method: str,
        cores: int | None,
        prompt: str | None,
        seed: int,
        tolerance: float | None = None,
    ) -> RequestSpec:
        params = dict(self.params)
        if prompt is not None:
            params["prompt"] = prompt
        rules = method_for(method)
        # chords_stop goes to the methods that take a stop rule and have none of their own
        picks_stop = rules.takes_stop and rules.default_stop is None
        return RequestSpec(
            model=self.model,
            method=method,
            steps=self.steps,
            cores=cores if rules.takes_cores else None,
            stop=self.chords_stop if picks_stop else None,
            seed=seed,
            params=params,
            output="both" if self.clip else "latent",
            tolerance=tolerance if rules.takes_tolerance else None,
        )

    def variants(self) -> list[tuple[str, int, float | None]]:
        """Every (method, K, tolerance) the bench runs besides sequential, in table order."""
        out: list[tuple[str, int, float | None]] = []
        for cores in self.cores:
            for name in ROW_ORDER:
                if name not in self.methods:
                    continue
                tolerances = self.tolerances if method_for(name).takes_tolerance else (None,)
                out.extend((name, cores, tolerance) for tolerance in tolerances)
        return out


@dataclass
class Sample:
    """One request's measurements (its latent and media are kept only for scoring)."""

    method: str
    cores: int
    tolerance: float | None
    prompt: str | None
    seed: int
    round: int
    returned_core: int
    evaluations: int
    wall_s: float
    latent: torch.Tensor
    media: torch.Tensor | None = None
    rmse: float = 0.0

    def record(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "cores": self.cores,
            "tolerance": self.tolerance,
            "prompt": self.prompt,
            "seed": self.seed,
            "round": self.round,
            "returned_core": self.returned_core,
            "evaluations": self.evaluations,
            "wall_s": round(self.wall_s, 6),
            "latent_rmse": self.rmse,
        }


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """``"4,6,8"`` or a range ``"0-9"`` (or a mix: ``"0-4,10"``)."""
    values: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            low, sep, high = part.partition("-")
            if sep:
                values.extend(range(int(low), int(high) + 1))
            else:
                values.append(int(part))
    except ValueError:
        raise BenchError(f"{what}: expected numbers like 4,6,8 or 0-9, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise BenchError(f"{what}: expected numbers >= 0 like 4,6,8 or 0-9, got {text!r}")
    return tuple(dict.fromkeys(values))


def parse_tolerances(text: str) -> tuple[float, ...]:
    """ParaDIGMS tolerances ``"0.1,0.02"``: finite numbers >= 0."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BenchError(f"--tolerance: expected numbers, got {text!r}") from None
    if not values or any(not (0 <= t < float("inf")) for t in values):
        raise BenchError(f"--tolerance: expected numbers >= 0, got {text!r}")
    return tuple(values)


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """One prompt per line; blank lines and lines starting with # are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BenchError(f"cannot read prompts file {path}: {exc.strerror}") from None
    prompts = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    if not prompts:
        raise BenchError(f"prompts file {path} has no prompts")
    return prompts


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((x.double() - ref.double()) ** 2)))


class DigitQuality:
    """Digit classifier accuracy in percent (the demo model's stand-in for CLIP score)."""

    name = "digit accuracy %"

    def __init__(self) -> None:
        try:
            import sklearn  # noqa: F401  (the classifier behind the metric)
        except ImportError:
            raise BenchError(
                "the digits quality metric needs scikit-learn, which is not installed: "
                "pip install 'chords-mq[bench]'"
            ) from None
        from chords_mq.workers.models.digits_metrics import DigitScorer

        self._scorer = DigitScorer()

    def __call__(self, samples: Sequence[Sample]) -> float:
        from chords_mq.workers.models.digits import digit_of
        from chords_mq.workers.models.digits_metrics import to_pixels

        latents = torch.cat([s.latent.reshape(1, 1, 8, 8) for s in samples])
        wanted = [digit_of(s.prompt or "") for s in samples]
        predicted = self._scorer.classifier.predict(to_pixels(latents))
        return (
            100.0 * sum(int(p == w) for p, w in zip(predicted, wanted, strict=True)) / len(samples)
        )


def _projected(features: Any) -> torch.Tensor:
    """CLIP's projected features: transformers 4.x returns them, 5.x a ModelOutput holding them."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class ClipQuality:
    """CLIP score ``100 * max(cos(image, text), 0)`` with a CLIP model from a local folder."""

    name = "CLIP score"

    def __init__(self, path: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(path)
            self.model.eval()  # type: ignore[no-untyped-call]
            self.processor = CLIPProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise BenchError(f"cannot load a CLIP model from {path}: {exc}") from None

    @torch.no_grad()
    def __call__(self, samples: Sequence[Sample]) -> float:
        scores = []
        for sample in samples:
            media = sample.media
            if media is None or sample.prompt is None:
                raise BenchError("CLIP score needs decoded images and prompts")
            image = media[0] if media.dim() == 4 else media  # first frame of a video
            if image.dim() == 2:
                image = image[..., None].expand(*image.shape, 3)
            inputs = self.processor(
                text=[sample.prompt],
                images=[image.numpy()],
                return_tensors="pt",
                padding=True,
                truncation=True,  # CLIP reads at most 77 tokens
            )
            image_emb = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            text_emb = self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
            cos = torch.nn.functional.cosine_similarity(
                _projected(image_emb), _projected(text_emb)
            ).item()
            scores.append(100.0 * max(cos, 0.0))
        return statistics.fmean(scores)


def quality_scorer(config: BenchConfig) -> Callable[[Sequence[Sample]], float] | None:
    if config.clip:
        return ClipQuality(config.clip)
    if config.model.startswith("digits"):
        return DigitQuality()
    return None


async def wait_until_idle(client: AsyncClient, limit_s: float = 60.0) -> None:
    """Wait until no worker is busy. A request that stops early (CHORDS' fastest core, a
    residual stop) leaves forwards in flight; the next timed request must not wait for them."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = await client.status()
        if not status.get("sessions") and not any(w.get("busy") for w in status["workers"]):
            return
        await asyncio.sleep(0.005)
    raise BenchError(f"the worker pool did not go idle within {limit_s:g}s")


async def run_one(
    client: AsyncClient, spec: RequestSpec, timeout: float | None
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor | None, float]:
    """Run one request on an idle pool; returns its stats, the returned latent (and media)
    and its wall time."""
    await wait_until_idle(client)
    started = time.perf_counter()
    stream = client.submit(spec, timeout=timeout)
    hits = {hit.core: hit async for hit in stream}
    wall = time.perf_counter() - started
    stats = stream.stats or {}
    returned = stats.get("returned")
    if not returned or returned["core"] not in hits:
        raise BenchError(f"request {stream.id} finished without a returned hit: {stats}")
    hit = hits[returned["core"]]
    if hit.latent is None:  # pragma: no cover - the bench always asks for latents
        raise BenchError("the returned hit has no latent")
    return stats, hit.latent, hit.media, wall


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads (libzmq's I/O thread included), in nanosecond
    resolution: the sum of each thread's run time in /proc/PID/task/*/schedstat (Linux).
    (/proc/PID/stat counts clock ticks of 10 ms, too coarse for a short request.)"""
    from pathlib import Path

    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # a thread that just ended
            continue
    return total / 1e9


def machine_info(status: dict[str, Any] | None = None) -> dict[str, Any]:
    import diffusers
    import zmq

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "pyzmq": zmq.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if status is not None:
        devices = sorted({str(w.get("device")) for w in status.get("workers", [])})
        info["workers"] = len(status.get("workers", []))
        info["worker_devices"] = devices
    return info


async def run_bench(
    address: str,
    config: BenchConfig,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run every request of the benchmark against the broker at ``address``."""
    variants = config.variants()
    pairs = [(p, s) for p in config.prompts for s in config.seeds]
    total = len(pairs) * (1 + len(variants))
    samples: list[Sample] = []
    done = 0
    async with AsyncClient(address) as client:
        status = await client.status()
        # Warm every worker up (first-forward costs) before anything is timed.
        warm = config.request("chords", max(config.cores), config.prompts[0], config.seeds[0])
        await run_one(client, warm, config.timeout)

        async def measure(
            method: str, cores: int | None, prompt: str | None, seed: int, tolerance: float | None
        ) -> Sample:
            spec = config.request(method, cores, prompt, seed, tolerance)
            stats, latent, media, wall = await run_one(client, spec, config.timeout)
            returned = stats["returned"]
            return Sample(
                method,
                cores or 1,
                tolerance,
                prompt,
                seed,
                returned["round"],
                returned["core"],
                stats["evaluations"],
                wall,
                latent,
                media,
            )

        for prompt, seed in pairs:
            reference = await measure("sequential", None, prompt, seed, None)
            samples.append(reference)
            done += 1
            log(f"[{done}/{total}] sequential seed {seed} {prompt or ''}: {reference.wall_s:.3f}s")
            for method, cores, tolerance in variants:
                sample = await measure(method, cores, prompt, seed, tolerance)
                sample.rmse = rmse(sample.latent, reference.latent)
                samples.append(sample)
                done += 1
                log(
                    f"[{done}/{total}] {method} K={cores} seed {seed} {prompt or ''}: round "
                    f"{sample.round}, {sample.evaluations} evaluations, {sample.wall_s:.3f}s"
                )
    return {"status": status, "samples": samples}


def summarize(
    config: BenchConfig,
    samples: Sequence[Sample],
    scorer: Callable[[Sequence[Sample]], float] | None,
) -> list[dict[str, Any]]:
    """One row per (method, K, tolerance), averaged over prompts and seeds."""
    groups: dict[tuple[str, int, float | None], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.method, sample.cores, sample.tolerance), []).append(sample)
    sequential = groups[("sequential", 1, None)]
    seq_wall = statistics.fmean(s.wall_s for s in sequential)
    rows = []
    for key in [("sequential", 1, None), *config.variants()]:
        method, cores, tolerance = key
        group = groups[key]
        mean_round = statistics.fmean(s.round for s in group)
        wall = statistics.fmean(s.wall_s for s in group)
        row: dict[str, Any] = {
            "method": method,
            "cores": cores,
            "steps": config.steps,
            "round": round(mean_round, 3),
            "round_speedup": round(config.steps / mean_round, 3),
            "wall_speedup": round(seq_wall / wall, 3),
            "wall_s": round(wall, 4),
            "evaluations": round(statistics.fmean(s.evaluations for s in group), 2),
            "latent_rmse": round(statistics.fmean(s.rmse for s in group), 6),
            "quality": None if scorer is None else round(scorer(group), 2),
            "samples": len(group),
        }
        rules = method_for(method)
        if rules.takes_tolerance:
            row["tolerance"] = rules.default_tolerance if tolerance is None else tolerance
        if rules.takes_cores:  # the rows with a K also say how they stop
            row["stop"] = config.request(method, cores, None, 0, tolerance).resolved_stop()
        rows.append(row)
    return rows


def row_label(row: dict[str, Any]) -> str:
    """The row's method as the table and the plot name it (ParaDIGMS with its tolerance)."""
    rules = REGISTRY.get(row["method"])
    if rules is None:  # a row from another version's output
        return str(row["method"])
    label = rules.label
    if rules.takes_tolerance:
        label += f" (tau={row['tolerance']:g})"
    return label


def markdown(result: dict[str, Any]) -> str:
    config, machine = result["config"], result["machine"]
    quality = result.get("quality_metric") or "quality"
    lines = [
        f"# chords bench: {config['model']}, N={config['steps']}",
        "",
        f"{len(config['prompts'])} prompt(s) x {len(config['seeds'])} seed(s) per row; "
        f"{result['date']}; {machine['platform']}, {machine['cpus']} CPUs, "
        f"torch {machine['torch']}, GPU: {machine['gpu'] or 'none'}; "
        f"workers: {machine.get('workers')} on {', '.join(machine.get('worker_devices', []))}.",
        "",
        f"| Method | K | Rounds | Round speedup | Wall speedup | NFE | Latent RMSE | {quality} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        q = "-" if row["quality"] is None else f"{row['quality']:.1f}"
        k = "1" if row["method"] == "sequential" else str(row["cores"])
        lines.append(
            f"| {row_label(row)} | {k} | {row['round']:g} | {row['round_speedup']:.2f}x | "
            f"{row['wall_speedup']:.2f}x | {row['evaluations']:g} | "
            f"{row['latent_rmse']:.4f} | {q} |"
        )
    lines += [
        "",
        "Rounds: the round after which the returned sample exists (one network evaluation per "
        "worker per round); round speedup = N / mean rounds. Wall speedup: mean sequential wall "
        "time over the method's, same pool, same session. NFE: network evaluations accepted by "
        "the broker. Latent RMSE against the sequential sample of the same prompt and seed.",
        "",
    ]
    return "\n".join(lines)


def bench_result(
    config: BenchConfig, run: dict[str, Any], scorer: Callable[[Sequence[Sample]], float] | None
) -> dict[str, Any]:
    samples: list[Sample] = run["samples"]
    rows = summarize(config, samples, scorer)
    return {
        "rows": rows,
        "machine": machine_info(run["status"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["chords", *sys.argv[1:]]) if sys.argv else None,
        "quality_metric": None if scorer is None else getattr(scorer, "name", "quality"),
        "config": {
            "model": config.model,
            "methods": list(config.methods),
            "cores": list(config.cores),
            "steps": config.steps,
            "prompts": list(config.prompts),
            "seeds": list(config.seeds),
            "tolerances": [DEFAULT_TOLERANCE if t is None else t for t in config.tolerances],
            "chords_stop": config.chords_stop,
            "params": config.params,
        },
        "samples": [s.record() for s in samples],
    }


def write_results(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    (out / "bench.md").write_text(markdown(result))


def check_finite(rows: Sequence[dict[str, Any]]) -> None:
    for row in rows:
        for key in ("round_speedup", "wall_speedup", "latent_rmse"):
            if not math.isfinite(row[key]):
                raise BenchError(f"{row['method']} K={row['cores']}: {key} is {row[key]}")


def run_bench_sync(address: str, config: BenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    scorer = quality_scorer(config)  # load it first: a bad --clip path fails before any request
    run = asyncio.run(run_bench(address, config, log))
    result = bench_result(config, run, scorer)
    check_finite(result["rows"])
    return result


# -- process observations (the benchmarks read the broker's memory) -----------------------------


def status_bytes(pid: int, field: str) -> int | None:
    """A ``/proc/PID/status`` size field in bytes; None once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak(pid: int) -> bool:
    """VmHWM := VmRSS (``clear_refs`` 5), so VmHWM is the peak from now on."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Samples a process's VmRSS on a thread every ``interval`` seconds; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = status_bytes(self.pid, "VmRSS")
            if rss is None:
                return
            self.peak = max(self.peak, rss)
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_bounded(make: Callable[[], Coroutine[Any, Any, None]], timeout: float) -> bool:
    """Run ``make()`` on its own event loop in a daemon thread for at most ``timeout`` seconds.

    False if it did not finish: the thread is then left behind. The client's blocking sends
    (a CANCEL on leaving a stream, a heartbeat) wait forever on a broker that is gone, and
    cancelling a task waits for its ``finally``; only a thread bounds that. The coroutine
    keeps its results in containers the caller passed in, so what it measured survives.
    """
    failures: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(make())
        except BaseException as exc:  # reported below, in the caller's thread
            failures.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if failures:
        raise failures[0]
    return not thread.is_alive()
