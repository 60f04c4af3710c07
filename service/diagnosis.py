"""Choice of the primary cause among the findings of an incident."""

from __future__ import annotations

from collections.abc import Sequence

from nanwatch.v1 import nanwatch_pb2 as pb

_STATIC_STAGES = (pb.STAGE_INITIALIZATION, pb.STAGE_LOSS, pb.STAGE_HYPERPARAMETERS)
_SERIOUS = (pb.SEVERITY_WARNING, pb.SEVERITY_CRITICAL)


def choose_primary(findings: Sequence[pb.Finding], halt_step: int | None) -> pb.Finding | None:
    """Return the primary cause of an incident, or None when there is no finding.

    The order follows the flow input -> initialization -> loss/activation ->
    hyperparameters -> gradients -> monitoring:
    1. a data finding (stage 1) at or before halt_step (any step when None);
    2. the earliest-stage warning or critical finding of stages 2-4 (static causes);
    3. stage 5, then stage 6; findings after halt_step rank last.
    Within a tier, critical comes before warning, then the earliest step, then the
    lowest rank. INFO findings are chosen only when nothing else exists.
    """
    if not findings:
        return None
    return min(findings, key=lambda finding: _rank_key(finding, halt_step))


def _rank_key(finding: pb.Finding, halt_step: int | None) -> tuple[int, int, int, int, int]:
    evidence = finding.evidence
    return (
        _tier(finding, halt_step),
        int(finding.stage),
        -int(finding.severity),
        evidence.step,
        evidence.rank,
    )


def _tier(finding: pb.Finding, halt_step: int | None) -> int:
    """Return 0 for data before the halt, 1 for static causes, 2 for the rest, 3 for late or INFO findings."""
    if finding.severity not in _SERIOUS:
        return 3
    is_after_halt = halt_step is not None and finding.evidence.step > halt_step
    if finding.stage == pb.STAGE_DATA:
        return 3 if is_after_halt else 0
    if finding.stage in _STATIC_STAGES:
        return 1
    return 3 if is_after_halt else 2
