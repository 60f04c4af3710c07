"""Bring the thresholds section of the chart's values.schema.json in line with the service's Thresholds.

Run after adding, removing or retyping a field of nanwatch.service.thresholds.Thresholds:
    python deploy/helm/sync_values_schema.py
A field that is already in the schema keeps its range constraints. A new field gets
its JSON type only, so the service checks its range when it loads the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from nanwatch.service.thresholds import Thresholds

logger = logging.getLogger(__name__)

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "helm" / "nanwatch" / "values.schema.json"


def json_type(annotation: Any) -> str:
    """JSON schema type of a Thresholds field annotation ("int" or "float")."""
    return "integer" if annotation in ("int", int) else "number"


def thresholds_properties(existing: dict[str, Any]) -> dict[str, Any]:
    """Schema properties for every Thresholds field, in field order, keeping known constraints."""
    properties: dict[str, Any] = {}
    for field in dataclasses.fields(Thresholds):
        entry = dict(existing.get(field.name, {}))
        entry["type"] = json_type(field.type)
        properties[field.name] = entry
    return properties


def sync(schema_file: Path = SCHEMA_FILE) -> bool:
    """Rewrite the schema file if its thresholds properties differ; return whether it changed."""
    schema = json.loads(schema_file.read_text())
    section = schema["properties"]["thresholds"]
    updated = thresholds_properties(section["properties"])
    if updated == section["properties"]:
        return False
    section["properties"] = updated
    schema_file.write_text(json.dumps(schema, indent=2) + "\n")
    return True


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    changed = sync()
    logger.info("%s %s", "updated" if changed else "already in line:", SCHEMA_FILE)
