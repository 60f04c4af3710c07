from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_DATA: _ClassVar[Stage]
    STAGE_INITIALIZATION: _ClassVar[Stage]
    STAGE_LOSS: _ClassVar[Stage]
    STAGE_HYPERPARAMETERS: _ClassVar[Stage]
    STAGE_GRADIENTS: _ClassVar[Stage]
    STAGE_MONITORING: _ClassVar[Stage]

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_INFO: _ClassVar[Severity]
    SEVERITY_WARNING: _ClassVar[Severity]
    SEVERITY_CRITICAL: _ClassVar[Severity]

class LocationPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOCATION_PHASE_UNSPECIFIED: _ClassVar[LocationPhase]
    LOCATION_PHASE_INPUT: _ClassVar[LocationPhase]
    LOCATION_PHASE_PARAMETER: _ClassVar[LocationPhase]
    LOCATION_PHASE_FORWARD: _ClassVar[LocationPhase]
    LOCATION_PHASE_LOSS_FORWARD: _ClassVar[LocationPhase]
    LOCATION_PHASE_BACKWARD: _ClassVar[LocationPhase]
    LOCATION_PHASE_LOSS_BACKWARD: _ClassVar[LocationPhase]
    LOCATION_PHASE_NOT_REPRODUCED: _ClassVar[LocationPhase]

class SignalKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNAL_KIND_UNSPECIFIED: _ClassVar[SignalKind]
    SIGNAL_KIND_HALT: _ClassVar[SignalKind]
    SIGNAL_KIND_WARN: _ClassVar[SignalKind]

class CheckState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECK_STATE_UNSPECIFIED: _ClassVar[CheckState]
    CHECK_STATE_PASS: _ClassVar[CheckState]
    CHECK_STATE_WARN: _ClassVar[CheckState]
    CHECK_STATE_FAIL: _ClassVar[CheckState]
    CHECK_STATE_NOT_RUN: _ClassVar[CheckState]
STAGE_UNSPECIFIED: Stage
STAGE_DATA: Stage
STAGE_INITIALIZATION: Stage
STAGE_LOSS: Stage
STAGE_HYPERPARAMETERS: Stage
STAGE_GRADIENTS: Stage
STAGE_MONITORING: Stage
SEVERITY_UNSPECIFIED: Severity
SEVERITY_INFO: Severity
SEVERITY_WARNING: Severity
SEVERITY_CRITICAL: Severity
LOCATION_PHASE_UNSPECIFIED: LocationPhase
LOCATION_PHASE_INPUT: LocationPhase
LOCATION_PHASE_PARAMETER: LocationPhase
LOCATION_PHASE_FORWARD: LocationPhase
LOCATION_PHASE_LOSS_FORWARD: LocationPhase
LOCATION_PHASE_BACKWARD: LocationPhase
LOCATION_PHASE_LOSS_BACKWARD: LocationPhase
LOCATION_PHASE_NOT_REPRODUCED: LocationPhase
SIGNAL_KIND_UNSPECIFIED: SignalKind
SIGNAL_KIND_HALT: SignalKind
SIGNAL_KIND_WARN: SignalKind
CHECK_STATE_UNSPECIFIED: CheckState
CHECK_STATE_PASS: CheckState
CHECK_STATE_WARN: CheckState
CHECK_STATE_FAIL: CheckState
CHECK_STATE_NOT_RUN: CheckState

