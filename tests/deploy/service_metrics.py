"""Names of the series the service exposes, from its own metric registry."""

from __future__ import annotations

from nanwatch.service.metrics import ServiceMetrics

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exposed_metric_names() -> set[str]:
    """Every sample name the service's /metrics can carry, such as nanwatch_halts_total."""
    names: set[str] = set()
    for family in ServiceMetrics().registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names
