"""Choice of the primary cause among the findings of an incident."""

from __future__ import annotations

from collections.abc import Sequence

from nanwatch.service.checks.localization import is_domain_error
from nanwatch.v1 import nanwatch_pb2 as pb

_STATIC_STAGES = (pb.STAGE_INITIALIZATION, pb.STAGE_LOSS, pb.STAGE_HYPERPARAMETERS)
_SERIOUS = (pb.SEVERITY_WARNING, pb.SEVERITY_CRITICAL)
# Warnings that describe a consequence or a quality problem, never the origin of a NaN/Inf:
# a double softmax only slows learning, and clipping a non-finite norm only spreads it.
NON_CAUSAL_CODES = frozenset({"LOSS_DOUBLE_SOFTMAX", "GRAD_CLIP_NONFINITE", "GRAD_NO_CLIPPING"})
# A forward overflow at run time is often the end of a growth that earlier findings caught.
# When one of these came at an earlier step, it is the primary cause instead.
_OVERFLOW_SYMPTOMS = frozenset({"FORWARD_NONFINITE"})
_GROWTH_CODES = frozenset({"GRAD_EXPLODING", "GRAD_GROWTH", "UPDATE_RATIO_HIGH", "LOSS_DIVERGING"})
# Data warnings about the whole input distribution rank with the static causes, not with
# the non-finite values of the failing batch.
_DATA_DISTRIBUTION_CODES = frozenset({"DATA_NOT_NORMALIZED"})


def choose_primary(findings: Sequence[pb.Finding], halt_step: int | None) -> pb.Finding | None:
    """Return the primary cause of an incident, or None when there is no finding.

    The order follows the flow input -> initialization -> loss/activation ->
    hyperparameters -> gradients -> monitoring:
    1. a data finding (stage 1) at or before halt_step (any step when None);
    2. the earliest-stage warning or critical finding of stages 2-4: first the static
       causes from registration and the first forward pass, then run-time stage-3/4
       causes (a log of 0 in the loss, a NaN born in backward, a huge update), then
       a whole-input warning such as DATA_NOT_NORMALIZED;
    3. stage 5, then stage 6; findings after halt_step rank last.
    Within a tier and stage, a finding located by a replay comes first, then critical
    before warning, then the earliest step, then the lowest rank. INFO findings and NON_CAUSAL_CODES are chosen only when nothing else exists.
    """
    if not findings:
        return None
    if any(_is_located(finding) for finding in findings):
        # The replay names the operation; the first-pass check only saw leaf module outputs.
        findings = [finding for finding in findings
                    if not (finding.code in _OVERFLOW_SYMPTOMS and finding.evidence.step < 0)] or list(findings)
    primary = min(findings, key=lambda finding: _rank_key(finding, halt_step))
    # A replay that located a log of 0 or a division by 0 names a cause that growth does not explain.
    is_located_domain_error = primary.evidence.HasField("location") and is_domain_error(primary.evidence.location)
    if primary.code in _OVERFLOW_SYMPTOMS and not is_located_domain_error:
        return _earlier_growth(findings, primary) or primary
    return primary


def _is_located(finding: pb.Finding) -> bool:
    """Return True for a finding whose evidence carries a location that a replay reproduced."""
    return finding.evidence.HasField("location") and finding.evidence.location.reproduced


def _earlier_growth(findings: Sequence[pb.Finding], symptom: pb.Finding) -> pb.Finding | None:
    """Return the earliest growth warning seen before a forward overflow, which explains it."""
    growth = [
        finding for finding in findings
        if finding.code in _GROWTH_CODES and finding.severity in _SERIOUS
        and 0 <= finding.evidence.step < symptom.evidence.step
    ]
    return min(growth, key=lambda finding: (finding.evidence.step, finding.evidence.rank), default=None)


def _rank_key(finding: pb.Finding, halt_step: int | None) -> tuple[int, ...]:
    evidence = finding.evidence
    stage = int(finding.stage)
    if finding.code in _DATA_DISTRIBUTION_CODES:
        stage = int(pb.STAGE_MONITORING) + 1  # after every static cause of stages 2-4
    tier = _tier(finding, halt_step)
    # In tier 1 a static cause (step -1) explains a run-time stage-3/4 symptom, such as a
    # forward overflow after a too-high learning rate grew the weights, so it comes first.
    is_runtime = int(tier == 1 and evidence.step >= 0)
    # A rank that replayed the step and found the origin beats another rank's guess, such as
    # non-finite gradients that reached a healthy rank through the all-reduce.
    is_unlocated = int(not _is_located(finding))
    return (
        tier,
        is_runtime,
        stage,
        is_unlocated,
        -int(finding.severity),
        evidence.step,
        evidence.rank,
    )


def _tier(finding: pb.Finding, halt_step: int | None) -> int:
    """Return 0 for data before the halt, 1 for stage 2-4 causes, 2 for the rest, 3 for late, INFO or non-causal findings."""
    if finding.severity not in _SERIOUS or finding.code in NON_CAUSAL_CODES:
        return 3
    is_after_halt = halt_step is not None and finding.evidence.step > halt_step
    if is_after_halt:
        return 3
    if finding.code in _DATA_DISTRIBUTION_CODES:
        return 1
    if finding.stage == pb.STAGE_DATA:
        return 0
    if finding.stage in _STATIC_STAGES:
        return 1
    return 2
