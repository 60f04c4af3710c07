"""Render runs, run status and findings as text tables or stable JSON."""

from __future__ import annotations

import math
from typing import Any

from nanwatch.v1 import nanwatch_pb2 as pb

STAGE_NAMES = {
    1: "data",
    2: "initialization",
    3: "loss/activation",
    4: "hyperparameters",
    5: "gradients",
    6: "monitoring",
}
STATE_NAMES = {
    pb.CHECK_STATE_PASS: "pass",
    pb.CHECK_STATE_WARN: "warn",
    pb.CHECK_STATE_FAIL: "fail",
    pb.CHECK_STATE_NOT_RUN: "not run",
}
MAX_CELL = 70


def severity_name(severity: int) -> str:
    return pb.Severity.Name(severity).removeprefix("SEVERITY_").lower()


def finding_to_json(finding: pb.Finding) -> dict[str, Any]:
    evidence = finding.evidence
    return {
        "id": finding.id,
        "stage": finding.stage,
        "stage_name": STAGE_NAMES.get(finding.stage, "other"),
        "severity": severity_name(finding.severity),
        "code": finding.code,
        "message": finding.message,
        "fix": finding.fix,
        "evidence": {
            "run_id": evidence.run_id,
            "rank": evidence.rank,
            "step": evidence.step,
            "tensor": evidence.tensor,
            "layer": evidence.layer,
            "values": dict(evidence.values),
            "sample_indices": list(evidence.sample_indices),
            "location": location_to_json(evidence.location) if evidence.HasField("location") else None,
        },
        "created_unix_s": finding.created_unix_s,
    }


LOCATION_PHASE_NAMES = {
    pb.LOCATION_PHASE_INPUT: "input",
    pb.LOCATION_PHASE_PARAMETER: "parameter",
    pb.LOCATION_PHASE_FORWARD: "forward",
    pb.LOCATION_PHASE_LOSS_FORWARD: "loss_forward",
    pb.LOCATION_PHASE_BACKWARD: "backward",
    pb.LOCATION_PHASE_LOSS_BACKWARD: "loss_backward",
    pb.LOCATION_PHASE_NOT_REPRODUCED: "not_reproduced",
}


def location_to_json(location: pb.Location) -> dict[str, Any]:
    """Return a Location as JSON; empty strings become null."""
    return {
        "phase": LOCATION_PHASE_NAMES.get(location.phase, "unknown"),
        "rank": location.rank,
        "step": location.step,
        "module": location.module or None,
        "module_type": location.module_type or None,
        "parameter": location.parameter or None,
        "op": location.op or None,
        "source_line": location.source or None,
        "code": location.code or None,
        "produced": location.produced or None,
        "then_op": location.then_op or None,
        "tensor": location.tensor or None,
        "after_loss": location.after_loss or None,
        "reproduced": location.reproduced,
        "detail": location.detail,
    }


def incident_location(status: pb.RunStatus) -> pb.Location | None:
    """Return the primary finding's location, else the location replayed at the halt step, else None."""
    summary = status.summary
    if summary.HasField("primary") and summary.primary.evidence.HasField("location"):
        return summary.primary.evidence.location
    located = [finding.evidence.location for finding in status.findings if finding.evidence.HasField("location")]
    at_halt = [location for location in located if summary.halted and location.step == summary.halt_step]
    return (at_halt or located or [None])[0]


def summary_to_json(summary: pb.RunSummary) -> dict[str, Any]:
    return {
        "run_id": summary.run_id,
        "world_size": summary.world_size,
        "halted": summary.halted,
        "halt_step": summary.halt_step if summary.halted else None,
        "last_step": summary.last_step,
        "finding_count": summary.finding_count,
        "created_unix_s": summary.created_unix_s,
        "primary": finding_to_json(summary.primary) if summary.HasField("primary") else None,
    }


def status_to_json(status: pb.RunStatus) -> dict[str, Any]:
    """Return the documented JSON form of a run status (see the README's status fields)."""
    document = summary_to_json(status.summary)
    location = incident_location(status)
    if document["primary"] is not None:
        document["primary"]["location"] = location_to_json(location) if location is not None else None
    document["halt_reason"] = status.halt_reason or None
    document["halt_first_rank"] = status.halt_first_rank if status.halt_first_rank >= 0 else None
    document["stages"] = [
        {
            "stage": stage,
            "stage_name": name,
            "state": _worst_state([check for check in status.checks if check.stage == stage]),
            "checks": [_check_to_json(check) for check in status.checks if check.stage == stage],
        }
        for stage, name in STAGE_NAMES.items()
    ]
    document["findings"] = [finding_to_json(finding) for finding in status.findings]
    document["ranks"] = [
        {
            "rank": rank.rank,
            "host": rank.host,
            "last_step": rank.last_step,
            "last_loss": _finite_or_none(rank.last_loss),
            "last_grad_norm": _finite_or_none(rank.last_grad_norm),
            "connected": rank.connected,
        }
        for rank in status.ranks
    ]
    return document


