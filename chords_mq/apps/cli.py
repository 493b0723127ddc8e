"""``chords``: the command-line front end (its parts: ``options``, ``requests``, ``streaming``,
``plan_report``).

``plan`` prints a CHORDS schedule by driving the real plan in-process on a toy ODE. ``generate``
streams a request's hits from a running broker and saves them; ``status`` shows the broker's
workers and requests; ``run`` starts a local broker and workers, runs one request, prints a
per-hit table and shuts everything down.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from chords_mq import __version__
from chords_mq.algorithms import ChordsPlan, init_sequence, parse_stop
from chords_mq.algorithms.init_sequence import default_speedup
from chords_mq.apps.options import (
    broker_option,
    curve_options,
    parse_init,
    parse_params,
    request_options,
)
from chords_mq.apps.plan_report import plan_report, render_report
from chords_mq.apps.requests import broker_keys, build_request, reachable, run_engine
from chords_mq.errors import ChordsError
from chords_mq.local import ToyODE, simulate
from chords_mq.methods import method_for
from chords_mq.options import ENDPOINT
from chords_mq.request import METHODS as METHOD_CHOICES
from chords_mq.solvers import grid_euler

if TYPE_CHECKING:
    from chords_mq.client import ClientHit


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chords")
def main() -> None:
    """chords-mq: parallel-in-time diffusion sampling (CHORDS) over ZeroMQ."""


@main.command()
@click.option(
    "--steps",
    "-n",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Number of diffusion steps N.",
)
@click.option(
    "--cores",
    "-k",
    type=click.IntRange(min=1),
    default=None,
    help="Number of cores K (default 8, or the length of --init).",
)
@click.option(
    "--init",
    "init_text",
    default=None,
    metavar="I1,I2,...",
    help="Explicit init sequence, e.g. 0,2,4,8,16,24,32,40 (default: Theorem 2.5 rule).",
)
@click.option(
    "--speedup",
    "-s",
    type=float,
    default=None,
    help="Target speedup s of the Theorem 2.5 rule (default: the paper's for K).",
)
@click.option(
    "--stop",
    "stop_text",
    default="none",
    show_default=True,
    metavar="none|core-index:M|residual:TAU|residual-cores:TAU",
    help="Stop rule. residual is evaluated on a built-in 64-dim toy ODE.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw the schedule (step against round, one line per core) as a PNG.",
)
def plan(
    steps: int,
    cores: int | None,
    init_text: str | None,
    speedup: float | None,
    stop_text: str,
    as_json: bool,
    plot_path: str | None,
) -> None:
    """Show the CHORDS schedule: hits, their rounds and speedups, and who runs what each round."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if init_text is not None:
                if speedup is not None:
                    raise click.UsageError("--init and --speedup exclude each other")
                sequence = init_sequence(parse_init(init_text), steps)
                if cores is not None and cores != len(sequence):
                    raise click.UsageError(
                        f"--cores {cores} but --init has {len(sequence)} entries"
                    )
            else:
                cores = 8 if cores is None else cores
                sequence = init_sequence(cores, steps, speedup)
            stop = parse_stop(stop_text)
        except ChordsError as exc:
            raise click.UsageError(str(exc)) from None
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)

    toy = ToyODE(steps)
    grid = grid_euler([i / steps for i in range(steps + 1)])
    the_plan = ChordsPlan(toy.x0, steps, sequence, stop=stop)
    result = simulate(the_plan, toy.velocity, grid)
    rule_speedup = None if init_text is not None else speedup or default_speedup(len(sequence))
    report = plan_report(steps, sequence, rule_speedup, str(stop or "none"), the_plan, result)
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(render_report(report))
    if plot_path is not None:
        from chords_mq.media import plot_schedule

        plot_schedule(report, plot_path)
        click.echo(f"wrote {plot_path}", err=True)


# -- engine commands ------------------------------------------------------------------------------