class Evidence(_message.Message):
    __slots__ = ("run_id", "rank", "step", "tensor", "layer", "values", "sample_indices", "location")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDICES_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    step: int
    tensor: str
    layer: str
    values: _containers.ScalarMap[str, str]
    sample_indices: _containers.RepeatedScalarFieldContainer[int]
    location: Location
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., tensor: _Optional[str] = ..., layer: _Optional[str] = ..., values: _Optional[_Mapping[str, str]] = ..., sample_indices: _Optional[_Iterable[int]] = ..., location: _Optional[_Union[Location, _Mapping]] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("phase", "rank", "step", "module", "module_type", "parameter", "op", "source", "code", "produced", "then_op", "then_source", "tensor", "reproduced", "detail", "after_loss")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    MODULE_TYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    PRODUCED_FIELD_NUMBER: _ClassVar[int]
    THEN_OP_FIELD_NUMBER: _ClassVar[int]
    THEN_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    REPRODUCED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    AFTER_LOSS_FIELD_NUMBER: _ClassVar[int]
    phase: LocationPhase
    rank: int
    step: int
    module: str
    module_type: str
    parameter: str
    op: str
    source: str
    code: str
    produced: str
    then_op: str
    then_source: str
    tensor: str
    reproduced: bool
    detail: str
    after_loss: str
    def __init__(self, phase: _Optional[_Union[LocationPhase, str]] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., module: _Optional[str] = ..., module_type: _Optional[str] = ..., parameter: _Optional[str] = ..., op: _Optional[str] = ..., source: _Optional[str] = ..., code: _Optional[str] = ..., produced: _Optional[str] = ..., then_op: _Optional[str] = ..., then_source: _Optional[str] = ..., tensor: _Optional[str] = ..., reproduced: _Optional[bool] = ..., detail: _Optional[str] = ..., after_loss: _Optional[str] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("id", "stage", "severity", "code", "message", "fix", "evidence", "created_unix_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIX_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    id: str
    stage: Stage
    severity: Severity
    code: str
    message: str
    fix: str
    evidence: Evidence
    created_unix_s: float
    def __init__(self, id: _Optional[str] = ..., stage: _Optional[_Union[Stage, str]] = ..., severity: _Optional[_Union[Severity, str]] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., fix: _Optional[str] = ..., evidence: _Optional[_Union[Evidence, _Mapping]] = ..., created_unix_s: _Optional[float] = ...) -> None: ...

class ParameterInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype", "numel", "mean", "std", "min", "max", "nonfinite_count", "fan_in", "module_type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAN_IN_FIELD_NUMBER: _ClassVar[int]
    MODULE_TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    numel: int
    mean: float
    std: float
    min: float
    max: float
    nonfinite_count: int
    fan_in: int
    module_type: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., numel: _Optional[int] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., nonfinite_count: _Optional[int] = ..., fan_in: _Optional[int] = ..., module_type: _Optional[str] = ...) -> None: ...

class ModuleCall(_message.Message):
    __slots__ = ("name", "type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ...) -> None: ...

class OptimizerInfo(_message.Message):
    __slots__ = ("type", "lr", "hyperparameters")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TYPE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    type: str
    lr: float
    hyperparameters: _containers.ScalarMap[str, float]
    def __init__(self, type: _Optional[str] = ..., lr: _Optional[float] = ..., hyperparameters: _Optional[_Mapping[str, float]] = ...) -> None: ...

class AmpInfo(_message.Message):
    __slots__ = ("enabled", "dtype", "grad_scaler")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GRAD_SCALER_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    dtype: str
    grad_scaler: bool
    def __init__(self, enabled: _Optional[bool] = ..., dtype: _Optional[str] = ..., grad_scaler: _Optional[bool] = ...) -> None: ...

class ClippingInfo(_message.Message):
    __slots__ = ("enabled", "max_norm", "norm_type")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    NORM_TYPE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    max_norm: float
    norm_type: float
    def __init__(self, enabled: _Optional[bool] = ..., max_norm: _Optional[float] = ..., norm_type: _Optional[float] = ...) -> None: ...

class RegisterRankRequest(_message.Message):
    __slots__ = ("run_id", "rank", "world_size", "host", "pid", "client_id", "parameters", "forward_trace", "loss_function", "optimizer", "amp", "clipping", "max_consecutive_skips")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_TRACE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    AMP_FIELD_NUMBER: _ClassVar[int]
    CLIPPING_FIELD_NUMBER: _ClassVar[int]
    MAX_CONSECUTIVE_SKIPS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    world_size: int
    host: str
    pid: int
    client_id: str
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterInfo]
    forward_trace: _containers.RepeatedCompositeFieldContainer[ModuleCall]
    loss_function: str
    optimizer: OptimizerInfo
    amp: AmpInfo
    clipping: ClippingInfo
    max_consecutive_skips: int
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., client_id: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[ParameterInfo, _Mapping]]] = ..., forward_trace: _Optional[_Iterable[_Union[ModuleCall, _Mapping]]] = ..., loss_function: _Optional[str] = ..., optimizer: _Optional[_Union[OptimizerInfo, _Mapping]] = ..., amp: _Optional[_Union[AmpInfo, _Mapping]] = ..., clipping: _Optional[_Union[ClippingInfo, _Mapping]] = ..., max_consecutive_skips: _Optional[int] = ...) -> None: ...

class RegisterRankResponse(_message.Message):
    __slots__ = ("findings", "halt")
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    HALT_FIELD_NUMBER: _ClassVar[int]
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    halt: Signal
    def __init__(self, findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., halt: _Optional[_Union[Signal, _Mapping]] = ...) -> None: ...