def render_status(status: pb.RunStatus) -> str:
    summary = status.summary
    lines = [f"run {summary.run_id}  world_size {summary.world_size}  last step {_step_or_none(summary.last_step)}"]
    if summary.halted:
        first = f", cause seen on rank {status.halt_first_rank}" if status.halt_first_rank >= 0 else ""
        lines.append(f"HALTED at step {summary.halt_step}{first}; triggered by {status.halt_reason}")
    else:
        lines.append("not halted")
    if summary.HasField("primary"):
        primary = summary.primary
        lines.append(
            f"primary cause: stage {primary.stage} ({STAGE_NAMES.get(primary.stage, 'other')}) "
            f"{primary.code}: {primary.message}"
        )
        lines.append(f"  fix: {primary.fix}")
    location = incident_location(status)
    if location is not None:
        lines.append(f"  location: {describe_location(location)}")
    lines.append("")
    rows = [
        [f"{check.stage} {STAGE_NAMES.get(check.stage, '')}", check.check, STATE_NAMES.get(check.state, "?"),
         _clip(check.evidence), _clip(check.fix)]
        for check in status.checks
    ]
    lines.append(render_table(["STAGE", "CHECK", "STATE", "EVIDENCE", "FIX"], rows))
    if status.findings:
        lines.append("")
        lines.append("findings:")
        for finding in status.findings:
            lines.append(f"- [{severity_name(finding.severity)}] stage {finding.stage} {finding.code} "
                         f"(rank {finding.evidence.rank}, {_step_text(finding.evidence.step)}): {finding.message}")
            lines.append(f"  fix: {finding.fix}")
    return "\n".join(lines)


def describe_location(location: pb.Location) -> str:
    """Return one line: phase, module, operation with its source line, first bad gradient, replaying rank."""
    parts = [LOCATION_PHASE_NAMES.get(location.phase, "unknown")]
    if location.module:
        parts.append(f"module '{location.module}' ({location.module_type})")
    if location.op:
        parts.append(f"op {location.op}" + (f" at {location.source}" if location.source else ""))
    if location.code:
        parts.append(f"`{location.code}`")
    if location.tensor:
        parts.append(f"tensor {location.tensor}")
    if location.after_loss:
        parts.append(f"in code after {location.after_loss}")
    if location.parameter:
        parts.append(f"first non-finite gradient: {location.parameter}")
    parts.append(f"replayed on rank {location.rank}")
    return "; ".join(parts)


def _step_or_none(step: int) -> str:
    """Return step as text, or "-" for -1, the API's value for a run that has not reported a step."""
    return "-" if step < 0 else str(step)


def render_runs(runs: list[pb.RunSummary]) -> str:
    rows = [
        [
            run.run_id,
            str(run.world_size),
            _step_or_none(run.last_step),
            f"halted at {run.halt_step}" if run.halted else "not halted",
            str(run.finding_count),
            f"{run.primary.code} (stage {run.primary.stage})" if run.HasField("primary") else "-",
        ]
        for run in runs
    ]
    return render_table(["RUN", "WORLD", "LAST STEP", "STATE", "FINDINGS", "PRIMARY"], rows)


def render_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _step_text(step: int) -> str:
    return "before step 0" if step < 0 else f"step {step}"


def _check_to_json(check: pb.CheckResult) -> dict[str, Any]:
    return {
        "code": check.code,
        "check": check.check,
        "state": STATE_NAMES.get(check.state, "unknown"),
        "evidence": check.evidence,
        "fix": check.fix,
    }


def _worst_state(checks: list[pb.CheckResult]) -> str:
    for state in (pb.CHECK_STATE_FAIL, pb.CHECK_STATE_WARN, pb.CHECK_STATE_PASS):
        if any(check.state == state for check in checks):
            return STATE_NAMES[state]
    return STATE_NAMES[pb.CHECK_STATE_NOT_RUN]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
