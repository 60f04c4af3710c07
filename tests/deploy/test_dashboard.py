"""The Grafana dashboard JSON: datasource variable, run selector, panels and the metrics they query."""

from __future__ import annotations

import re

import pytest

from tests.deploy.promql import load_dashboard, metric_names, panel_queries
from tests.deploy.service_metrics import exposed_metric_names

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Each topic the dashboard must show, and a metric whose presence in a panel shows it.
REQUIRED_TOPICS = {
    "loss": "nanwatch_loss",
    "gradient norm": "nanwatch_grad_norm",
    "non-finite loss": "nanwatch_nonfinite_loss_total",
    "non-finite gradients": "nanwatch_nonfinite_grads_total",
    "findings by stage": "nanwatch_findings_total",
    "halts": "nanwatch_halts_total",
    "halted runs": "nanwatch_run_halted",
    "skipped steps (loss scale)": "nanwatch_loss_scale",
    "service scrape": "up",
    "service load": "nanwatch_reports_total",
}


def _variables() -> dict[str, dict]:
    return {variable["name"]: variable for variable in load_dashboard()["templating"]["list"]}


def test_dashboard_datasource_variable() -> None:
    variable = _variables()["datasource"]
    assert variable["type"] == "datasource"
    assert variable["query"] == "prometheus"


def test_dashboard_run_selector() -> None:
    variable = _variables()["run_id"]
    assert variable["datasource"] == DATASOURCE
    assert variable["definition"] == "label_values(nanwatch_run_halted, run_id)"
    assert variable["multi"] is True
    assert variable["includeAll"] is True


@pytest.mark.parametrize("topic", sorted(REQUIRED_TOPICS))
def test_dashboard_shows_topic(topic: str) -> None:
    exprs = " ".join(query.expr for query in panel_queries(load_dashboard()))
    assert re.search(rf"\b{REQUIRED_TOPICS[topic]}\b", exprs), f"no panel queries {REQUIRED_TOPICS[topic]}"


def test_dashboard_no_fixed_datasource() -> None:
    for panel in load_dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, f"{panel['title']} {target['refId']}"


def test_dashboard_run_queries_filtered() -> None:
    for query in panel_queries(load_dashboard()):
        if "run_id" in query.expr:
            assert 'run_id=~"$run_id"' in query.expr, query.panel


def test_dashboard_metrics_exist() -> None:
    used = set().union(*(metric_names(query.expr) for query in panel_queries(load_dashboard())))
    assert used - exposed_metric_names() == set()


def test_dashboard_panels_described() -> None:
    for panel in load_dashboard()["panels"]:
        if panel["type"] != "row":
            assert panel.get("description"), panel["title"]


def test_dashboard_ids_unique() -> None:
    ids = [panel["id"] for panel in load_dashboard()["panels"]]
    assert len(ids) == len(set(ids))
