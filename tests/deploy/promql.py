"""Extract PromQL queries from the Grafana dashboard and metric names from queries."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tests.deploy.tools import DASHBOARD_FILE

METRIC_NAME = re.compile(r"\b(nanwatch_[a-z_]+)\b")


@dataclass(frozen=True, slots=True)
class PanelQuery:
    """One query target of a dashboard panel."""

    panel: str
    ref_id: str
    expr: str


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every query target of every non-row panel, in dashboard order."""
    return [
        PanelQuery(panel=panel["title"], ref_id=target["refId"], expr=target["expr"])
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def substitute_variables(expr: str, *, run_id: str, rate_interval: str) -> str:
    """Replace the Grafana variables that the dashboard's queries use, as Grafana does before it sends them.

    The run id is inserted as it is: run ids of the demo hold only letters, digits and "-",
    which need no escaping in a PromQL regular expression.
    """
    return expr.replace("$run_id", run_id).replace("$__rate_interval", rate_interval)


def metric_names(text: str) -> set[str]:
    return set(METRIC_NAME.findall(text))
