"""Tests of build_checklist: one row per check with its state, evidence and fix."""

from __future__ import annotations

from nanwatch.service.checklist import build_checklist
from nanwatch.service.checks.catalog import CHECKS, Where, new_finding
from nanwatch.v1 import nanwatch_pb2 as pb


def _rows(findings: list[pb.Finding], evaluated: set[str]) -> dict[str, pb.CheckResult]:
    return {row.code: row for row in build_checklist(findings, evaluated)}


def test_one_row_per_check() -> None:
    rows = build_checklist([], set())
    assert [row.code for row in rows] == [spec.code for spec in CHECKS]


def test_not_run_without_input() -> None:
    row = _rows([], set())["GRAD_NONFINITE"]
    assert row.state == pb.CHECK_STATE_NOT_RUN
    assert row.evidence == ""


def test_pass_when_evaluated() -> None:
    row = _rows([], {"GRAD_NONFINITE"})["GRAD_NONFINITE"]
    assert row.state == pb.CHECK_STATE_PASS
    assert row.check == "Gradients are finite"


def test_fail_shows_worst() -> None:
    where_late = Where(run_id="r", rank=0, step=12)
    where_early = Where(run_id="r", rank=1, step=10)
    findings = [
        new_finding("DATA_NONFINITE", pb.SEVERITY_CRITICAL, where_late, message="late", fix="fix late",
                    tensor="inputs", values={"nan_count": "1"}),
        new_finding("DATA_NONFINITE", pb.SEVERITY_CRITICAL, where_early, message="early", fix="fix targets",
                    tensor="targets", values={"nan_count": "2", "inf_count": "0"}),
    ]
    row = _rows(findings, {"DATA_NONFINITE"})["DATA_NONFINITE"]
    assert row.state == pb.CHECK_STATE_FAIL
    assert row.evidence == "rank 1, step 10, tensor targets, inf_count=0 nan_count=2 (2 findings)"
    assert row.fix == "fix targets"


def test_warn_static_evidence() -> None:
    finding = new_finding("INIT_ALL_ZERO", pb.SEVERITY_WARNING, Where(run_id="r", rank=0), message="m",
                          fix="init 4.weight", tensor="4.weight", layer="4")
    row = _rows([finding], set())["INIT_ALL_ZERO"]
    assert row.state == pb.CHECK_STATE_WARN
    assert row.evidence == "rank 0, before step 0, tensor 4.weight, layer 4"


def test_critical_beats_warning() -> None:
    where = Where(run_id="r", rank=0, step=3)
    findings = [new_finding("GRAD_NONFINITE", pb.SEVERITY_WARNING, where, message="w", fix="w"),
                new_finding("GRAD_NONFINITE", pb.SEVERITY_CRITICAL, where, message="c", fix="c")]
    assert _rows(findings, set())["GRAD_NONFINITE"].state == pb.CHECK_STATE_FAIL


def test_info_only_passes() -> None:
    finding = new_finding("GRAD_EXPLODING", pb.SEVERITY_INFO, Where(run_id="r", rank=0, step=1), message="i", fix="")
    row = _rows([finding], set())["GRAD_EXPLODING"]
    assert row.state == pb.CHECK_STATE_PASS
    assert row.evidence.startswith("info: rank 0, step 1")


def test_plain_pass_has_no_evidence() -> None:
    row = _rows([], {"GRAD_EXPLODING"})["GRAD_EXPLODING"]
    assert row.state == pb.CHECK_STATE_PASS
    assert row.evidence == ""
