"""A real Prometheus server scrapes a real service while the demo run goes NaN.

The dashboard's queries and the alert rules run against what Prometheus
scraped: every panel's query must parse and return data, and the halt must be
visible through Prometheus's HTTP API, both as a series and as a firing alert.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nanwatch.demo.launcher import DemoResult, run_demo
from nanwatch.errors import DEFAULT_HALT_EXIT_CODE
from nanwatch.service.server import BackgroundService, ServiceConfig
from tests.deploy.promql import load_dashboard, panel_queries, substitute_variables
from tests.deploy.tools import PROMETHEUS_INSTALL_HINT, RULES_FILE, require_executable

SCRAPE_INTERVAL = "1s"
# Long enough that rate() over it always covers several 1 s scrapes.
RATE_INTERVAL = "1m"
# Upper bound for Prometheus to start or to scrape a change; polling stops as soon as it is there.
WAIT_S = 60.0
DEMO_STEPS = 60

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
rule_files:
  - {rules}
scrape_configs:
  - job_name: nanwatch
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
"""


class Prometheus:
    """HTTP API client of a Prometheus server on loopback."""

    def __init__(self, port: int) -> None:
        self.base_url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            # Prometheus returns status 400 and a JSON error body for a query that does not parse.
            return json.load(error)

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


def _free_port() -> int:
    # NOTE: another process could take the port between close() and Prometheus's bind;
    # the test then fails at startup with Prometheus's "address already in use" log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {WAIT_S:.0f} s waiting for {what}")
        time.sleep(0.5)


def _has_result(prometheus: Prometheus, expr: str) -> bool:
    answer = prometheus.query(expr)
    return answer.get("status") == "success" and bool(answer["data"]["result"])


def _firing(prometheus: Prometheus, alert: str, run_id: str) -> bool:
    alerts = prometheus.get("/api/v1/alerts")["data"]["alerts"]
    return any(
        a["labels"].get("alertname") == alert and a["labels"].get("run_id") == run_id and a["state"] == "firing"
        for a in alerts
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundService]:
    db_path = tmp_path_factory.mktemp("store") / "nanwatch.db"
    config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(db_path), grace_s=1.0)
    with BackgroundService(config) as running:
        yield running


@pytest.fixture(scope="module")
def prometheus(service: BackgroundService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = require_executable("prometheus", PROMETHEUS_INSTALL_HINT)
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(
        interval=SCRAPE_INTERVAL, rules=RULES_FILE, metrics_port=service.running.metrics_port
    ))
    port = _free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    client = Prometheus(port)
    try:
        _wait_for(lambda: process.poll() is None and client.is_ready(), f"Prometheus to start (log: {log_path})")
        _wait_for(lambda: _has_result(client, 'up{job="nanwatch"} == 1'), "the first scrape of the service")
        yield client
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def halted_run(service: BackgroundService, prometheus: Prometheus) -> DemoResult:
    result = run_demo("lr", steps=DEMO_STEPS, endpoint=service.endpoint, out=io.StringIO())
    assert result.exit_code == DEFAULT_HALT_EXIT_CODE, "the demo run with fault lr did not halt"
    _wait_for(
        lambda: _has_result(prometheus, f'nanwatch_run_halted{{run_id="{result.run_id}"}} == 1'),
        f"Prometheus to scrape the halt of run {result.run_id}",
    )
    return result


@pytest.mark.parametrize("query", panel_queries(load_dashboard()), ids=lambda q: f"{q.panel}-{q.ref_id}")
def test_panel_query_returns_data(query: Any, prometheus: Prometheus, halted_run: DemoResult) -> None:
    expr = substitute_variables(query.expr, run_id=halted_run.run_id, rate_interval=RATE_INTERVAL)
    answer = prometheus.query(expr)
    assert answer["status"] == "success", f"panel {query.panel!r}: {expr} failed: {answer.get('error')}"
    assert answer["data"]["result"], f"panel {query.panel!r}: {expr} returned no series"


def test_run_selector_lists_run(prometheus: Prometheus, halted_run: DemoResult) -> None:
    # The dashboard's run variable is label_values(nanwatch_run_halted, run_id).
    answer = prometheus.get("/api/v1/label/run_id/values", **{"match[]": "nanwatch_run_halted"})
    assert halted_run.run_id in answer["data"]


def test_halt_visible_in_series(prometheus: Prometheus, halted_run: DemoResult) -> None:
    answer = prometheus.query(f'sum by (source) (nanwatch_halts_total{{run_id="{halted_run.run_id}"}})')
    halts = {series["metric"]["source"]: float(series["value"][1]) for series in answer["data"]["result"]}
    assert sum(halts.values()) >= 1, f"no halt counted for run {halted_run.run_id}: {answer}"


def test_halt_alert_fires(prometheus: Prometheus, halted_run: DemoResult) -> None:
    _wait_for(lambda: _firing(prometheus, "NanwatchRunHalted", halted_run.run_id), "alert NanwatchRunHalted")


def test_rules_loaded_healthy(prometheus: Prometheus, halted_run: DemoResult) -> None:
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert "NanwatchServiceDown" in rules
    for name, rule in rules.items():
        assert rule["health"] != "err", f"rule {name} failed to evaluate: {rule.get('lastError')}"
