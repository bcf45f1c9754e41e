"""The dashboard on a live swarm: the page in real headless Chromium, /api/v1/state, and /metrics
parsed by Prometheus' own parser. One coordinator and two peers (two orgs) serve the whole module.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import epochs_reported, events, start_coordinator, start_peer, wait_until, write_run

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    started: list = []
    try:
        run = write_run(tmp / "run.toml", epochs=0)
        coordinator = start_coordinator(started, tmp / "c", run)
        tokens = {"default": coordinator.token, "acme": coordinator.issue_token("acme")}
        for name, token in tokens.items():
            start_peer(started, coordinator.address, token, tmp / name)
        wait_until(lambda: all(epochs_reported(tmp / name) for name in tokens), 120, "both peers to report")
        peer_ids = {next(e["peer_id"] for e in events(tmp / name) if e["event"] == "joined") for name in tokens}
        yield coordinator, peer_ids, tmp
    finally:
        for proc in started:
            proc.kill()


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_state_api_and_metrics(swarm):
    coordinator, peer_ids, _ = swarm
    status, content_type, body = _get(coordinator.dashboard + "api/v1/state")
    assert status == 200 and content_type == "application/json"
    state = json.loads(body)
    assert {peer["id"] for peer in state["peers"]} == peer_ids
    assert {org["name"] for org in state["orgs"]} == {"default", "acme"}
    assert abs(sum(org["share"] for org in state["orgs"]) - 1.0) < 1e-9
    assert state["history"]["epoch"] and len(state["history"]["loss"]) == len(state["history"]["epoch"])

    status, content_type, body = _get(coordinator.dashboard + "metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body)}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("potluck_peers", (("state", "alive"),))] == 2
    assert value[("potluck_epoch", ())] >= 1
    assert value[("potluck_samples_total", ())] > 0
    assert families["potluck_rpc_latency_seconds"].type == "histogram"
    heartbeats = value[("potluck_rpc_latency_seconds_count", (("code", "OK"), ("method", "Heartbeat")))]
    assert heartbeats >= 2
    assert {("potluck_org_samples_total", (("org", org),)) for org in ("acme", "default")} <= set(value)

    assert _get(coordinator.dashboard + "nothing-here")[0] == 404
    assert _get(coordinator.dashboard + "static/../ledger.sqlite")[0] == 404


def test_page_shows_peers_and_its_chart_grows_in_chromium(swarm, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("POTLUCK_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing; install Debian's chromium package (.ci/run does)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    coordinator, peer_ids, _ = swarm
    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.on("request", lambda request: requested.append(request.url))
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(coordinator.dashboard)
            for peer_id in peer_ids:
                page.locator("#peers").get_by_role("cell", name=peer_id, exact=True).wait_for(timeout=30_000)
            # (page.evaluate, not wait_for_function: the page's CSP forbids eval, rightly)
            def chart_points() -> int:
                return page.evaluate("window.potluckCharts.loss.data[0].length")

            points = wait_until(chart_points, 30, "the loss chart to get points")
            # the swarm trains on: the chart gets more points without reloading the page
            wait_until(lambda: chart_points() > points, 60, "the loss chart to grow")
            assert page.evaluate("window.potluckCharts.throughput.data[0].length") > points
            assert page.locator("#orgs tbody tr").count() == 2
            assert page.locator("canvas").count() == 2  # uPlot drew both charts
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    # offline: the page loaded nothing but its own files and its own API
    assert requested and all(url.startswith(coordinator.dashboard) for url in requested), requested
    assert shot.stat().st_size > 10_000
    if os.environ.get("POTLUCK_ARTIFACTS"):
        artifacts = Path(os.environ["POTLUCK_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / "dashboard.png")


def test_vendored_chart_library_is_the_pinned_release():
    """The files served are exactly the ones VENDOR.md pins (sha256), with their license."""
    import hashlib
    import re
    from importlib import resources

    vendor = resources.files("coordinator") / "static" / "vendor" / "uplot"
    pins = dict(re.findall(r"`(uPlot[^`]+)` sha256 \| `([0-9a-f]{64})`", (vendor / "VENDOR.md").read_text()))
    assert set(pins) == {"uPlot.iife.min.js", "uPlot.min.css"}
    for name, digest in pins.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (vendor / "LICENSE").read_text()
