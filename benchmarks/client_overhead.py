"""Training-step time with and without nanwatch and with the tools engineers use today, side by side."""

from __future__ import annotations

import copy
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.models import Workload, count_parameters
from benchmarks.trials import VariantResult, run_interleaved, timed_trial
from nanwatch.client.watcher import Watcher
from benchmarks.service_throughput import ServerProcess

# clip_grad_norm_ as torch ships it: a Watcher wraps the module attribute to observe clipping,
# and the clipping variant must not pay for that wrapper.
TORCH_CLIP_GRAD_NORM = getattr(torch.nn.utils.clip_grad.clip_grad_norm_, "__wrapped__",
                               torch.nn.utils.clip_grad.clip_grad_norm_)

PLAIN = "plain step"
WATCHER_SERVICE = "nanwatch, every step, service process on 127.0.0.1"
WATCHER_NO_SERVICE = "nanwatch, every step, no service"
WATCHER_CHECK_BATCH = "nanwatch + check_batch every batch"
DETECT_ANOMALY = "torch.autograd.detect_anomaly"
CLIP_NONFINITE = "clip_grad_norm_(error_if_nonfinite=True)"
ALL_VARIANTS = (PLAIN, WATCHER_SERVICE, WATCHER_NO_SERVICE, WATCHER_CHECK_BATCH, DETECT_ANOMALY, CLIP_NONFINITE)


@dataclass(kw_only=True)
class Variant:
    """One copy of the model with its own optimizer, loss module and, for nanwatch variants, a Watcher."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    watcher: Watcher | None = None
    check_batch: bool = False
    anomaly: bool = False
    clip: bool = False


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 where nothing listens (at the time of the call)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def loopback_service() -> Iterator[ServerProcess]:
    """Run the nanwatch service in its own process on 127.0.0.1, as a deployment does, with a temporary store.

    The service shares the machine's cores with the training process but not its GIL.
    """
    with tempfile.TemporaryDirectory(prefix="nanwatch-bench-") as directory:
        server = ServerProcess("nanwatch", directory)
        try:
            yield server
        finally:
            server.stop()


def build_variant(workload: Workload, name: str, endpoint: str | None, run_id: str) -> Variant:
    """Return the variant called name on a fresh copy of the workload's model (same initial weights)."""
    model = copy.deepcopy(workload.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    variant = Variant(model=model, optimizer=optimizer, criterion=criterion,
                      anomaly=name == DETECT_ANOMALY, clip=name == CLIP_NONFINITE,
                      check_batch=name == WATCHER_CHECK_BATCH)
    if endpoint is not None:
        variant.watcher = Watcher(model, optimizer, loss_fn=criterion, endpoint=endpoint, run_id=run_id,
                                  flush_timeout_s=0.5)
    return variant


def train_step(variant: Variant, workload: Workload) -> None:
    """Run one forward, backward and optimizer step of variant."""
    if variant.check_batch and variant.watcher is not None:
        variant.watcher.check_batch(inputs=workload.inputs, targets=workload.targets)
    anomaly = torch.autograd.detect_anomaly(check_nan=True) if variant.anomaly else nullcontext()
    with anomaly:
        loss = variant.criterion(variant.model(workload.inputs), workload.targets)
        variant.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    if variant.clip:
        TORCH_CLIP_GRAD_NORM(variant.model.parameters(), max_norm=1.0, error_if_nonfinite=True)
    variant.optimizer.step()


def make_trial(variant: Variant, workload: Workload, steps: int) -> Callable[[], float]:
    """Return a trial that runs steps training steps and returns the mean seconds per step."""
    return timed_trial(lambda: train_step(variant, workload), steps)


def measure_client_overhead(
    workload: Workload, *, rounds: int, steps: int, variants: tuple[str, ...] = ALL_VARIANTS,
    warmup_steps: int = 2,
) -> dict[str, VariantResult]:
    """Return the interleaved step times of each variant on workload; PLAIN is the baseline.

    steps per trial should be a multiple of the Watcher's update-norm period (10), so
    every trial contains the same share of steps that copy the parameters.
    """
    warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
    dead_endpoint = f"127.0.0.1:{free_loopback_port()}"
    with loopback_service() as service, ExitStack() as watchers:
        built: dict[str, Variant] = {}
        for index, name in enumerate(variants):
            endpoint = _endpoint_for(name, service.endpoint, dead_endpoint)
            built[name] = build_variant(workload, name, endpoint, run_id=f"bench-{workload.name}-{index}-{time.time_ns()}")
            if built[name].watcher is not None:
                watchers.callback(built[name].watcher.close)
        for variant in built.values():
            make_trial(variant, workload, warmup_steps)()
        trials = {name: make_trial(variant, workload, steps) for name, variant in built.items()}
        return run_interleaved(trials, rounds=rounds, baseline=PLAIN)


def _endpoint_for(name: str, service_endpoint: str, dead_endpoint: str) -> str | None:
    if name in (WATCHER_SERVICE, WATCHER_CHECK_BATCH):
        return service_endpoint
    if name == WATCHER_NO_SERVICE:
        return dead_endpoint
    return None


@dataclass(kw_only=True)
class OverheadSummary:
    """The two client-overhead targets of one workload."""

    parameters: int
    ratio: float
    added_s: float
    anomaly_added_s: float

    @property
    def anomaly_multiple(self) -> float:
        """How many times more time detect_anomaly adds than nanwatch; inf when nanwatch adds none."""
        return self.anomaly_added_s / self.added_s if self.added_s > 0 else float("inf")


def summarize_targets(workload: Workload, results: dict[str, VariantResult]) -> OverheadSummary:
    """Return nanwatch's ratio to the plain step and its added time against detect_anomaly's."""
    watched = results[WATCHER_SERVICE]
    anomaly = results.get(DETECT_ANOMALY)
    return OverheadSummary(
        parameters=count_parameters(workload.model), ratio=watched.median_ratio, added_s=watched.median_added_s,
        anomaly_added_s=anomaly.median_added_s if anomaly is not None else float("nan"),
    )
