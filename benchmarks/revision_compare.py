"""Before/after in one process: the step check and rank comparer of a git revision against the working tree.

Usage, from the repository root:
    python -m benchmarks.revision_compare --before REV

The REVISION_FILES of REV are loaded as separate modules next to the current ones,
and both are timed in interleaved rounds, so the comparison shares the machine's
load. The "before" Watcher keeps the current watcher.py, trace.py and sender; its
step check, step state, batch summaries and host transfer come from REV.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from benchmarks.client_overhead import (
    PLAIN, WATCHER_CHECK_BATCH, WATCHER_NO_SERVICE, build_variant, free_loopback_port, train_step,
)
from benchmarks.hot_path import prepare
from benchmarks.models import mlp_workload, transformer_workload
from benchmarks.trials import run_interleaved, timed_trial
from nanwatch.client import step_check as current_step_check
from nanwatch.client import step_state as current_step_state
from nanwatch.client import summaries as current_summaries
from nanwatch.client import transfer as current_transfer
from nanwatch.client.watcher import Watcher
from nanwatch.service.checks import loss_trends as current_trends
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

REVISION_FILES = ("client/summaries.py", "client/transfer.py", "client/step_state.py", "client/step_check.py",
                  "service/checks/loss_trends.py")
# Each loaded client module of REV imports its siblings from the current package; these are
# rebound to the siblings of REV, so that the old step check runs on the old summaries.
_CURRENT_CLIENT = {"summaries": current_summaries, "transfer": current_transfer, "step_state": current_step_state,
                   "step_check": current_step_check}


def load_revision(revision: str, folder: Path) -> dict[str, ModuleType]:
    """Load the REVISION_FILES of a git revision as modules named old_<file stem>, with consistent imports."""
    modules = {}
    for path in REVISION_FILES:
        source = subprocess.run(["git", "show", f"{revision}:{path}"], check=True, capture_output=True,
                                text=True).stdout
        target = folder / Path(path).name
        target.write_text(source)
        name = f"old_{target.stem}"
        spec = importlib.util.spec_from_file_location(name, target)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules[target.stem] = module
        _rebind_siblings(module, modules)
    return modules


def _rebind_siblings(module: ModuleType, loaded: dict[str, ModuleType]) -> None:
    """Point the names that module imported from a current client module at the same names of the loaded one."""
    for stem, current in _CURRENT_CLIENT.items():
        old = loaded.get(stem)
        if old is None or old is module:
            continue
        for name, value in vars(module).copy().items():
            if not name.startswith("__") and getattr(current, name, None) is value and hasattr(old, name):
                setattr(module, name, getattr(old, name))


def use_revision(watcher: Watcher, old: dict[str, ModuleType]) -> None:
    """Give watcher the step check of the loaded revision, and a check_batch that uses its batch summaries."""
    watcher._checker = old["step_check"].StepChecker(watcher._checker.context)
    watcher.check_batch = functools.partial(_old_check_batch, watcher, old["summaries"])  # type: ignore[method-assign]


def _old_check_batch(watcher: Watcher, summaries: ModuleType, **tensors: torch.Tensor) -> None:
    """Watcher.check_batch of the working tree, less the type checks and the batch sender."""
    for name, tensor in tensors.items():
        watcher._checker.state.add_batch(summaries.summarize_batch_tensor(name, tensor))


def compare_client(old: dict[str, ModuleType]) -> None:
    for workload in (transformer_workload(width=256, layers=4, seq_len=64, batch=8),
                     mlp_workload(parameter_count=2_000_000, batch=64)):
        current, before = prepare(workload), prepare(workload)
        use_revision(before.watcher, old)
        grads = current.grads
        trials = {
            "fused float32 norm pass": timed_trial(lambda: torch._foreach_norm(grads), 10),
            "summaries before": timed_trial(_summaries(before), 10),
            "summaries after": timed_trial(_summaries(current), 10),
        }
        _warm_up(trials)
        results = run_interleaved(trials, rounds=7, baseline="fused float32 norm pass")
        print(f"summaries {workload.name}:",
              {name: (round(r.median_s * 1e3, 3), round(r.median_ratio, 3)) for name, r in results.items()})
        current.watcher.close()
        before.watcher.close()
        compare_steps(workload, old)


def compare_steps(workload: object, old: dict[str, ModuleType]) -> None:
    endpoint = f"127.0.0.1:{free_loopback_port()}"
    variants = {"plain": build_variant(workload, PLAIN, None, run_id="plain")}
    for label, name in (("nanwatch", WATCHER_NO_SERVICE), ("nanwatch + check_batch", WATCHER_CHECK_BATCH)):
        for side in ("before", "after"):
            run_id = f"{label.replace(' + ', '-')}-{side}"
            variant = build_variant(workload, WATCHER_NO_SERVICE, endpoint, run_id=run_id)
            variant.check_batch = name == WATCHER_CHECK_BATCH
            if side == "before":
                use_revision(variant.watcher, old)
            variants[f"{label} {side}"] = variant
    trials = {label: _steps(variant, workload) for label, variant in variants.items()}
    _warm_up(trials)
    results = run_interleaved(trials, rounds=5, baseline="plain")
    print(f"training step {workload.name}:",  # type: ignore[attr-defined]
          {name: (round(r.median_s * 1e3, 2), round(r.median_ratio, 3)) for name, r in results.items()})
    for variant in variants.values():
        if variant.watcher is not None:
            variant.watcher.close()


def compare_service(old: dict[str, ModuleType]) -> None:
    thresholds = Thresholds()
    for ranks in (64, 1024, 4096):
        rng = random.Random(ranks)
        reports = [pb.StepReport(step=0, loss=rng.gauss(2.0, 0.1), loss_finite=True) for _ in range(ranks)]
        trials = {"before": _comparer_trial(old["loss_trends"], reports, thresholds),
                  "after": _comparer_trial(current_trends, reports, thresholds)}
        results = run_interleaved(trials, rounds=3, baseline="before")
        print(f"rank comparer, {ranks} ranks:",
              {name: (round(r.median_s * 1e3, 3), round(r.median_ratio, 4)) for name, r in results.items()})


def _warm_up(trials: dict[str, Callable[[], float]]) -> None:
    for trial in trials.values():
        trial()


def _summaries(setup: object) -> Callable[[], None]:
    watcher, optimizer = setup.watcher, setup.optimizer  # type: ignore[attr-defined]

    def run() -> None:
        watcher.check_batch(inputs=setup.workload.inputs, targets=setup.workload.targets)  # type: ignore[attr-defined]
        watcher.observe_loss(setup.loss)  # type: ignore[attr-defined]
        watcher.step_pre_hook(optimizer, (), {})
        watcher.step_post_hook(optimizer, (), {})

    return run


def _steps(variant: object, workload: object) -> Callable[[], float]:
    return timed_trial(lambda: train_step(variant, workload), 10)


def _comparer_trial(module: ModuleType, reports: list[pb.StepReport], thresholds: Thresholds) -> Callable[[], float]:
    def trial() -> float:
        comparer = module.RankLossComparer(world_size=len(reports))
        started = time.perf_counter()
        for step in range(3):
            for rank, report in enumerate(reports):
                report.step = step
                comparer.add("run", rank, report, thresholds)
        return (time.perf_counter() - started) / 3

    return trial


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision whose code is the 'before' side")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="nanwatch-before-") as folder:
        old = load_revision(args.before, Path(folder))
        compare_client(old)
        compare_service(old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
