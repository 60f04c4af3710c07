"""The example training Job: valid for Kubernetes, and a halt fails it at once instead of retrying."""

from __future__ import annotations

import re
from typing import Any

import pytest

from nanwatch.cli.main import build_parser
from nanwatch.errors import DEFAULT_HALT_EXIT_CODE
from tests.deploy.chart import render_chart
from tests.deploy.tools import JOB_EXAMPLE, require_module

KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    yaml = require_module("yaml")
    return yaml.safe_load(JOB_EXAMPLE.read_text())


def _trainer(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "trainer")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_job_valid(version: str, job: dict[str, Any]) -> None:
    kubernetes_validate = require_module("kubernetes_validate")
    kubernetes_validate.validate(job, version, strict=True)


def test_job_halt_fails_job(job: dict[str, Any]) -> None:
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail_rules = [rule for rule in rules if rule["action"] == "FailJob"]
    assert len(fail_rules) == 1
    on_exit = fail_rules[0]["onExitCodes"]
    assert on_exit["operator"] == "In"
    assert on_exit["values"] == [DEFAULT_HALT_EXIT_CODE]
    assert on_exit["containerName"] == _trainer(job)["name"]


def test_job_exit_code_matches_chart(job: dict[str, Any]) -> None:
    configmap = render_chart().of_kind("ConfigMap")[0]
    env = {e["name"]: e.get("value") for e in _trainer(job)["env"]}
    assert int(env["NANWATCH_HALT_EXIT_CODE"]) == int(configmap["data"]["NANWATCH_HALT_EXIT_CODE"])


def test_job_never_restarts(job: dict[str, Any]) -> None:
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert "--max-restarts=0" in _trainer(job)["command"]


def _expand_env(word: str, env: dict[str, str]) -> str:
    """Replace $(NAME) with the container's env value, as the kubelet does in a command."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda match: env[match[1]], word)


def test_job_entrypoint_nanwatch_run(job: dict[str, Any]) -> None:
    trainer = _trainer(job)
    env = {e["name"]: e["value"] for e in trainer["env"] if "value" in e}
    command = [_expand_env(word, env) for word in trainer["command"]]
    args = build_parser().parse_args(command[1:])
    assert command[0] == "nanwatch"
    assert args.command == "run"
    # Without --endpoint, nanwatch run starts an in-process service instead of using the cluster's.
    assert args.endpoint == env["NANWATCH_ENDPOINT"]
    assert args.training_command[:2] == ["--", "torchrun"]


def test_job_client_environment(job: dict[str, Any]) -> None:
    env = {e["name"]: e for e in _trainer(job)["env"]}
    assert env["NANWATCH_ENDPOINT"]["value"] == "nanwatch:50051"
    assert env["NANWATCH_RUN_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['controller-uid']"
