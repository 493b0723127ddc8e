"""The playground page in a real browser (Debian's chromium, driven by Selenium through its
chromedriver), ``GET /v1/schedule``, and the gateway under small versions of the load and abuse
probes of benchmarks/gateway.py. One digits cluster (a broker and 2 workers) and one chords-gateway
process in front of it, with an API key and ``--max-requests-per-key 8``, all real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chords_mq.algorithms import ChordsPlan, init_sequence
from chords_mq.apps.cluster import LocalCluster
from chords_mq.apps.local_gateway import LocalGateway
from chords_mq.apps.plan_report import plan_report
from chords_mq.gateway.apikeys import create_key
from chords_mq.local import ToyODE, simulate
from chords_mq.solvers import grid_euler
from tests.integration.gateway_probes import burst, flood, malformed_corpus, rss_bytes

STEPS, CORES = 50, 4
MAX_PER_KEY = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("playground")
    cluster = LocalCluster(workers=2, model="digits", log_dir=root / "logs")
    cluster.launch()
    keys = root / "api-keys"
    key = create_key(keys, "playground")
    gateway = LocalGateway(
        cluster.client_address,
        ["--api-keys", str(keys), "--max-requests-per-key", str(MAX_PER_KEY)],
        log_path=root / "logs" / "gateway.log",
    )
    try:
        gateway.start()
        cluster.wait_for_workers(2, timeout=120)
        yield {"gateway": gateway, "url": gateway.url, "key": key, "root": root}
    finally:
        gateway.stop()
        cluster.stop()


def get(url: str, key: str | None = None) -> tuple[int, Any, str]:
    """GET ``url``: status, the body (JSON where it is), Content-Type."""
    request = urllib.request.Request(
        url, headers={} if key is None else {"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            status, body, kind = answer.status, answer.read(), answer.headers["content-type"]
    except urllib.error.HTTPError as error:
        status, body, kind = error.code, error.read(), error.headers["content-type"]
    return status, json.loads(body) if "json" in (kind or "") else body.decode(), kind or ""


# -- /v1/schedule ----------------------------------------------------------------------------------


def test_schedule_is_the_plan_that_chords_plan_shows(stack):
    status, schedule, _ = get(
        f"{stack['url']}/v1/schedule?steps={STEPS}&cores={CORES}", stack["key"]
    )
    assert status == 200
    sequence = init_sequence(CORES, STEPS)
    toy = ToyODE(STEPS)
    plan = ChordsPlan(toy.x0, STEPS, sequence)
    result = simulate(plan, toy.velocity, grid_euler([i / STEPS for i in range(STEPS + 1)]))
    report = plan_report(STEPS, sequence, None, "none", plan, result)
    assert schedule["init_sequence"] == report["init_sequence"] == [0, 8, 16, 32]
    assert schedule["rounds"] == len(report["rounds"])
    assert schedule["evaluations"] == report["evaluations"]
    pairs = sorted(
        (round_, step, lane["core"])
        for lane in schedule["lanes"]
        for round_, step in lane["evaluations"]
    )
    expected = sorted(
        (number, step, core)
        for number, round_pairs in enumerate(report["rounds"], start=1)
        for step, core in round_pairs
    )
    assert pairs == expected
    assert [(h["core"], h["round"]) for h in schedule["hits"]] == [
        (h["core"], h["round"]) for h in report["hits"]
    ]
    assert [(h["core"], h["round"]) for h in schedule["hits"]] == [
        (0, 4),
        (4, 21),
        (3, 36),
        (2, 43),
        (1, 50),
    ]
    assert schedule["rectifications"] == report["rectifications"]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("steps=0&cores=4", "steps"),
        ("steps=501&cores=4", "steps"),
        ("steps=50&cores=17", "cores"),
        ("steps=3&cores=4", "cores"),
        ("steps=fifty&cores=4", "steps"),
        ("steps=50", "cores"),
        ("steps=50&cores=4&init=0,8", "init"),
    ],
)
def test_schedule_refuses_bad_parameters_naming_them(stack, query, param):
    status, body, _ = get(f"{stack['url']}/v1/schedule?{query}", stack["key"])
    assert status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"


def test_schedule_needs_the_key_like_every_v1_route(stack):
    status, body, _ = get(f"{stack['url']}/v1/schedule?steps=50&cores=4")
    assert status == 401
    assert body["error"]["type"] == "authentication_error"


def test_the_page_loads_only_its_own_files(stack):
    status, html, kind = get(f"{stack['url']}/")
    assert status == 200 and kind.startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(assets) == ["/static/playground.css", "/static/playground.js"]
    for asset in assets:
        status, text, _ = get(f"{stack['url']}{asset}")
        assert status == 200 and len(text) > 100
        # nothing fetched from elsewhere: the one absolute URL is SVG's namespace name
        urls = set(re.findall(r"https?://[^\s\"'`)]+", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert get(f"{stack['url']}/static/nothing.js")[0] == 404


# -- the page in a real browser --------------------------------------------------------------------


def _find_browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    if chromium is None or driver is None:
        missing = " and ".join(
            name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path
        )
        pytest.skip(
            f"{missing} not found: install Debian's chromium and chromium-driver "
            "(.ci/run does, as root) to run the playground in a real browser"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    chromium, driver_path = _find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1240,860",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download a driver
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _open_page(browser: Any, stack: dict[str, Any], key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{stack['url']}/")
    field = browser.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    browser.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script("return document.getElementById('model').value") == "digits"
    )


def _set(browser: Any, element_id: str, value: object) -> None:
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def test_browser_shows_every_cores_hit_as_it_lands_beside_the_schedule(browser, stack, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open_page(browser, stack, stack["key"])
    _set(browser, "cores", CORES)
    _set(browser, "steps", STEPS)
    _set(browser, "seed", 7)
    browser.find_element(By.ID, "generate").click()
    # a bound on a hang, not a timing: the request takes well under a second here
    WebDriverWait(browser, 120).until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#tiles .hit.returned")
            or d.find_element(By.ID, "error").is_displayed()
        )
    )
    error = browser.find_element(By.ID, "error")
    assert not error.is_displayed(), error.text
    WebDriverWait(browser, 10).until(  # the tiles' landing animations have finished
        lambda d: d.execute_script("return document.getAnimations().length") == 0
    )
    shot = Path(os.environ.get("CHORDS_PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    tiles = browser.find_elements(By.CSS_SELECTOR, "#tiles .hit")
    assert len(tiles) >= CORES
    _, schedule, _ = get(f"{stack['url']}/v1/schedule?steps={STEPS}&cores={CORES}", stack["key"])
    planned = {hit["core"]: hit["round"] for hit in schedule["hits"]}
    seen = [(int(t.get_attribute("data-core")), int(t.get_attribute("data-round"))) for t in tiles]
    # each core's hit in its own tile, at the round the schedule says, fastest first
    assert [core for core, _ in seen] == [0, 4, 3, 2, 1]
    assert all(round_ == planned[core] for core, round_ in seen)
    for tile, (core, round_) in zip(tiles, seen, strict=True):
        label = tile.find_element(By.CSS_SELECTOR, ".label").text
        assert f"core {core}" in label and f"round {round_}" in label, label
        assert f"{STEPS / round_:.2f}×" in label, label
        width = browser.execute_script(
            "return arguments[0].naturalWidth", tile.find_element(By.TAG_NAME, "img")
        )
        assert width == 64  # the digits model's picture, decoded from the event's PNG
    returned = browser.find_elements(By.CSS_SELECTOR, "#tiles .hit.returned")
    assert [t.get_attribute("data-core") for t in returned] == ["1"]
    # the schedule beside them: one line per core, every hit marked and filled once landed
    lanes = browser.find_elements(By.CSS_SELECTOR, "#schedule svg polyline.lane")
    assert sorted(int(lane.get_attribute("data-core")) for lane in lanes) == [1, 2, 3, 4]
    marks = browser.find_elements(By.CSS_SELECTOR, "#schedule svg rect.hit-mark")
    assert sorted(int(m.get_attribute("data-core")) for m in marks) == [0, 1, 2, 3, 4]
    assert all(m.get_attribute("fill") != "#fff" for m in marks)
    assert "done" in browser.find_element(By.ID, "status").text
    # offline: every resource the page loaded came from the gateway
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map((entry) => entry.name)"
    )
    assert loaded and all(url.startswith(stack["url"]) for url in loaded), loaded


def test_browser_shows_the_gateways_error(browser, stack):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open_page(browser, stack, stack["key"])
    _set(browser, "api-key", "sk-wrong")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 60).until(lambda d: "HTTP 401" in error.text)
    assert "incorrect API key" in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#tiles .hit")


# -- load and abuse (the full-size runs are benchmarks/gateway.py's) -------------------------------


def test_fifty_concurrent_requests_from_one_key_each_get_200_or_429_and_none_hangs(stack):
    result = asyncio.run(burst(stack["url"], stack["key"], 50, timeout=120, steps=20))
    counts = result.counts()
    assert set(counts) <= {"200", "429"}, counts
    assert counts.get("200", 0) >= 1 and counts.get("429", 0) >= 1, counts
    assert set(result.retry_after) == {"1"}  # every 429 says when to retry
    # every slot was given back: the key runs a request again
    again = asyncio.run(burst(stack["url"], stack["key"], 1, timeout=120, steps=20))
    assert again.statuses == [200]


def test_malformed_requests_each_get_4xx_and_the_gateway_stays_up_in_bounded_memory(stack):
    pid = stack["gateway"].process.pid
    corpus = malformed_corpus(stack["key"])
    warm = asyncio.run(flood(stack["url"], corpus, len(corpus), connections=4))
    assert not warm.unexpected, warm.unexpected
    before = rss_bytes(pid)
    result = asyncio.run(flood(stack["url"], corpus, 10 * len(corpus), connections=8))
    after = rss_bytes(pid)
    assert result.sent == 10 * len(corpus)
    assert not result.unexpected, result.unexpected
    assert result.all_4xx()
    assert before is not None and after is not None, "the gateway died"
    assert after - before <= 10 * 2**20, (before, after)
    # and it still serves a valid request
    status, models, _ = get(f"{stack['url']}/v1/models", stack["key"])
    assert status == 200 and [m["id"] for m in models["data"]] == ["digits"]
    assert asyncio.run(burst(stack["url"], stack["key"], 1, timeout=120)).statuses == [200]
