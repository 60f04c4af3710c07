"""The Watcher's per-step summaries against one fused norm pass over the same gradients, and host syncs per step."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.client_overhead import (
    CLIP_NONFINITE, DETECT_ANOMALY, PLAIN, WATCHER_CHECK_BATCH, WATCHER_NO_SERVICE, build_variant,
    free_loopback_port, train_step,
)
from benchmarks.host_syncs import count_host_syncs
from benchmarks.models import Workload
from benchmarks.trials import VariantResult, run_interleaved, timed_trial
from nanwatch.client.summaries import foreach_norms
from nanwatch.client.watcher import Watcher

FUSED = "torch._foreach_norm(grads), float32"
FUSED_FLOAT64 = "torch._foreach_norm(grads, dtype=float64)"
NANWATCH_NORMS = "nanwatch foreach_norms(grads) (float32, grouped, stacked)"
STEP_HOOKS = ("Watcher step pre- and post-hook (gradient norms, one host copy and a report every step; "
              "parameter norms, update snapshot and update norm every 10th)")
ALL_SUMMARIES = "all summaries of one step (pre + post hook, loss, check_batch)"


@dataclass(kw_only=True)
class HotPathSetup:
    """A Watcher on a model whose gradients and loss are filled, ready for hook calls without training."""

    watcher: Watcher
    optimizer: torch.optim.Optimizer
    grads: list[torch.Tensor]
    loss: torch.Tensor
    workload: Workload


def prepare(workload: Workload) -> HotPathSetup:
    """Run one forward and backward pass under a Watcher with no service, and keep its gradients."""
    variant = build_variant(workload, WATCHER_NO_SERVICE, f"127.0.0.1:{free_loopback_port()}", run_id="bench-hot-path")
    assert variant.watcher is not None
    loss = variant.criterion(variant.model(workload.inputs), workload.targets)
    loss.backward()
    grads = [parameter.grad for parameter in variant.model.parameters() if parameter.grad is not None]
    return HotPathSetup(watcher=variant.watcher, optimizer=variant.optimizer, grads=grads, loss=loss.detach(),
                        workload=workload)


def _step_hooks(setup: HotPathSetup) -> None:
    """Run both optimizer step hooks; the post-hook advances the Watcher's step, so trials cover its cadences."""
    setup.watcher.step_pre_hook(setup.optimizer, (), {})
    setup.watcher.step_post_hook(setup.optimizer, (), {})


def _all_summaries(setup: HotPathSetup) -> None:
    setup.watcher.check_batch(inputs=setup.workload.inputs, targets=setup.workload.targets)
    setup.watcher.observe_loss(setup.loss)
    _step_hooks(setup)


def measure_hot_path(workload: Workload, *, rounds: int, repeats: int = 10) -> dict[str, VariantResult]:
    """Return interleaved times of the Watcher's summaries and of fused norm passes; FUSED is the baseline.

    repeats should be a multiple of 10, the Watcher's update-norm period, so that each
    trial contains the same share of steps that copy the parameters.
    """
    setup = prepare(workload)
    watcher, optimizer, grads = setup.watcher, setup.optimizer, setup.grads
    actions: dict[str, Callable[[], object]] = {
        FUSED: lambda: torch._foreach_norm(grads),
        FUSED_FLOAT64: lambda: torch._foreach_norm(grads, dtype=torch.float64),
        NANWATCH_NORMS: lambda: foreach_norms(grads),
        STEP_HOOKS: lambda: _step_hooks(setup),
        ALL_SUMMARIES: lambda: _all_summaries(setup),
    }
    try:
        for action in actions.values():
            timed_trial(action, 2)()
        trials = {name: timed_trial(action, repeats) for name, action in actions.items()}
        return run_interleaved(trials, rounds=rounds, baseline=FUSED)
    finally:
        watcher.close()


def count_syncs_per_step(workload: Workload, *, steps: int = 10) -> dict[str, collections.Counter[str]]:
    """Return the host-sync calls per training step of the plain step and the checking variants."""
    names = (PLAIN, WATCHER_NO_SERVICE, WATCHER_CHECK_BATCH, CLIP_NONFINITE, DETECT_ANOMALY)
    dead_endpoint = f"127.0.0.1:{free_loopback_port()}"
    counts: dict[str, collections.Counter[str]] = {}
    for name in names:
        endpoint = dead_endpoint if name in (WATCHER_NO_SERVICE, WATCHER_CHECK_BATCH) else None
        variant = build_variant(workload, name, endpoint, run_id=f"bench-syncs-{time.time_ns()}")
        train_step(variant, workload)  # the first step sends the forward trace; count the steady state
        with count_host_syncs() as counted:
            for _ in range(steps):
                train_step(variant, workload)
        counts[name] = collections.Counter({method: count / steps for method, count in counted.items()})
        if variant.watcher is not None:
            variant.watcher.close()
    return counts
