"""Cost of localization: healthy steps with it on and off, against the plain step and detect_anomaly.

Run: ``python -m benchmarks.localization_overhead [--rounds N] [--steps N]``. Prints a
Markdown table. Every variant trains its own copy of the same model, interleaved
round by round (benchmarks.trials), and reports with no service listening, so
the table shows the client's cost alone. A last row times one localization of a
failing step (the replay) in plain steps.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from benchmarks.client_overhead import free_loopback_port
from benchmarks.models import Workload, count_parameters, mlp_workload, transformer_workload
from benchmarks.trials import VariantResult, run_interleaved, timed_trial
from nanwatch.client.localize import Localizer, StepCapture
from nanwatch.client.watcher import Watcher

PLAIN = "plain step"
LOCALIZE_OFF = "nanwatch, localize=False"
LOCALIZE_ON = "nanwatch, localize=True (default)"
ANOMALY = "torch.autograd.detect_anomaly"
VARIANTS = (PLAIN, LOCALIZE_OFF, LOCALIZE_ON, ANOMALY)


def _step_runner(workload: Workload, name: str, endpoint: str) -> tuple[Callable[[], None], Watcher | None]:
    model = copy.deepcopy(workload.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    watcher = None
    if name in (LOCALIZE_OFF, LOCALIZE_ON):
        watcher = Watcher(model, optimizer, loss_fn=criterion, endpoint=endpoint, flush_timeout_s=0.2,
                          localize=name == LOCALIZE_ON)
    anomaly = name == ANOMALY

    def step() -> None:
        with torch.autograd.detect_anomaly(check_nan=True) if anomaly else nullcontext():
            loss = criterion(model(workload.inputs), workload.targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()

    return step, watcher


def measure(workload: Workload, *, rounds: int, steps: int) -> dict[str, VariantResult]:
    """Return the interleaved step times of each variant; PLAIN is the baseline."""
    warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
    endpoint = f"127.0.0.1:{free_loopback_port()}"
    runners = {name: _step_runner(workload, name, endpoint) for name in VARIANTS}
    try:
        for step, _ in runners.values():
            timed_trial(step, 2)()
        trials = {name: timed_trial(step, steps) for name, (step, _) in runners.items()}
        return run_interleaved(trials, rounds=rounds, baseline=PLAIN)
    finally:
        for _, watcher in runners.values():
            if watcher is not None:
                watcher.close()


def capture_cost(workload: Workload, *, repeats: int) -> float:
    """Return the seconds that the capture hooks of one forward pass take, timed alone over many calls."""
    model = copy.deepcopy(workload.model)
    capture = StepCapture(model)
    arguments = (workload.inputs,)
    started = time.perf_counter()
    for _ in range(repeats):
        output = torch.zeros(2, requires_grad=True) * 1.0
        capture.begin_call(arguments, {})
        capture._on_forward(model, arguments, output)
        capture.clear()
    elapsed = time.perf_counter() - started
    baseline_started = time.perf_counter()
    for _ in range(repeats):
        torch.zeros(2, requires_grad=True) * 1.0
    elapsed -= time.perf_counter() - baseline_started
    capture.remove()
    return elapsed / repeats


def replay_cost(workload: Workload, *, repeats: int) -> float:
    """Return the median time of one localization of a captured step, in seconds."""
    model = copy.deepcopy(workload.model)
    capture = StepCapture(model)
    localizer = Localizer(model, capture)
    criterion = nn.CrossEntropyLoss()
    times = []
    for _ in range(repeats):
        capture.clear()
        output = model(workload.inputs)
        capture.capture_loss(criterion, "CrossEntropyLoss", (output, workload.targets), {})
        criterion(output, workload.targets).backward()
        started = time.perf_counter()
        localizer.localize(step=0, rank=0, loss_finite=True)
        times.append(time.perf_counter() - started)
    capture.remove()
    return sorted(times)[len(times) // 2]


def render(workload: Workload, results: dict[str, VariantResult], capture_s: float, replay_s: float) -> str:
    """Return the Markdown rows of one workload."""
    plain = results[PLAIN].median_s
    on, off = results[LOCALIZE_ON].times_s, results[LOCALIZE_OFF].times_s
    added_on = statistics.median(a - b for a, b in zip(on, off))
    anomaly_added = results[ANOMALY].median_added_s
    lines = [f"\n{workload.name}, {count_parameters(workload.model) / 1e6:.1f}M parameters\n",
             "| variant | median step | x plain step (IQR) |", "| --- | --- | --- |"]
    for name in VARIANTS:
        low, high = results[name].ratio_quartiles()
        lines.append(f"| {name} | {results[name].median_s * 1e3:.2f} ms | {results[name].median_ratio:.3f}x "
                     f"({low:.3f}-{high:.3f}) |")
    lines.append(f"| localize=True minus localize=False, median of rounds | {added_on * 1e6:.0f} us | "
                 f"{added_on / plain:+.2%} of a plain step |")
    lines.append(f"| capture hooks of one forward pass, timed alone | {capture_s * 1e6:.1f} us | "
                 f"{capture_s / plain:.3%} of a plain step |")
    watched_added = results[LOCALIZE_ON].median_added_s
    ratio = f"{anomaly_added / watched_added:.1f}x" if watched_added > 0 else "nanwatch added no measurable time"
    lines.append(f"| detect_anomaly's added time / nanwatch's (localize=True), both against the plain step | - | "
                 f"{ratio} |")
    lines.append(f"| one localization of a failing step (replay) | {replay_s * 1e3:.1f} ms | "
                 f"{replay_s / plain:.1f} plain steps |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"rounds {args.rounds}, steps per trial {args.steps}, torch {torch.__version__}, 1 thread")
    for workload in (transformer_workload(), mlp_workload()):
        results = measure(workload, rounds=args.rounds, steps=args.steps)
        capture_s = capture_cost(workload, repeats=5000)
        print(render(workload, results, capture_s, replay_cost(workload, repeats=5)))


if __name__ == "__main__":
    main()