class TensorSummary(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nan_count", "inf_count", "min", "max", "mean", "std", "nonfinite_sample_indices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    INF_COUNT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_SAMPLE_INDICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nan_count: int
    inf_count: int
    min: float
    max: float
    mean: float
    std: float
    nonfinite_sample_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nan_count: _Optional[int] = ..., inf_count: _Optional[int] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., nonfinite_sample_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class ParameterGradNorm(_message.Message):
    __slots__ = ("name", "grad_norm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    name: str
    grad_norm: float
    def __init__(self, name: _Optional[str] = ..., grad_norm: _Optional[float] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("step", "loss", "loss_finite", "grad_norm", "parameter_grad_norms", "nonfinite_grad_count", "param_norm", "update_norm", "lr", "loss_scale", "batch", "forward_trace", "halted_locally", "dropped_reports", "sent_unix_s", "activations", "autocast_dtype", "output_shape", "output_checked", "output_finite", "clip_max_norm", "clip_total_norm", "client_finding", "loss_function", "location", "update_skipped", "consecutive_skips")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FINITE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_GRAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_GRAD_COUNT_FIELD_NUMBER: _ClassVar[int]
    PARAM_NORM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    FORWARD_TRACE_FIELD_NUMBER: _ClassVar[int]
    HALTED_LOCALLY_FIELD_NUMBER: _ClassVar[int]
    DROPPED_REPORTS_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    AUTOCAST_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_CHECKED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FINITE_FIELD_NUMBER: _ClassVar[int]
    CLIP_MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIP_TOTAL_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FINDING_FIELD_NUMBER: _ClassVar[int]
    LOSS_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_SKIPS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    loss_finite: bool
    grad_norm: float
    parameter_grad_norms: _containers.RepeatedCompositeFieldContainer[ParameterGradNorm]
    nonfinite_grad_count: int
    param_norm: float
    update_norm: float
    lr: float
    loss_scale: float
    batch: _containers.RepeatedCompositeFieldContainer[TensorSummary]
    forward_trace: _containers.RepeatedCompositeFieldContainer[ModuleCall]
    halted_locally: bool
    dropped_reports: int
    sent_unix_s: float
    activations: _containers.RepeatedCompositeFieldContainer[LayerActivation]
    autocast_dtype: str
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    output_checked: bool
    output_finite: bool
    clip_max_norm: float
    clip_total_norm: float
    client_finding: Finding
    loss_function: str
    location: Location
    update_skipped: bool
    consecutive_skips: int
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., loss_finite: _Optional[bool] = ..., grad_norm: _Optional[float] = ..., parameter_grad_norms: _Optional[_Iterable[_Union[ParameterGradNorm, _Mapping]]] = ..., nonfinite_grad_count: _Optional[int] = ..., param_norm: _Optional[float] = ..., update_norm: _Optional[float] = ..., lr: _Optional[float] = ..., loss_scale: _Optional[float] = ..., batch: _Optional[_Iterable[_Union[TensorSummary, _Mapping]]] = ..., forward_trace: _Optional[_Iterable[_Union[ModuleCall, _Mapping]]] = ..., halted_locally: _Optional[bool] = ..., dropped_reports: _Optional[int] = ..., sent_unix_s: _Optional[float] = ..., activations: _Optional[_Iterable[_Union[LayerActivation, _Mapping]]] = ..., autocast_dtype: _Optional[str] = ..., output_shape: _Optional[_Iterable[int]] = ..., output_checked: _Optional[bool] = ..., output_finite: _Optional[bool] = ..., clip_max_norm: _Optional[float] = ..., clip_total_norm: _Optional[float] = ..., client_finding: _Optional[_Union[Finding, _Mapping]] = ..., loss_function: _Optional[str] = ..., location: _Optional[_Union[Location, _Mapping]] = ..., update_skipped: _Optional[bool] = ..., consecutive_skips: _Optional[int] = ...) -> None: ...

class LayerActivation(_message.Message):
    __slots__ = ("name", "type", "numel", "std", "max_abs", "nonfinite_count", "saturated_fraction", "input_nan_count", "input_inf_count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SATURATED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    INPUT_INF_COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    numel: int
    std: float
    max_abs: float
    nonfinite_count: int
    saturated_fraction: float
    input_nan_count: int
    input_inf_count: int
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., numel: _Optional[int] = ..., std: _Optional[float] = ..., max_abs: _Optional[float] = ..., nonfinite_count: _Optional[int] = ..., saturated_fraction: _Optional[float] = ..., input_nan_count: _Optional[int] = ..., input_inf_count: _Optional[int] = ...) -> None: ...

class WatchStart(_message.Message):
    __slots__ = ("run_id", "rank", "client_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    client_id: str
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., client_id: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("start", "report", "reports")
    START_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    start: WatchStart
    report: StepReport
    reports: ReportBatch
    def __init__(self, start: _Optional[_Union[WatchStart, _Mapping]] = ..., report: _Optional[_Union[StepReport, _Mapping]] = ..., reports: _Optional[_Union[ReportBatch, _Mapping]] = ...) -> None: ...

class ReportBatch(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[StepReport]
    def __init__(self, reports: _Optional[_Iterable[_Union[StepReport, _Mapping]]] = ...) -> None: ...

class Signal(_message.Message):
    __slots__ = ("kind", "run_id", "halt_step", "reason", "finding")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HALT_STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FINDING_FIELD_NUMBER: _ClassVar[int]
    kind: SignalKind
    run_id: str
    halt_step: int
    reason: str
    finding: Finding
    def __init__(self, kind: _Optional[_Union[SignalKind, str]] = ..., run_id: _Optional[str] = ..., halt_step: _Optional[int] = ..., reason: _Optional[str] = ..., finding: _Optional[_Union[Finding, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CheckBatchRequest(_message.Message):
    __slots__ = ("run_id", "rank", "step", "tensors", "sample_ids")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    step: int
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., sample_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CheckBatchResponse(_message.Message):
    __slots__ = ("valid", "findings")
    VALID_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    def __init__(self, valid: _Optional[bool] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ...) -> None: ...

class CheckResult(_message.Message):
    __slots__ = ("stage", "code", "check", "state", "evidence", "fix")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    FIX_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    code: str
    check: str
    state: CheckState
    evidence: str
    fix: str
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., code: _Optional[str] = ..., check: _Optional[str] = ..., state: _Optional[_Union[CheckState, str]] = ..., evidence: _Optional[str] = ..., fix: _Optional[str] = ...) -> None: ...

class RankInfo(_message.Message):
    __slots__ = ("rank", "host", "last_step", "last_loss", "last_grad_norm", "connected")
    RANK_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    rank: int
    host: str
    last_step: int
    last_loss: float
    last_grad_norm: float
    connected: bool
    def __init__(self, rank: _Optional[int] = ..., host: _Optional[str] = ..., last_step: _Optional[int] = ..., last_loss: _Optional[float] = ..., last_grad_norm: _Optional[float] = ..., connected: _Optional[bool] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("run_id", "world_size", "halted", "halt_step", "last_step", "finding_count", "created_unix_s", "primary")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HALTED_FIELD_NUMBER: _ClassVar[int]
    HALT_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    FINDING_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    world_size: int
    halted: bool
    halt_step: int
    last_step: int
    finding_count: int
    created_unix_s: float
    primary: Finding
    def __init__(self, run_id: _Optional[str] = ..., world_size: _Optional[int] = ..., halted: _Optional[bool] = ..., halt_step: _Optional[int] = ..., last_step: _Optional[int] = ..., finding_count: _Optional[int] = ..., created_unix_s: _Optional[float] = ..., primary: _Optional[_Union[Finding, _Mapping]] = ...) -> None: ...

class GetRunStatusRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("summary", "halt_reason", "ranks", "checks", "findings", "halt_first_rank")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    HALT_REASON_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    HALT_FIRST_RANK_FIELD_NUMBER: _ClassVar[int]
    summary: RunSummary
    halt_reason: str
    ranks: _containers.RepeatedCompositeFieldContainer[RankInfo]
    checks: _containers.RepeatedCompositeFieldContainer[CheckResult]
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    halt_first_rank: int
    def __init__(self, summary: _Optional[_Union[RunSummary, _Mapping]] = ..., halt_reason: _Optional[str] = ..., ranks: _Optional[_Iterable[_Union[RankInfo, _Mapping]]] = ..., checks: _Optional[_Iterable[_Union[CheckResult, _Mapping]]] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., halt_first_rank: _Optional[int] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunSummary]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunSummary, _Mapping]]] = ...) -> None: ...

class HaltRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class HaltRunResponse(_message.Message):
    __slots__ = ("halt", "already_halted")
    HALT_FIELD_NUMBER: _ClassVar[int]
    ALREADY_HALTED_FIELD_NUMBER: _ClassVar[int]
    halt: Signal
    already_halted: bool
    def __init__(self, halt: _Optional[_Union[Signal, _Mapping]] = ..., already_halted: _Optional[bool] = ...) -> None: ...
