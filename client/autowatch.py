"""Zero-code watching: torch's global hooks attach a Watcher to every optimizer a process steps.

``nanwatch run`` starts the training command with this module installed in
every Python process (see nanwatch/bootstrap/sitecustomize.py). No line of the
training script changes:

- the root module call (a module forward that runs while no other module
  forward is running) gives the model and its tensor inputs, taken as the batch;
- a loss module (``nn.modules.loss._Loss``) called at the root gives the loss
  function's name and the targets;
- a common ``torch.nn.functional`` loss called outside any module gives the
  loss function's name and the targets;
- the scalar tensor on which ``backward()`` is called is taken as the loss, and each
  loss call is kept for the replay that localizes a non-finite step;
- each optimizer gets its Watcher when a root module that contains all of its
  parameters is first called (else at the first loss, backward or ``step()``,
  with the root module that contains the most of them), so registration, its
  static checks and the trace of the first forward pass come before the first
  update.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanwatch.bootstrap import AUTOWATCH_ENV, RUN_DIR_ENV
from nanwatch.client import observers
from nanwatch.client.labels import CLASS_INDEX_LOSSES, DEFAULT_IGNORE_INDEX, target_range_finding
from nanwatch.client.localize import replaying
from nanwatch.client.watcher import Watcher
from nanwatch.errors import HaltError

logger = logging.getLogger(__name__)

# Recent root modules searched for the owner of an optimizer's parameters.
MAX_ROOT_CANDIDATES = 8
# torch.nn.functional losses whose calls outside a module give the loss name and the targets.
FUNCTIONAL_LOSSES = (
    "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div", "gaussian_nll_loss",
    "poisson_nll_loss",
)


class AutoWatch:
    """Feeds torch's global module, optimizer and backward hooks into one Watcher per optimizer.

    Example:
        AutoWatch(run_dir=Path("/tmp/run")).install()   # what nanwatch run does in each process
    """

    def __init__(self, *, run_dir: Path | None = None) -> None:
        self.run_dir = run_dir
        self._depth = 0
        self._roots: list[weakref.ref[nn.Module]] = []
        self._watchers: dict[int, Watcher] = {}
        # Optimizers whose parameters no seen module owns; they are not watched.
        self._unwatched: set[int] = set()
        self._watcher_by_root: dict[int, Watcher] = {}
        # Submodules of watched models: called directly (model[0](x) for diagnostics) they are not roots.
        self._watched_submodules: set[int] = set()
        self._current: Watcher | None = None
        self._loss_name: str | None = None
        # Batch tensors and losses seen before any Watcher existed.
        self._pending_batch: dict[str, torch.Tensor] = {}
        self._pending_loss: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()

    def install(self) -> None:
        """Register the global hooks and wrap Tensor.backward; close every Watcher at exit."""
        from torch.nn.modules import module as modules
        from torch.optim import optimizer as optimizers

        self._handles = [
            modules.register_module_forward_pre_hook(self._on_forward_pre),
            modules.register_module_forward_hook(self._on_forward, with_kwargs=True, always_call=True),
            optimizers.register_optimizer_step_pre_hook(self._on_step_pre),
            optimizers.register_optimizer_step_post_hook(self._on_step_post),
        ]
        observers.install()
        self._wrap_optimizer_init()
        self._wrap_backward()
        self._wrap_functional_losses()
        atexit.register(self.close)
        logger.debug("nanwatch autowatch installed in pid %d", os.getpid())

    def close(self) -> None:
        """Close every Watcher, sending their buffered reports."""
        for watcher in list(self._watchers.values()):
            watcher.close()

    # ---- module hooks ----

    def _on_forward_pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if replaying():
            return
        self._depth += 1
        if self._depth != 1:
            return
        try:
            if isinstance(module, nn.modules.loss._Loss):
                self._on_loss_call(module, args)
            else:
                self._on_root_call(module, args)
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            logger.exception("nanwatch autowatch: failed to observe a forward call of %s", type(module).__name__)

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], unused_output: Any) -> None:
        if replaying():
            return
        if self._depth == 1 and self._current is not None:
            try:
                self._observe_root_output(module, args, kwargs)
            except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
                logger.exception("nanwatch autowatch: failed to record the call of %s", type(module).__name__)
        self._depth = max(self._depth - 1, 0)

    def _observe_root_output(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Keep a loss module's call for the replay: a torch loss, or a module without parameters on the model output."""
        watcher = self._current
        if isinstance(module, nn.modules.loss._Loss):
            watcher.observe_loss_call(module, type(module).__name__, args, kwargs)
        elif id(module) not in self._watcher_by_root and next(module.parameters(), None) is None:
            watcher.observe_loss_call(module, type(module).__name__, args, kwargs, only_on_output=True)

    def _on_root_call(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # NOTE: torch's global forward pre-hook receives positional arguments only, so the
        # inputs of a model called with keywords alone (model(input_ids=...)) go unchecked.
        if id(module) in self._watched_submodules:
            return
        self._remember_root(module)
        tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
        names = ["inputs"] if len(tensors) == 1 else [f"inputs{index}" for index in range(len(tensors))]
        # Created before the model's first forward runs, the Watcher traces that forward too. Only a
        # module that owns all of an optimizer's parameters qualifies here, so that a submodule
        # called on its own before the model (model[0](x)) is not taken for the model.
        existed = id(module) in self._watcher_by_root
        watcher = self._ensure_watcher(complete_owner_only=True)
        if watcher is not None and not existed and self._watcher_by_root.get(id(module)) is watcher:
            # torch gathered the model's own pre-hooks before the Watcher added its capture hook.
            watcher.observe_forward_start(args, {})
        self._check_batch(watcher, dict(zip(names, tensors)))

    def _on_loss_call(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._set_loss_name(type(module).__name__)
        self._ensure_watcher()
        if len(args) >= 2 and isinstance(args[1], torch.Tensor):
            self._check_batch(self._current, {"targets": args[1]})

    def _set_loss_name(self, name: str) -> None:
        if name == self._loss_name:
            return
        self._loss_name = name
        for watcher in self._watchers.values():
            watcher.set_loss_function(name)

    def _remember_root(self, module: nn.Module) -> None:
        if any(ref() is module for ref in self._roots):
            return
        self._roots.append(weakref.ref(module))
        del self._roots[:-MAX_ROOT_CANDIDATES]

    def _check_batch(self, watcher: Watcher | None, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        if watcher is None:
            self._pending_batch.update(tensors)
            return
        watcher.check_batch(**tensors)

    # ---- wrapped torch functions ----

    def _wrap_optimizer_init(self) -> None:
        original = torch.optim.Optimizer.__init__
        optimizers = self._optimizers

        def __init__(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
            original(optimizer, *args, **kwargs)
            optimizers.add(optimizer)

        torch.optim.Optimizer.__init__ = __init__  # type: ignore[method-assign]

    def _wrap_backward(self) -> None:
        original = torch.Tensor.backward
        autowatch = self

        def backward(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            autowatch._observe_backward(tensor)
            return original(tensor, *args, **kwargs)

        backward.__doc__ = original.__doc__
        torch.Tensor.backward = backward  # type: ignore[method-assign]

    def _wrap_functional_losses(self) -> None:
        functional = torch.nn.functional
        for name in FUNCTIONAL_LOSSES:
            original = getattr(functional, name, None)
            if original is not None:
                setattr(functional, name, self._functional_loss(name, original))

    def _functional_loss(self, name: str, original: Any) -> Any:
        autowatch = self

        def loss(*args: Any, **kwargs: Any) -> Any:
            target = args[1] if len(args) > 1 else kwargs.get("target")
            if autowatch._depth == 0 and not replaying():
                autowatch._on_functional_loss(name, target)
                if autowatch._current is not None:
                    autowatch._current.observe_loss_call(original, name, args, kwargs)
            try:
                return original(*args, **kwargs)
            except (IndexError, RuntimeError) as error:
                autowatch._on_loss_error(name, args[0] if args else kwargs.get("input"), target, kwargs, error)
                raise

        loss.__doc__ = original.__doc__
        loss.__name__ = name
        return loss

    def _on_functional_loss(self, name: str, target: Any) -> None:
        try:
            if self._loss_name is None:
                self._set_loss_name(name)
            self._ensure_watcher()
            if isinstance(target, torch.Tensor):
                self._check_batch(self._current, {"targets": target})
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            logger.exception("nanwatch autowatch: failed to observe a %s call", name)

    def _on_loss_error(self, name: str, logits: Any, targets: Any, kwargs: dict[str, Any],
                       error: BaseException) -> None:
        """Halt with DATA_TARGET_RANGE when the loss raised on class targets out of range."""
        if name not in CLASS_INDEX_LOSSES or not isinstance(logits, torch.Tensor):
            return
        if not isinstance(targets, torch.Tensor):
            return
        ignore_index = int(kwargs.get("ignore_index", DEFAULT_IGNORE_INDEX))
        finding = target_range_finding(logits.detach(), targets.detach(), ignore_index=ignore_index,
                                       loss_name=self._loss_name or name)
        watcher = self._current or self._ensure_watcher()
        if finding is None or watcher is None:
            return
        try:
            watcher.halt_now(reason=finding.message, finding=finding)
        except HaltError as halt:
            self._write_halt_marker(watcher, halt)
            raise halt from error

    def _observe_backward(self, tensor: torch.Tensor) -> None:
        if tensor.numel() != 1:
            return
        self._ensure_watcher()
        loss = tensor.detach()
        if self._current is None:
            self._pending_loss = loss
        else:
            self._current.observe_loss(loss)

    # ---- optimizer hooks ----

    def _on_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self._unwatched:
            return
        watcher = self._watchers.get(id(optimizer)) or self._create_watcher(optimizer)
        if watcher is None:
            return
        self._current = watcher
        try:
            watcher.step_pre_hook(optimizer, args, kwargs)
        except HaltError as halt:
            self._write_halt_marker(watcher, halt)
            raise

    def _on_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        watcher = self._watchers.get(id(optimizer))
        if watcher is not None:
            watcher.step_post_hook(optimizer, args, kwargs)

    def _ensure_watcher(self, *, complete_owner_only: bool = False) -> Watcher | None:
        """Return the Watcher of the latest root module, creating it when an optimizer's parameters are in it."""
        root = self._roots[-1]() if self._roots else None
        if root is None:
            return self._current
        watcher = self._watcher_by_root.get(id(root))
        if watcher is None:
            optimizer = self._find_optimizer(root, complete_owner_only=complete_owner_only)
            if optimizer is not None:
                watcher = self._create_watcher(optimizer)
        if watcher is not None:
            self._current = watcher
        return watcher or self._current

    def _find_optimizer(self, root: nn.Module, *, complete_owner_only: bool) -> torch.optim.Optimizer | None:
        owned = {id(param) for param in root.parameters()}
        for optimizer in list(self._optimizers):
            if id(optimizer) in self._watchers or id(optimizer) in self._unwatched:
                continue
            params = [id(param) for group in optimizer.param_groups for param in group["params"]]
            inside = [param in owned for param in params]
            if all(inside) if complete_owner_only else any(inside):
                return optimizer
        return None

    def _create_watcher(self, optimizer: torch.optim.Optimizer) -> Watcher | None:
        model = self._find_owner(optimizer)
        if model is None:
            logger.warning("nanwatch autowatch: no module owns the parameters of %s; it is not watched",
                           type(optimizer).__name__)
            self._unwatched.add(id(optimizer))
            return None
        watcher = Watcher(model, optimizer, self._loss_name, install_hooks=False)
        self._watchers[id(optimizer)] = watcher
        self._watcher_by_root[id(model)] = watcher
        self._watched_submodules.update(id(module) for module in model.modules() if module is not model)
        self._replay_pending(watcher)
        return watcher

    def _find_owner(self, optimizer: torch.optim.Optimizer) -> nn.Module | None:
        """Return the recent root module that contains the most of the optimizer's parameters."""
        optimizer_params = {id(param) for group in optimizer.param_groups for param in group["params"]}
        best, best_count = None, 0
        for ref in reversed(self._roots):
            module = ref()
            if module is None:
                continue
            count = sum(1 for param in module.parameters() if id(param) in optimizer_params)
            if count > best_count:
                best, best_count = module, count
        return best

    def _replay_pending(self, watcher: Watcher) -> None:
        if self._pending_batch:
            watcher.check_batch(**self._pending_batch)
            self._pending_batch = {}
        if self._pending_loss is not None:
            watcher.observe_loss(self._pending_loss)
            self._pending_loss = None

    def _write_halt_marker(self, watcher: Watcher, halt: HaltError) -> None:
        """Leave a file for ``nanwatch run``, which re-issues the halt exit code after torchrun exits 1."""
        if self.run_dir is None:
            return
        marker = self.run_dir / f"halt-{os.getpid()}.json"
        try:
            marker.write_text(json.dumps({"run_id": watcher.run_id, "step": halt.step, "reason": halt.reason,
                                          "source": halt.source, "exit_code": halt.exit_code}))
        except OSError as error:
            logger.warning("nanwatch autowatch: cannot write the halt marker %s: %s", marker, error)


def install_from_environment() -> AutoWatch | None:
    """Install AutoWatch when $NANWATCH_AUTOWATCH is 1; return it, or None."""
    if os.environ.get(AUTOWATCH_ENV) != "1":
        return None
    run_dir = os.environ.get(RUN_DIR_ENV)
    autowatch = AutoWatch(run_dir=Path(run_dir) if run_dir else None)
    autowatch.install()
    return autowatch
