"""Per-run and per-rank state that the check engine keeps between calls."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanwatch.service.checks.activations import is_weight_layer
from nanwatch.service.checks.data_ranks import InputScaleComparer
from nanwatch.service.checks.hyperparameters import float16_parameters
from nanwatch.service.checks.loss_trends import LossTracker, RankLossComparer
from nanwatch.service.checks.windows import SortedWindow
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb


@dataclass
class RankState:
    """Facts of one rank from registration and its first forward pass, histories and one-shot flags."""

    grad_norms: SortedWindow
    """Recent finite gradient norms; the GRAD_EXPLODING limit is a multiple of their median."""
    loss_tracker: LossTracker
    loss_function: str = ""
    optimizer: pb.OptimizerInfo | None = None
    clipping: pb.ClippingInfo | None = None
    amp: pb.AmpInfo | None = None
    has_float16_parameters: bool = False
    weight_names: list[str] = field(default_factory=list)
    """Linear/Conv weight parameters in registration order."""
    layer_order: list[str] = field(default_factory=list)
    """Module names of the first forward pass, in call order."""
    trace: list[pb.ModuleCall] = field(default_factory=list)
    """Leaf modules of the first forward pass, kept until the loss function is known."""
    autocast_dtype: str = ""
    num_classes: int = 0
    observed_clip_max_norm: float = 0.0
    is_trace_checked: bool = False
    is_first_forward_checked: bool = False
    spike_streak: int = 0  # consecutive steps with the grad norm above the GRAD_EXPLODING limit
    scaler_skips: int = 0  # consecutive steps with non-finite gradients under a GradScaler
    reported: set[str] = field(default_factory=set)  # codes sent at most once per rank

    @classmethod
    def create(cls, thresholds: Thresholds) -> RankState:
        return cls(grad_norms=SortedWindow(maxlen=thresholds.grad_history),
                   loss_tracker=LossTracker(history=SortedWindow(maxlen=thresholds.loss_history)))

    def register(self, request: pb.RegisterRankRequest) -> None:
        """Store the facts of a registration."""
        self.loss_function = request.loss_function or self.loss_function
        self.optimizer = request.optimizer if request.HasField("optimizer") else None
        self.clipping = request.clipping if request.HasField("clipping") else None
        self.amp = request.amp if request.HasField("amp") else None
        self.has_float16_parameters = bool(float16_parameters(request.parameters))
        self.weight_names = [p.name for p in request.parameters
                             if is_weight_layer(p.module_type) and len(p.shape) >= 2 and p.name.endswith("weight")]
        if request.forward_trace:
            self.layer_order = [call.name for call in request.forward_trace]
            self.trace = list(request.forward_trace)

    @property
    def is_clipping(self) -> bool:
        """True when the script clips gradients (declared at registration or seen in clip_grad_norm_)."""
        return bool(self.clipping is not None and self.clipping.enabled) or self.observed_clip_max_norm > 0.0

    @property
    def clip_max_norm(self) -> float:
        if self.observed_clip_max_norm > 0.0:
            return self.observed_clip_max_norm
        return self.clipping.max_norm if self.clipping is not None else 0.0

    @property
    def float16_source(self) -> str:
        """Why this rank's forward pass runs in float16, or "" when it does not."""
        amp_dtype = self.autocast_dtype or (self.amp.dtype if self.amp is not None and self.amp.enabled else "")
        if amp_dtype.removeprefix("torch.") in ("float16", "half"):
            return "float16 autocast"
        return "float16 parameters" if self.has_float16_parameters else ""

    def first_time(self, code: str) -> bool:
        """Return True the first time it is called with code for this rank."""
        if code in self.reported:
            return False
        self.reported.add(code)
        return True


@dataclass
class RunState:
    ranks: dict[int, RankState] = field(default_factory=dict)
    static_keys: set[tuple[str, str, str]] = field(default_factory=set)  # (code, tensor, layer)
    evaluated: set[str] = field(default_factory=set)
    comparer: RankLossComparer | None = None
    scale_comparer: InputScaleComparer | None = None
    is_order_reported: bool = False
