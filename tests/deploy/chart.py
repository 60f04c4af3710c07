"""Render the Helm chart offline with helm-python-sdk and index the manifests by kind and name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.deploy.tools import CHART_DIR, require_module

RELEASE = "nw"
NAMESPACE = "ml-platform"
NOTES = "nanwatch/templates/NOTES.txt"


@dataclass(frozen=True, slots=True)
class Rendered:
    """Manifests of one render: objects in template order, plus the NOTES.txt text."""

    objects: list[dict[str, Any]]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        """Return the only object of this kind (and name), failing with the kinds that were rendered."""
        matches = [obj for obj in self.of_kind(kind) if name is None or obj["metadata"]["name"] == name]
        rendered = sorted((obj["kind"], obj["metadata"]["name"]) for obj in self.objects)
        assert len(matches) == 1, f"expected one {kind} {name or ''}, rendered: {rendered}"
        return matches[0]


def render_chart(values: dict[str, Any] | None = None) -> Rendered:
    """Render the chart as `helm install` would, without a cluster; values go through values.schema.json."""
    helm = require_module("helm_python")
    yaml = require_module("yaml")
    manifests = helm.Chart.load(str(CHART_DIR)).render(
        values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    objects: list[dict[str, Any]] = []
    for path in sorted(manifests):
        if path == NOTES:
            continue
        objects.extend(doc for doc in yaml.safe_load_all(manifests[path]) if doc)
    return Rendered(objects=objects, notes=manifests.get(NOTES, ""))


def container(rendered: Rendered) -> dict[str, Any]:
    """The nanwatch container of the Deployment."""
    containers = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["nanwatch"]
    return containers[0]
