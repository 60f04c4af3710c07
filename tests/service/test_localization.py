"""Findings from a replayed step's location, and how the location drives the primary cause."""

from __future__ import annotations

import pytest

from nanwatch.service.checks.catalog import Where, new_finding
from nanwatch.service.checks.localization import apply_location, code_for
from nanwatch.service.diagnosis import choose_primary
from nanwatch.v1 import nanwatch_pb2 as pb

WHERE = Where(run_id="r", rank=1, step=7)


def _report(**location: object) -> pb.StepReport:
    report = pb.StepReport(step=7)
    report.location.CopyFrom(pb.Location(**{"rank": 1, "step": 7, "reproduced": True, **location}))
    return report


def _finding(code: str, step: int = 7, severity: int = pb.SEVERITY_CRITICAL) -> pb.Finding:
    return new_finding(code, severity, Where(run_id="r", rank=1, step=step), message=code, fix="fix")


@pytest.mark.parametrize(("location", "code"), [
    ({"phase": pb.LOCATION_PHASE_FORWARD, "op": "torch.log", "produced": "-inf"}, "FORWARD_NONFINITE"),
    ({"phase": pb.LOCATION_PHASE_FORWARD, "op": "Tensor.masked_fill_", "produced": "-inf",
      "then_op": "torch.softmax"}, "LOSS_MASKED_SOFTMAX"),
    ({"phase": pb.LOCATION_PHASE_LOSS_FORWARD, "op": "torch.log", "produced": "-inf"}, "LOSS_LOG_ZERO"),
    ({"phase": pb.LOCATION_PHASE_LOSS_FORWARD, "op": "Tensor.div", "produced": "nan"}, "LOSS_UNDEFINED"),
    ({"phase": pb.LOCATION_PHASE_LOSS_FORWARD, "op": "Tensor.pow", "produced": "nan"}, "LOSS_UNDEFINED"),
    ({"phase": pb.LOCATION_PHASE_LOSS_FORWARD, "op": "torch.nn.functional.mse_loss", "produced": "inf"},
     "LOSS_NONFINITE"),
    ({"phase": pb.LOCATION_PHASE_BACKWARD, "op": "SqrtBackward0", "produced": "inf"}, "LOSS_BACKWARD_NONFINITE"),
    ({"phase": pb.LOCATION_PHASE_BACKWARD, "op": "AddmmBackward0", "produced": "inf"}, "GRAD_NONFINITE"),
    ({"phase": pb.LOCATION_PHASE_LOSS_BACKWARD, "produced": "nan,inf"}, "LOSS_BACKWARD_NONFINITE"),
    ({"phase": pb.LOCATION_PHASE_INPUT, "tensor": "args[0]"}, "DATA_NONFINITE"),
    ({"phase": pb.LOCATION_PHASE_PARAMETER, "tensor": "fc.weight"}, "PARAM_NONFINITE"),
    ({"phase": pb.LOCATION_PHASE_NOT_REPRODUCED}, "REPLAY_NOT_REPRODUCED"),
    ({"phase": pb.LOCATION_PHASE_LOSS_BACKWARD, "produced": "nan,inf", "after_loss": "CrossEntropyLoss"},
     "LOSS_UNDEFINED"),
])
def test_code_for_location(location: dict[str, object], code: str) -> None:
    assert code_for(pb.Location(**location)) == code


def test_forward_location_adds_stage3_finding() -> None:
    report = _report(phase=pb.LOCATION_PHASE_FORWARD, module="blocks.2.features", op="torch.log", produced="-inf",
                     source="model.py:13", code="return torch.log(x)")
    findings = apply_location(report, [_finding("LOSS_NONFINITE")], WHERE)
    located = [finding for finding in findings if finding.code == "FORWARD_NONFINITE"]
    assert len(located) == 1
    assert located[0].stage == pb.STAGE_LOSS
    assert located[0].severity == pb.SEVERITY_CRITICAL
    assert located[0].evidence.layer == "blocks.2.features"
    assert "model.py:13" in located[0].fix


def test_location_attached_to_step_findings() -> None:
    report = _report(phase=pb.LOCATION_PHASE_FORWARD, module="m", op="torch.log", produced="-inf")
    findings = apply_location(report, [_finding("LOSS_NONFINITE"), _finding("LOSS_SPIKE", step=3)], WHERE)
    by_code = {finding.code: finding for finding in findings}
    assert by_code["LOSS_NONFINITE"].evidence.location.module == "m"
    assert not by_code["LOSS_SPIKE"].evidence.HasField("location")