@main.command()
@broker_option
@request_options
@curve_options
@click.option(
    "--batch",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="Tasks per forward; >1 trades bitwise reproducibility for throughput.",
)
@click.option("--prompt", default=None, help="Text prompt (pipelines, digits).")
@click.option("--negative-prompt", default=None, help="Negative prompt (CFG pipelines).")
@click.option("--height", type=click.IntRange(min=1), default=None, help="Image/video height.")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Image/video width.")
@click.option("--frames", type=click.IntRange(min=1), default=None, help="Video frames.")
@click.option("--guidance-scale", type=float, default=None, help="Guidance scale.")
@click.option(
    "--output",
    "output",
    type=click.Choice(["latent", "media", "both"]),
    default="latent",
    show_default=True,
    help="What each hit carries: the latent, decoded media from a worker, or both.",
)
@click.option(
    "--wait-for-worker",
    type=click.FloatRange(min=0, max=86400),
    default=None,
    metavar="SECONDS",
    help="Wait this long for a worker of --model to register (default: fail at once, "
    "naming the models the broker serves).",
)
@click.option(
    "--exact-cores",
    is_flag=True,
    help="Insist on --cores: a broker under load (--cores-policy adaptive) otherwise may "
    "grant fewer; the output says how many it granted.",
)
def generate(
    broker: str,
    model: str,
    method: str,
    cores: int | None,
    tolerance: float | None,
    iterations: int | None,
    steps: int,
    init_text: str | None,
    stop_text: str | None,
    seed: int,
    param_values: tuple[str, ...],
    out_dir: str | None,
    timeout: float | None,
    curve_secret: str | None,
    broker_key: str | None,
    batch: int,
    prompt: str | None,
    negative_prompt: str | None,
    height: int | None,
    width: int | None,
    frames: int | None,
    guidance_scale: float | None,
    output: str,
    wait_for_worker: float | None,
    exact_cores: bool,
) -> None:
    """Submit one request to a running broker and stream its hits as they arrive.

    A hit's latent is saved in the model's own layout (for pipelines: what
    ``pipe(..., output_type="latent")`` returns, packed for Flux).
    """
    named = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "height": height,
        "width": width,
        "num_frames": frames,
        "guidance_scale": guidance_scale,
    }
    given = tuple(f"{key}={json.dumps(value)}" for key, value in named.items() if value is not None)
    spec = build_request(
        model,
        method,
        cores,
        steps,
        init_text,
        stop_text,
        seed,
        param_values + given,
        batch,
        output,
        tolerance,
        iterations,
        exact_cores,
    )
    from chords_mq.apps.streaming import HitLines, save_hit, stream_request, write_summary

    keys = broker_keys(curve_secret, broker_key)
    reachable(broker, timeout)
    lines = HitLines()

    def on_hit(hit: ClientHit, row: dict[str, Any]) -> None:
        lines.hit(row)
        if out_dir is not None:
            save_hit(out_dir, hit.core, hit.latent, hit.media)

    try:
        summary = run_engine(
            stream_request(
                broker,
                spec,
                timeout,
                on_hit,
                lines.progress,
                keys=keys,
                wait_for_worker=wait_for_worker,
            )
        )
    finally:
        lines.close()
    if out_dir is not None:
        write_summary(out_dir, summary)
    granted = {key: summary[key] for key in ("cores", "requested_cores")}
    click.echo(json.dumps({**granted, "hits": summary["hits"], "stats": summary["stats"]}))


@main.command()
@broker_option
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@curve_options
def status(
    broker: str, timeout: float, as_json: bool, curve_secret: str | None, broker_key: str | None
) -> None:
    """Show the broker's workers and your running requests (an admin key: everyone's)."""
    from chords_mq.client import AsyncClient

    keys = broker_keys(curve_secret, broker_key)
    reachable(broker, timeout)

    async def ask() -> dict[str, Any]:
        async with AsyncClient(broker, **keys) as client:
            return await client.status(timeout)

    report = run_engine(ask())
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"broker {broker} (epoch {report['epoch']})")
    click.echo(f"workers: {len(report['workers'])}")
    for w in report["workers"]:
        state = w.get("state", "busy" if w["busy"] else "ready")
        speeds = "".join(f"  {k}: {ms:.1f} ms" for k, ms in w.get("expected_ms", {}).items())
        solver = f"  solver: {w['solver']}" if w.get("solver") else ""
        data = f"  data: {w['data']}" if w.get("data") else ""  # an admin's view only
        click.echo(
            f"  {w['name']:<40} {w['model']:<12} {w['device']:<8} {state:<11} "
            f"done {w['completed']}{speeds}{solver}{data}"
        )
    if report.get("role") == "admin":
        click.echo(f"requests: {len(report['sessions'])} (every client's: an admin key)")
    else:  # without CURVE every connection is its own client, so this is usually 0
        click.echo(
            f"requests: {len(report['sessions'])} of this client (a client sees only its own; "
            "an admin key sees every request)"
        )
    for r in report["sessions"]:
        click.echo(
            f"  {r['id']:<34} {r['model']:<12} {r['method']:<10} "
            f"evals {r['evaluations']:>5}  hits {r['hits']}  {r['elapsed_s']:.1f}s"
        )


