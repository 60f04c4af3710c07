"""Forward-pass origin tracking: which operation first made each non-finite tensor of a replayed step."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from nanwatch.client.localize.sources import caller_line, op_name

logger = logging.getLogger(__name__)

# Segments of a replayed step: the model's forward pass and the loss computed on its output.
MODEL_SEGMENT = "model"
LOSS_SEGMENT = "loss"


@dataclass(frozen=True, kw_only=True)
class OpSite:
    """One operation call of the replay: what ran, where in the user's code, inside which module."""

    op: str
    source: str
    code: str
    module: str
    module_type: str
    segment: str


@dataclass(frozen=True, kw_only=True, eq=False)
class Origin:
    """Source of a non-finite tensor: an operation, or a model input, parameter or buffer.

    Origins compare by identity: tensors that inherited their NaN from the same
    operation share one Origin object.
    """

    kind: str
    """"op", "input", "parameter", "buffer" or "unknown"."""
    site: OpSite | None = None
    tensor: str = ""
    produced: str = ""
    """"nan", "inf", "-inf" or "nan,inf": what the operation made."""
    parent: Origin | None = None
    """For a NaN made from infinite inputs (inf - inf, -inf * 0): the origin of those inputs."""

    def root(self) -> Origin:
        """Return the first origin of the chain: the operation that made the first non-finite value."""
        origin = self
        while origin.parent is not None:
            origin = origin.parent
        return origin


@dataclass(frozen=True)
class _Kinds:
    nan: bool
    inf: bool

    @property
    def finite(self) -> bool:
        return not (self.nan or self.inf)


def float_tensors(value: Any, limit: int = 64) -> list[torch.Tensor]:
    """Return up to limit floating-point tensors in value (a tensor, or nested tuples, lists and mappings), depth first."""
    found: list[torch.Tensor] = []
    stack = [value]
    while stack and len(found) < limit:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.is_floating_point():
                found.append(item)
        elif isinstance(item, Mapping):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (tuple, list)):
            stack.extend(reversed(item))
    return found


def has_nonfinite(tensor: torch.Tensor) -> torch.Tensor | None:
    """Return a device flag that is true when tensor contains NaN or Inf, or None for an empty tensor.

    Nothing is read on the host. torch.aminmax propagates NaN and returns an infinite
    bound for any Inf, so its two values decide it in one pass. On CPU that measured
    about 8x faster than isfinite().all() on a 512 x 2000 logits tensor.
    """
    if tensor.numel() == 0:
        return None
    low, high = torch.aminmax(tensor)
    return ~(torch.isfinite(low) & torch.isfinite(high))


def produced_text(tensor: torch.Tensor) -> str:
    """Return "nan", "inf", "-inf", "inf,-inf" or a mix such as "nan,inf" for a non-finite tensor."""
    values = tensor.detach()
    parts = []
    if bool(torch.isnan(values).any()):
        parts.append("nan")
    if bool((values == float("inf")).any()):
        parts.append("inf")
    if bool((values == float("-inf")).any()):
        parts.append("-inf")
    return ",".join(parts)


def _kinds(tensor: torch.Tensor) -> _Kinds:
    values = tensor.detach()
    if bool(torch.isfinite(values).all()):
        return _Kinds(nan=False, inf=False)
    return _Kinds(nan=bool(torch.isnan(values).any()), inf=bool(torch.isinf(values).any()))


class ForwardOrigins(TorchFunctionMode):
    """A TorchFunctionMode, active only during a replay, that follows NaN and Inf through the operations.

    It checks the outputs of every operation. A non-finite output inherits the
    origin of its non-finite input. When the inputs were finite, or contained only
    Inf while the output contains NaN, the operation itself becomes the origin.
    It also maps each autograd node to the operation that created it, for the
    backward search.
    """

    def __init__(self, named: Iterable[tuple[torch.Tensor, str, str]]) -> None:
        super().__init__()
        self.segment = MODEL_SEGMENT
        self.modules: list[tuple[str, str]] = []
        self.node_sites: dict[int, OpSite] = {}
        self._nodes: list[Any] = []
        self._origins: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._named: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for tensor, kind, name in named:
            if tensor not in self._named:
                self._named[tensor] = (kind, name)
        self._paused = 0

    def name(self, tensor: torch.Tensor, kind: str, name: str) -> None:
        """Name a tensor that enters the replay from outside: a model input or a loss argument."""
        self._named[tensor] = (kind, name)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop observing operations, for nanwatch's own checks inside module hooks."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def origin_of(self, tensor: torch.Tensor) -> Origin:
        """Return the origin of a non-finite tensor: a traced operation, a named tensor, or "unknown"."""
        origin = self._origins.get(tensor)
        if origin is not None:
            return origin
        named = self._named.get(tensor)
        if named is not None:
            return Origin(kind=named[0], tensor=named[1], produced=produced_text(tensor))
        return Origin(kind="unknown", produced=produced_text(tensor))

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if not self._paused:
            try:
                self._observe(func, args, kwargs, output)
            except Exception:  # noqa: BLE001 - the replay goes on with less detail
                logger.debug("nanwatch: could not observe %s during a replay", op_name(func), exc_info=True)
        return output

    def _observe(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        outputs = float_tensors(output)
        if not outputs:
            return
        site: OpSite | None = None
        if any(tensor.grad_fn is not None for tensor in outputs):
            site = self._site(func)
            for tensor in outputs:
                if tensor.grad_fn is not None:
                    self._nodes.append(tensor.grad_fn)
                    self.node_sites[id(tensor.grad_fn)] = site
        bad = [(tensor, kinds) for tensor in outputs if not (kinds := _kinds(tensor)).finite]
        if not bad:
            return
        # An in-place operation returns its input, already changed: without a recorded
        # origin, that input counts as finite before the operation.
        output_ids = {id(tensor) for tensor in outputs}
        inputs = [(tensor, _kinds(tensor)) for tensor in float_tensors((args, kwargs))
                  if id(tensor) not in output_ids or tensor in self._origins]
        origin = self._output_origin(func, site, inputs, bad)
        for tensor, _ in bad:
            self._origins[tensor] = origin

    def _output_origin(self, func: Any, site: OpSite | None, inputs: list[tuple[torch.Tensor, _Kinds]],
                       bad: list[tuple[torch.Tensor, _Kinds]]) -> Origin:
        out_nan = any(kinds.nan for _, kinds in bad)
        nan_inputs = [tensor for tensor, kinds in inputs if kinds.nan]
        inf_inputs = [tensor for tensor, kinds in inputs if kinds.inf]
        if out_nan and nan_inputs:
            return self.origin_of(nan_inputs[0])
        if not out_nan and (nan_inputs or inf_inputs):
            return self.origin_of((nan_inputs or inf_inputs)[0])
        # Born here: NaN from inputs without NaN, or Inf from finite inputs.
        parent = self.origin_of(inf_inputs[0]) if inf_inputs else None
        return Origin(kind="op", site=site or self._site(func), produced=produced_text(bad[0][0]), parent=parent)

    def _site(self, func: Any) -> OpSite:
        source, code = caller_line()
        module, module_type = self.modules[-1] if self.modules else ("", "")
        return OpSite(op=op_name(func), source=source, code=code, module=module, module_type=module_type,
                      segment=self.segment)
