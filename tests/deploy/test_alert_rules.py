"""The chart's alert rules, checked and unit-tested with promtool."""

from __future__ import annotations

import subprocess

import pytest

from tests.deploy.promql import metric_names
from tests.deploy.service_metrics import exposed_metric_names
from tests.deploy.tools import PROMETHEUS_INSTALL_HINT, RULES_FILE, RULES_TEST_FILE, require_executable, require_module

REQUIRED_ALERTS = {
    "NanwatchRunHalted", "NanwatchNonFiniteGradients", "NanwatchLossSpike", "NanwatchServiceDown",
}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_executable("promtool", PROMETHEUS_INSTALL_HINT)
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, check=False)


def test_rules_check_passes() -> None:
    result = _promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(RULES_TEST_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_required_alerts() -> None:
    yaml = require_module("yaml")
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    assert REQUIRED_ALERTS <= alerts


def test_rules_every_alert_tested() -> None:
    yaml = require_module("yaml")
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    tests = yaml.safe_load(RULES_TEST_FILE.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert alerts == tested


@pytest.mark.parametrize("severity_field", ["severity"])
def test_rules_have_severity_and_summary(severity_field: str) -> None:
    yaml = require_module("yaml")
    for group in yaml.safe_load(RULES_FILE.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"][severity_field] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def test_rules_metrics_exist() -> None:
    unknown = metric_names(RULES_FILE.read_text()) - exposed_metric_names()
    assert unknown == set(), "the rules use metrics that the service does not expose"