@main.command()
@click.option(
    "--model",
    default="digits",
    show_default=True,
    help="Model spec: digits (the shipped demo), synthetic, digits:/path.",
)
@click.option(
    "--cores",
    "-k",
    type=click.IntRange(min=1),
    default=None,
    help="CHORDS cores (default 4, or the length of --init).",
)
@click.option("--steps", "-n", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--prompt", default=None, help='digits: what to draw, e.g. "a handwritten 3".')
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--workers",
    "-w",
    type=click.IntRange(min=1),
    default=None,
    help="Local worker processes (default: one per core, 1 for sequential).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="chords-run",
    show_default=True,
    help="Where hits, hits.png and summary.json go.",
)
@click.option(
    "--method", type=click.Choice(list(METHOD_CHOICES)), default="chords", show_default=True
)
@click.option(
    "--init", "init_text", default=None, metavar="I1,I2,...", help="Explicit init sequence."
)
@click.option(
    "--stop",
    "stop_text",
    default=None,
    metavar="core-index:M|residual:TAU|residual-cores:TAU",
    help="Stop rule (default: none, every core's output is shown).",
)
@click.option(
    "--param",
    "param_values",
    multiple=True,
    metavar="KEY=VALUE",
    help="Model parameter, VALUE as JSON or a plain string; repeatable.",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="synthetic model: emulated forward time.",
)
@click.option(
    "--logs",
    type=click.Path(file_okay=False),
    default=None,
    help="Write broker and worker logs here.",
)
@click.option(
    "--timeout", type=click.FloatRange(min=0), default=None, help="Give up after this many seconds."
)
def run(
    model: str,
    cores: int | None,
    steps: int,
    prompt: str | None,
    seed: int,
    workers: int | None,
    out_dir: str,
    method: str,
    init_text: str | None,
    stop_text: str | None,
    param_values: tuple[str, ...],
    latency_ms: float,
    logs: str | None,
    timeout: float | None,
) -> None:
    """All in one: start a local broker and workers, run one request, show and save its hits.

    With no options: the shipped digits model, K=4 cores, N=50 steps, "a handwritten 7".
    """
    from chords_mq.apps.runner import run_locally

    if prompt is not None:
        param_values = (*param_values, f"prompt={prompt}")
    elif model.startswith("digits"):
        param_values = (*param_values, "prompt=a handwritten 7")
    if cores is None and init_text is None:
        cores = method_for(method).cli_default_cores  # CHORDS: K=4, recorded in the request
    spec = build_request(model, method, cores, steps, init_text, stop_text, seed, param_values)
    count = workers or spec.resolved_cores()
    run_locally(spec, count, latency_ms, Path(out_dir), logs, timeout)


