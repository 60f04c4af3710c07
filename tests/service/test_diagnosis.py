"""Tests of choose_primary: the primary cause along the flow of the stages."""

from __future__ import annotations

from nanwatch.service.checks.catalog import Where, new_finding
from nanwatch.service.diagnosis import choose_primary
from nanwatch.v1 import nanwatch_pb2 as pb

CRITICAL = pb.SEVERITY_CRITICAL
WARNING = pb.SEVERITY_WARNING


def _finding(code: str, severity: int, step: int = -1, rank: int = 0) -> pb.Finding:
    return new_finding(code, severity, Where(run_id="r", rank=rank, step=step), message=code, fix="")


def test_empty_none() -> None:
    assert choose_primary([], 3) is None


def test_data_outranks_downstream() -> None:
    findings = [_finding("LR_TOO_HIGH", WARNING), _finding("LOSS_NONFINITE", CRITICAL, 10),
                _finding("GRAD_NONFINITE", CRITICAL, 10), _finding("DATA_NONFINITE", CRITICAL, 10)]
    assert choose_primary(findings, 10).code == "DATA_NONFINITE"


def test_data_after_halt_demoted() -> None:
    findings = [_finding("DATA_NONFINITE", CRITICAL, 12), _finding("GRAD_NONFINITE", CRITICAL, 10)]
    assert choose_primary(findings, 10).code == "GRAD_NONFINITE"


def test_static_before_dynamic() -> None:
    findings = [_finding("LOSS_NONFINITE", CRITICAL, 0), _finding("INIT_ALL_ZERO", WARNING)]
    assert choose_primary(findings, 0).code == "INIT_ALL_ZERO"


def test_earliest_static_stage() -> None:
    findings = [_finding("LR_TOO_HIGH", WARNING), _finding("LOSS_SIGMOID_BCE", WARNING), _finding("INIT_SCALE", WARNING)]
    assert choose_primary(findings, None).code == "INIT_SCALE"


def test_gradients_before_monitoring() -> None:
    findings = [_finding("LOSS_NONFINITE", CRITICAL, 46), _finding("GRAD_NONFINITE", CRITICAL, 46)]
    assert choose_primary(findings, 46).code == "GRAD_NONFINITE"


def test_critical_before_warning_in_stage() -> None:
    findings = [_finding("GRAD_EXPLODING", WARNING, 3), _finding("GRAD_NONFINITE", CRITICAL, 9)]
    assert choose_primary(findings, 9).code == "GRAD_NONFINITE"


def test_earliest_step_then_rank() -> None:
    findings = [_finding("GRAD_NONFINITE", CRITICAL, 9, rank=0), _finding("GRAD_NONFINITE", CRITICAL, 8, rank=3),
                _finding("GRAD_NONFINITE", CRITICAL, 8, rank=1)]
    primary = choose_primary(findings, 9)
    assert primary.evidence.step == 8
    assert primary.evidence.rank == 1


def test_info_only_chosen_last() -> None:
    info = _finding("GRAD_EXPLODING", pb.SEVERITY_INFO, 2)
    assert choose_primary([info], None) is info
    assert choose_primary([info, _finding("LOSS_NONFINITE", CRITICAL, 5)], 5).code == "LOSS_NONFINITE"
