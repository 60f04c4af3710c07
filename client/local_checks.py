"""Pure decision functions for a halt: reason codes, sources and messages."""

from __future__ import annotations

import enum
from collections.abc import Sequence

from nanwatch.v1 import nanwatch_pb2 as pb


class Reason(enum.IntFlag):
    """Causes of a halt, as bits of the code that each rank shares with the others."""

    DATA = 1
    LOSS = 2
    GRADIENT = 4
    PARAMETERS = 8
    SERVICE = 16


REASON_TEXT: dict[Reason, str] = {
    Reason.DATA: "non-finite batch data",
    Reason.LOSS: "non-finite loss",
    Reason.GRADIENT: "non-finite gradient",
    Reason.PARAMETERS: "non-finite parameters after the previous update",
    Reason.SERVICE: "HALT signal from the nanwatch service",
}

_FINDING_CODES: dict[Reason, tuple[str, int]] = {
    Reason.DATA: ("DATA_NONFINITE", pb.STAGE_DATA),
    Reason.LOSS: ("LOSS_NONFINITE", pb.STAGE_MONITORING),
    Reason.GRADIENT: ("GRAD_NONFINITE", pb.STAGE_GRADIENTS),
    Reason.PARAMETERS: ("PARAM_NONFINITE", pb.STAGE_HYPERPARAMETERS),
}


def describe_reasons(code: int) -> str:
    """Return the reasons set in code as a comma-separated phrase."""
    return ", ".join(text for reason, text in REASON_TEXT.items() if code & reason)


def service_halt_due(halt_step: int | None, step: int) -> bool:
    """Return True when a received HALT applies to this step (its halt_step <= step)."""
    return halt_step is not None and halt_step <= step


def choose_source(codes: Sequence[int], own_index: int) -> str:
    """Return the HaltError source: "local", "service" or "agreed".

    "local" wins when this rank's own checks fired; "service" when any rank got
    a HALT signal; "agreed" when only other ranks saw a problem.
    """
    own = codes[own_index]
    if own & ~Reason.SERVICE:
        return "local"
    if any(code & Reason.SERVICE for code in codes):
        return "service"
    return "agreed"


def summarize_ranks(codes: Sequence[int], rank_names: Sequence[int]) -> str:
    """Return "rank 1: non-finite batch data; rank 3: ..." for ranks with a non-zero code."""
    parts = [
        f"rank {rank_names[index]}: {describe_reasons(code)}"
        for index, code in enumerate(codes)
        if code
    ]
    return "; ".join(parts)


def build_halt_reason(codes: Sequence[int], own_index: int, rank_names: Sequence[int], details: str) -> str:
    """Return the one-line reason of a HaltError: who saw what, plus this rank's details."""
    reason = summarize_ranks(codes, rank_names)
    if details and codes[own_index]:
        reason = f"{reason} ({details})"
    return reason


def first_local_reason(code: int) -> Reason | None:
    """Return the earliest local cause in code (data before loss before gradient), or None."""
    for reason in (Reason.DATA, Reason.LOSS, Reason.GRADIENT, Reason.PARAMETERS):
        if code & reason:
            return reason
    return None


def build_local_finding(
    *, code: int, run_id: str, rank: int, step: int, message: str, evidence: pb.Evidence | None = None
) -> pb.Finding | None:
    """Return a critical Finding for the first local cause in code, or None if there is none."""
    reason = first_local_reason(code)
    if reason is None:
        return None
    finding_code, stage = _FINDING_CODES[reason]
    finding = pb.Finding(stage=stage, severity=pb.SEVERITY_CRITICAL, code=finding_code, message=message)
    if evidence is not None:
        finding.evidence.CopyFrom(evidence)
    finding.evidence.run_id = run_id
    finding.evidence.rank = rank
    finding.evidence.step = step
    return finding