@main.command()
@click.option("--model", default="digits", show_default=True, help="Model spec the workers serve.")
@click.option(
    "--methods",
    default="sequential,chords,srds,paradigms",
    show_default=True,
    metavar="M1,M2,...",
    help=f"Methods to compare, sequential included ({', '.join(METHOD_CHOICES)}).",
)
@click.option("--cores", "cores_text", default="4,6,8", show_default=True, metavar="K1,K2,...")
@click.option("--steps", "-n", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="File with one prompt per line (default for digits: the ten digits; else none).",
)
@click.option("--seeds", "seeds_text", default="0", show_default=True, metavar="0-9|0,1,2")
@click.option(
    "--tolerance",
    "tolerance_text",
    default=None,
    metavar="TAU1,TAU2,...",
    help="ParaDIGMS tolerances, one row each (default 0.1).",
)
@click.option(
    "--chords-stop",
    default="core-index:1",
    show_default=True,
    help="CHORDS stop rule (the paper returns the fastest core).",
)
@click.option(
    "--param",
    "param_values",
    multiple=True,
    metavar="KEY=VALUE",
    help="Model parameter for every request; repeatable.",
)
@click.option("--clip", default=None, help="Local CLIP model folder: adds CLIP score.")
@click.option(
    "--broker",
    type=ENDPOINT,
    default=None,
    help="Use this running broker (default: start a local broker and --workers workers).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Local workers to start (default: the largest K).",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="synthetic model: emulated forward time of local workers.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="chords-bench",
    show_default=True,
    help="Writes bench.json and bench.md here.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="Per-request timeout in seconds.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Device of the local workers (cpu, cuda, cuda:1 ...).",
)
@click.option("--logs", type=click.Path(file_okay=False), default=None, help="Daemon logs here.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[PATH]",
    help="Also draw round and wall speedup against quality (or latent RMSE), per method and K, "
    "as a PNG at PATH; --plot without a PATH writes OUT/bench.png.",
)
def bench(
    model: str,
    methods: str,
    cores_text: str,
    steps: int,
    prompts_file: str | None,
    seeds_text: str,
    tolerance_text: str | None,
    chords_stop: str,
    param_values: tuple[str, ...],
    clip: str | None,
    broker: str | None,
    workers: int | None,
    latency_ms: float,
    out_dir: str,
    timeout: float,
    device: str,
    logs: str | None,
    plot_path: str | None,
) -> None:
    """Compare sequential, CHORDS, SRDS and ParaDIGMS through the engine (the paper's Tables 1-2).

    For each method and K: round-speedup N/round, wall-clock speedup against sequential on the
    same pool, network evaluations, latent RMSE against sequential, and a quality metric (digit
    classifier for the demo model, CLIP score with --clip). Writes OUT/bench.json and OUT/bench.md,
    and with --plot a PNG of the speedups against quality.
    """
    from chords_mq.apps.bench import (
        DIGIT_PROMPTS,
        BenchConfig,
        markdown,
        parse_int_list,
        parse_tolerances,
        read_prompts,
        run_bench_sync,
        write_results,
    )
    from chords_mq.apps.cluster import LocalCluster

    try:
        prompts: tuple[str | None, ...]
        if prompts_file is not None:
            prompts = read_prompts(prompts_file)
        elif model.startswith("digits"):
            prompts = DIGIT_PROMPTS
        else:
            prompts = (None,)
        tolerances: tuple[float | None, ...] = (None,)
        if tolerance_text is not None:
            tolerances = parse_tolerances(tolerance_text)
        config = BenchConfig(
            model=model,
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
            cores=parse_int_list(cores_text, "--cores"),
            steps=steps,
            prompts=prompts,
            seeds=parse_int_list(seeds_text, "--seeds"),
            tolerances=tolerances,
            chords_stop=chords_stop,
            params=parse_params(param_values),
            clip=clip,
            timeout=timeout or None,
        )
        for method, k, tolerance in config.variants():  # refuse bad combinations up front
            config.request(method, k, prompts[0], config.seeds[0], tolerance)
    except ChordsError as exc:
        raise click.UsageError(str(exc)) from None
    plot_file = None
    if plot_path is not None:  # refuse a bad path before the bench runs, not after
        plot_file = Path(out_dir) / "bench.png" if plot_path == "" else Path(plot_path)
        if plot_path and not plot_file.parent.is_dir():
            raise click.BadParameter(
                f"directory {plot_file.parent} does not exist", param_hint="'--plot'"
            )

    def log(line: str) -> None:
        click.echo(line, err=True)

    try:
        if broker is not None:
            result = run_bench_sync(broker, config, log)
        else:
            count = workers or max(config.cores)
            log(f"starting a local broker and {count} worker(s) on model {model}...")
            cluster = LocalCluster(
                workers=count, model=model, latency_ms=latency_ms, log_dir=logs, device=device
            )
            try:
                cluster.start()
                result = run_bench_sync(cluster.client_address, config, log)
            finally:
                cluster.stop()
    except ChordsError as exc:
        raise click.ClickException(str(exc)) from None
    write_results(result, Path(out_dir))
    click.echo(markdown(result))
    click.echo(f"wrote {out_dir}/bench.json and {out_dir}/bench.md", err=True)
    if plot_file is not None:
        from chords_mq.apps.bench_plot import plot_bench

        try:
            plot_bench(result, plot_file)
        except OSError as exc:
            raise click.ClickException(
                f"cannot write the plot {plot_file}: {exc.strerror or exc}"
            ) from None
        click.echo(f"wrote {plot_file}", err=True)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("name")
def keygen(directory: str, name: str) -> None:
    """Write a CurveZMQ key pair: DIRECTORY/NAME.key (public) and NAME.key_secret.

    Give the broker's public key (broker.key) to every client and worker; put each client's
    and worker's public key in the broker's KEYS/clients/ or KEYS/workers/ (KEYS/admins/ for
    clients that may see everything), and keep every .key_secret on its own host.
    """
    from chords_mq.keys import KeyFileError
    from chords_mq.keys import keygen as make
    from chords_mq.options import ConfigError

    try:
        public, secret = make(directory, name)
    except KeyFileError as exc:  # a bad name, or keys that exist: the user's to fix (exit 2)
        raise ConfigError(str(exc)) from None
    click.echo(f"public key: {public}")
    click.echo(f"secret key: {secret} (keep it on this host, mode 0600)")


@main.group()
def apikey() -> None:
    """API keys of chords-gateway (its --api-keys file)."""


@apikey.command("create")
@click.argument("name")
@click.option(
    "--file",
    "keys_file",
    type=click.Path(dir_okay=False),
    required=True,
    help="The keys file chords-gateway --api-keys reads (created mode 0600 if missing).",
)
def apikey_create(name: str, keys_file: str) -> None:
    """Append NAME and the hash of a new secret key to the keys file, and print the secret key
    once, alone on a line: it is stored nowhere else."""
    from chords_mq.gateway.apikeys import ApiKeyError, create_key
    from chords_mq.options import ConfigError

    try:
        secret = create_key(keys_file, name)
    except ApiKeyError as exc:  # a bad name, a name taken, an unreadable file (exit 2)
        raise ConfigError(str(exc)) from None
    click.echo(secret)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
