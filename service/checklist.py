"""The staged checklist: one PASS/WARN/FAIL/NOT_RUN row per check of the catalog."""

from __future__ import annotations

from collections.abc import Sequence

from nanwatch.service.checks.catalog import CHECKS, CheckSpec
from nanwatch.v1 import nanwatch_pb2 as pb

_MAX_EVIDENCE_VALUES = 4


def build_checklist(findings: Sequence[pb.Finding], evaluated_codes: set[str]) -> list[pb.CheckResult]:
    """Return one CheckResult per CheckSpec in stage order.

    A row is FAIL with a critical finding, WARN with a warning, PASS when its
    check has had input (its code is in evaluated_codes, or it has only INFO
    findings), else NOT_RUN. FAIL and WARN rows carry a summary of their worst
    finding (critical first, then the earliest step, then the lowest rank) and
    that finding's fix. A PASS row with INFO findings carries the summary of the
    earliest one, prefixed "info: ", so that a reader sees why the check noted it.
    """
    by_code: dict[str, list[pb.Finding]] = {}
    for finding in findings:
        by_code.setdefault(finding.code, []).append(finding)
    return [_build_row(spec, by_code.get(spec.code, []), evaluated_codes) for spec in CHECKS]


def _build_row(spec: CheckSpec, findings: list[pb.Finding], evaluated_codes: set[str]) -> pb.CheckResult:
    row = pb.CheckResult(stage=spec.stage, code=spec.code, check=spec.name)
    worst = worst_finding(findings)
    if worst is not None and worst.severity == pb.SEVERITY_CRITICAL:
        row.state = pb.CHECK_STATE_FAIL
    elif worst is not None and worst.severity == pb.SEVERITY_WARNING:
        row.state = pb.CHECK_STATE_WARN
    elif findings or spec.code in evaluated_codes:
        row.state = pb.CHECK_STATE_PASS
        if worst is not None:
            row.evidence = f"info: {summarize(worst, len(findings))}"
        return row
    else:
        row.state = pb.CHECK_STATE_NOT_RUN
        return row
    row.evidence = summarize(worst, len(findings))
    row.fix = worst.fix or spec.fix
    return row


def worst_finding(findings: Sequence[pb.Finding]) -> pb.Finding | None:
    """Return the most severe finding, the earliest step and lowest rank first among equals."""
    if not findings:
        return None
    return min(findings, key=lambda f: (-int(f.severity), f.evidence.step, f.evidence.rank))


def summarize(finding: pb.Finding, count: int) -> str:
    """Return a one-line summary: rank, step, tensor or layer, key values and the number of findings."""
    evidence = finding.evidence
    parts = [f"rank {evidence.rank}", "before step 0" if evidence.step < 0 else f"step {evidence.step}"]
    if evidence.tensor:
        parts.append(f"tensor {evidence.tensor}")
    if evidence.layer and evidence.layer != evidence.tensor:
        parts.append(f"layer {evidence.layer}")
    # Protobuf maps do not keep insertion order, so sort for a stable summary.
    shown = sorted(evidence.values.items())[:_MAX_EVIDENCE_VALUES]
    if shown:
        parts.append(" ".join(f"{key}={value}" for key, value in shown))
    summary = ", ".join(parts)
    if count > 1:
        summary += f" ({count} findings)"
    return summary
