"""The Helm chart rendered offline for several value sets, validated against the Kubernetes schemas."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from nanwatch.cli.main import build_parser
from nanwatch.service.thresholds import Thresholds
from tests.deploy.chart import NAMESPACE, RELEASE, Rendered, container, render_chart
from tests.deploy.tools import CHART_DIR, DASHBOARD_FILE, RULES_FILE, require_module

# Oldest and newest Kubernetes versions the chart is validated against.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
# Custom resources of the Prometheus Operator, whose schemas kubernetes-validate does not carry.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
FULL_FULLNAME = f"{RELEASE}-nanwatch"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything-on": {
        "server": {"rankLabel": False, "graceSeconds": 2.5, "logLevel": "DEBUG"},
        "thresholds": {"grad_explode_factor": 50.0, "grad_history": 100, "fp16_eps_min": 1.0e-5},
        "haltPolicy": {"exitCode": 77},
        "auth": {"token": "s3cret-token"},
        "persistence": {"enabled": True, "storageClass": "fast-ssd", "size": "5Gi"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "grafanaDashboard": {"annotations": {"grafana_folder": "Training"}},
        "imagePullSecrets": [{"name": "registry-credentials"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "podAnnotations": {"example.com/team": "ml-platform"},
        "image": {"repository": "registry.example.com/nanwatch", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
    },
    "existing-resources": {
        "auth": {"existingSecret": "nanwatch-token", "secretKey": "api-token"},
        "persistence": {"enabled": True, "existingClaim": "nanwatch-store"},
        "grafanaDashboard": {"enabled": False},
        "service": {"type": "NodePort", "grpcPort": 443, "metricsPort": 8080},
        "fullnameOverride": "watcher",
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return {name: render_chart(values) for name, values in VALUE_SETS.items()}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_chart_manifests_valid(case: str, version: str, rendered: dict[str, Rendered]) -> None:
    kubernetes_validate = require_module("kubernetes_validate")
    for obj in rendered[case].objects:
        if obj["kind"] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{case}: {obj['kind']} {obj['metadata']['name']} is invalid for {version}: {error}")


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_chart_lint_clean(case: str) -> None:
    helm = require_module("helm_python")
    report = helm.lint(str(CHART_DIR), VALUE_SETS[case], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is info ("icon is recommended"); 2 is a warning and 3 an error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_default_kinds(rendered: dict[str, Rendered]) -> None:
    kinds = sorted(obj["kind"] for obj in rendered["defaults"].objects)
    assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "Service"]


def test_chart_everything_on_kinds(rendered: dict[str, Rendered]) -> None:
    kinds = sorted(obj["kind"] for obj in rendered["everything-on"].objects)
    expected = ["ConfigMap", "ConfigMap", "Deployment", "PersistentVolumeClaim", "PrometheusRule", "Secret",
                "Service", "ServiceMonitor"]
    assert kinds == expected


@pytest.mark.parametrize(
    ("values", "path"),
    [
        ({"thresholds": {"grad_explode_factr": 50.0}}, "/thresholds"),
        ({"thresholds": {"grad_history": 2}}, "/thresholds/grad_history"),
        ({"thresholds": {"fp16_eps_min": "1e-5"}}, "/thresholds/fp16_eps_min"),
        ({"haltPolicy": {"exitCode": 300}}, "/haltPolicy/exitCode"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"service": {"grpcPort": "50051"}}, "/service/grpcPort"),
        ({"serviceMonitor": {"interval": "30 seconds"}}, "/serviceMonitor/interval"),
        ({"replicaCount": 3}, "replicaCount"),
    ],
)
def test_schema_rejects_value(values: dict[str, Any], path: str) -> None:
    helm = require_module("helm_python")
    with pytest.raises(helm.HelmValuesError) as raised:
        render_chart(values)
    assert path in str(raised.value)


def test_schema_thresholds_match_service() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    properties = schema["properties"]["thresholds"]["properties"]
    fields = {field.name: field.type for field in dataclasses.fields(Thresholds)}
    hint = "run python deploy/helm/sync_values_schema.py after changing Thresholds"
    assert sorted(properties) == sorted(fields), hint
    for name, annotation in fields.items():
        expected = "integer" if annotation in ("int", int) else "number"
        assert properties[name]["type"] == expected, f"threshold {name} is {annotation} in Thresholds; {hint}"


def test_thresholds_configmap_loads(rendered: dict[str, Rendered]) -> None:
    configmap = rendered["everything-on"].one("ConfigMap", FULL_FULLNAME)
    thresholds = Thresholds.from_mapping(json.loads(configmap["data"]["thresholds.json"]))
    assert thresholds.grad_explode_factor == 50.0
    assert thresholds.grad_history == 100
    assert thresholds.fp16_eps_min == 1.0e-5
    assert configmap["data"]["NANWATCH_HALT_EXIT_CODE"] == "77"


def test_thresholds_default_empty(rendered: dict[str, Rendered]) -> None:
    configmap = rendered["defaults"].one("ConfigMap", FULL_FULLNAME)
    assert Thresholds.from_mapping(json.loads(configmap["data"]["thresholds.json"])) == Thresholds()


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_deployment_args_parse(case: str, rendered: dict[str, Rendered]) -> None:
    args = build_parser().parse_args(container(rendered[case])["args"])
    assert args.command == "serve"
    assert (args.grpc_port, args.metrics_port) == (50051, 9400)
    assert args.db.startswith("/data/")
    assert args.thresholds == "/etc/nanwatch/thresholds.json"
    assert args.no_rank_label == (case == "everything-on")


def test_deployment_mounts_thresholds(rendered: dict[str, Rendered]) -> None:
    mounts = {m["name"]: m for m in container(rendered["defaults"])["volumeMounts"]}
    assert mounts["config"]["mountPath"] == "/etc/nanwatch"
    assert mounts["config"]["readOnly"] is True
    assert mounts["data"]["mountPath"] == "/data"
    assert mounts["tmp"]["mountPath"] == "/tmp"


def test_deployment_probes_grpc(rendered: dict[str, Rendered]) -> None:
    spec = container(rendered["defaults"])
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert spec["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": ""}
    assert spec["readinessProbe"]["grpc"] == {"port": ports["grpc"], "service": "nanwatch.v1.Nanwatch"}
    assert isinstance(spec["readinessProbe"]["grpc"]["port"], int)


def test_deployment_security_context(rendered: dict[str, Rendered]) -> None:
    pod = rendered["defaults"].one("Deployment")["spec"]["template"]["spec"]
    security = container(rendered["defaults"])["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}


def test_deployment_resources_set(rendered: dict[str, Rendered]) -> None:
    resources = container(rendered["defaults"])["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert "memory" in resources["limits"]


def test_deployment_grace_exceeds_drain(rendered: dict[str, Rendered]) -> None:
    for case in VALUE_SETS:
        pod = rendered[case].one("Deployment")["spec"]["template"]["spec"]
        grace = build_parser().parse_args(container(rendered[case])["args"]).grace_seconds
        assert pod["terminationGracePeriodSeconds"] > grace, case


def test_deployment_single_replica_recreate(rendered: dict[str, Rendered]) -> None:
    spec = rendered["everything-on"].one("Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_service_ports(rendered: dict[str, Rendered]) -> None:
    ports = {p["name"]: p for p in rendered["existing-resources"].one("Service")["spec"]["ports"]}
    assert (ports["grpc"]["port"], ports["grpc"]["targetPort"]) == (443, "grpc")
    assert (ports["metrics"]["port"], ports["metrics"]["targetPort"]) == (8080, "metrics")
    assert ports["grpc"]["appProtocol"] == "grpc"


def test_service_selects_pod(rendered: dict[str, Rendered]) -> None:
    selector = rendered["defaults"].one("Service")["spec"]["selector"]
    pod_labels = rendered["defaults"].one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()


def test_secret_created_and_mounted(rendered: dict[str, Rendered]) -> None:
    secret = rendered["everything-on"].one("Secret")
    pod = rendered["everything-on"].one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e["value"] for e in container(rendered["everything-on"])["env"]}
    assert set(secret["data"]) == {"token"}
    assert volumes["token"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert env["NANWATCH_TOKEN_FILE"] == "/var/run/secrets/nanwatch/token"


def test_secret_existing_used(rendered: dict[str, Rendered]) -> None:
    pod = rendered["existing-resources"].one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert rendered["existing-resources"].of_kind("Secret") == []
    assert volumes["token"]["secret"]["secretName"] == "nanwatch-token"
    assert volumes["token"]["secret"]["items"] == [{"key": "api-token", "path": "api-token"}]


def test_secret_absent_by_default(rendered: dict[str, Rendered]) -> None:
    pod = rendered["defaults"].one("Deployment")["spec"]["template"]["spec"]
    assert "token" not in {v["name"] for v in pod["volumes"]}
    assert "env" not in container(rendered["defaults"])


def test_persistence_claim(rendered: dict[str, Rendered]) -> None:
    claim = rendered["everything-on"].one("PersistentVolumeClaim")
    pod = rendered["everything-on"].one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_persistence_existing_claim(rendered: dict[str, Rendered]) -> None:
    pod = rendered["existing-resources"].one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert rendered["existing-resources"].of_kind("PersistentVolumeClaim") == []
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "nanwatch-store"


def test_persistence_off_uses_emptydir(rendered: dict[str, Rendered]) -> None:
    pod = rendered["defaults"].one("Deployment")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["data"] == {"name": "data", "emptyDir": {}}


def test_servicemonitor_targets_metrics(rendered: dict[str, Rendered]) -> None:
    monitor = rendered["everything-on"].one("ServiceMonitor")
    service = rendered["everything-on"].one("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # The alert rules and the dashboard select job="nanwatch".
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "nanwatch"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_prometheusrule_carries_rule_file(rendered: dict[str, Rendered]) -> None:
    yaml = require_module("yaml")
    rule = rendered["everything-on"].one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text())


def test_dashboard_configmap_sidecar(rendered: dict[str, Rendered]) -> None:
    configmap = rendered["everything-on"].one("ConfigMap", f"{FULL_FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Training"}
    assert json.loads(configmap["data"]["nanwatch.json"]) == json.loads(DASHBOARD_FILE.read_text())


def test_dashboard_configmap_switch(rendered: dict[str, Rendered]) -> None:
    names = [obj["metadata"]["name"] for obj in rendered["existing-resources"].of_kind("ConfigMap")]
    assert names == ["watcher"]


def test_notes_endpoint_and_warnings(rendered: dict[str, Rendered]) -> None:
    notes = rendered["defaults"].notes
    assert f"NANWATCH_ENDPOINT={FULL_FULLNAME}.{NAMESPACE}.svc:50051" in notes
    assert "exits with code 42" in notes
    assert "persistence.enabled is false" in notes
    assert "persistence.enabled is false" not in rendered["everything-on"].notes