def test_location_replaces_guessed_code() -> None:
    report = _report(phase=pb.LOCATION_PHASE_FORWARD, module="attention", op="Tensor.masked_fill_",
                     produced="-inf", then_op="torch.nn.functional.multi_head_attention_forward")
    findings = apply_location(report, [_finding("FORWARD_NONFINITE", severity=pb.SEVERITY_WARNING)], WHERE)
    assert [finding.code for finding in findings] == ["LOSS_MASKED_SOFTMAX"]


@pytest.mark.parametrize("guessed", ["LOSS_BACKWARD_NONFINITE", "LOSS_UNDEFINED"])
def test_after_loss_replaces_guessed_text(guessed: str) -> None:
    report = _report(phase=pb.LOCATION_PHASE_LOSS_BACKWARD, produced="nan,inf", after_loss="CrossEntropyLoss",
                     detail="code after CrossEntropyLoss made NaN/Inf")
    findings = apply_location(report, [_finding(guessed), _finding("GRAD_NONFINITE")], WHERE)
    primary = choose_primary(findings, 7)
    assert primary is not None
    assert primary.code == "LOSS_UNDEFINED"
    assert "code after CrossEntropyLoss" in primary.message
    assert "before backward()" in primary.fix


def test_location_enriches_same_origin_finding() -> None:
    report = _report(phase=pb.LOCATION_PHASE_INPUT, tensor="args[0]", module="fc", detail="input held nan")
    findings = apply_location(report, [_finding("DATA_NONFINITE")], WHERE)
    assert len(findings) == 1
    assert findings[0].evidence.location.tensor == "args[0]"
    assert "input held nan" in findings[0].message


def test_not_reproduced_is_a_warning() -> None:
    findings = apply_location(_report(phase=pb.LOCATION_PHASE_NOT_REPRODUCED, reproduced=False), [], WHERE)
    assert findings[0].code == "REPLAY_NOT_REPRODUCED"
    assert findings[0].severity == pb.SEVERITY_WARNING
    assert findings[0].stage == pb.STAGE_MONITORING


def test_located_log_beats_nan_loss_as_primary() -> None:
    report = _report(phase=pb.LOCATION_PHASE_FORWARD, module="m", op="torch.log", produced="-inf")
    findings = apply_location(report, [_finding("LOSS_NONFINITE"), _finding("GRAD_NONFINITE")], WHERE)
    assert choose_primary(findings, halt_step=7).code == "FORWARD_NONFINITE"


def test_located_log_not_explained_by_growth() -> None:
    report = _report(phase=pb.LOCATION_PHASE_FORWARD, module="m", op="torch.log", produced="-inf")
    findings = apply_location(report, [], WHERE) + [_finding("GRAD_GROWTH", step=4, severity=pb.SEVERITY_WARNING)]
    assert choose_primary(findings, halt_step=7).code == "FORWARD_NONFINITE"


def test_located_overflow_explained_by_growth() -> None:
    report = _report(phase=pb.LOCATION_PHASE_FORWARD, module="fc", op="torch.nn.functional.linear", produced="inf")
    findings = apply_location(report, [], WHERE) + [_finding("GRAD_GROWTH", step=4, severity=pb.SEVERITY_WARNING)]
    assert choose_primary(findings, halt_step=7).code == "GRAD_GROWTH"


def test_located_rank_beats_other_rank_guess() -> None:
    guess = new_finding("LOSS_BACKWARD_NONFINITE", pb.SEVERITY_CRITICAL, Where(run_id="r", rank=0, step=7),
                        message="guess", fix="fix")
    report = _report(phase=pb.LOCATION_PHASE_FORWARD, module="scale", op="torch.log1p", produced="-inf")
    located = apply_location(report, [], WHERE)
    primary = choose_primary([guess, *located], halt_step=7)
    assert primary.evidence.rank == 1
    assert primary.code == "FORWARD_NONFINITE"


def test_located_log_renames_guessed_code() -> None:
    report = _report(phase=pb.LOCATION_PHASE_LOSS_FORWARD, op="torch.log", produced="-inf", source="loss.py:7")
    findings = apply_location(report, [_finding("LOSS_UNDEFINED")], WHERE)
    assert [finding.code for finding in findings] == ["LOSS_LOG_ZERO"]
    assert "loss.py:7" in findings[0].fix
