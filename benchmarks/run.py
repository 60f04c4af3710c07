"""Run every benchmark and write BENCHMARKS.md: ``python -m benchmarks.run [--quick]``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import client_overhead, hot_path, report, scaling, service_throughput
from benchmarks.machine import describe_machine
from benchmarks.models import Workload, count_parameters, mlp_workload, transformer_workload
from benchmarks.plot import plot_scaling

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
FINDINGS = Path(__file__).with_name("findings.md")
# A hand-written section at the end of the report, which a rerun keeps.
CHANGES_HEADING = "## Changes and their effect"


@dataclass(kw_only=True)
class Config:
    """Sizes and repeat counts of one benchmark run."""

    name: str
    overhead_rounds: int
    overhead_steps: int = 10
    hot_path_rounds: int = 5
    hot_path_repeats: int = 10
    sync_steps: int = 10
    rank_counts: tuple[int, ...] = (64, 1024, 4096)
    throughput_rounds: int = 1
    warmup_s: float = 1.0
    measure_s: float = 3.0
    halt_ranks: int = 64
    halt_trials: int = 20
    model_sizes: tuple[int, ...] = (1_000_000, 4_000_000, 12_000_000, 50_000_000)
    scaling_rounds: int = 2
    workloads: dict[str, dict[str, int]] = field(default_factory=lambda: {
        "transformer": {"width": 256, "layers": 4, "seq_len": 64, "batch": 8},
        "mlp": {"parameter_count": 2_000_000, "batch": 64},
    })


QUICK = Config(name="quick", overhead_rounds=4, hot_path_rounds=5, throughput_rounds=1, measure_s=2.0,
               halt_trials=20, scaling_rounds=2)
FULL = Config(name="full", overhead_rounds=14, hot_path_rounds=15, throughput_rounds=3, measure_s=4.0,
              halt_trials=100, scaling_rounds=5)


def build_workloads(config: Config) -> list[Workload]:
    return [transformer_workload(**config.workloads["transformer"]), mlp_workload(**config.workloads["mlp"])]


def overhead_section(config: Config) -> tuple[list[report.Table], list[str]]:
    """Measure the client-overhead variants on each workload; return the tables and the target lines."""
    tables, targets = [], []
    for workload in build_workloads(config):
        logger.info("client overhead: %s", workload.name)
        results = client_overhead.measure_client_overhead(workload, rounds=config.overhead_rounds,
                                                          steps=config.overhead_steps)
        summary = client_overhead.summarize_targets(workload, results)
        table = report.Table(
            title=f"Client overhead per training step: {workload.name}, {summary.parameters / 1e6:.1f}M parameters",
            headers=("variant", "median step", "ratio to plain (median of rounds)", "ratio quartiles", "added per step"),
        )
        for name, result in results.items():
            low, high = result.ratio_quartiles()
            table.rows.append((name, report.ms(result.median_s), report.ratio(result.median_ratio),
                               f"{low:.3f}-{high:.3f}", report.ms(result.median_added_s)))
        table.notes.append(f"{config.overhead_rounds} rounds x {config.overhead_steps} steps per variant, "
                           "AdamW, cross-entropy, torch.set_num_threads(1).")
        tables.append(table)
        targets.append(f"| {workload.name}: nanwatch every step <= 1.02x plain | {report.ratio(summary.ratio)} "
                       f"| {report.verdict(summary.ratio <= 1.02)} |")
        targets.append(f"| {workload.name}: detect_anomaly adds >= 20x nanwatch's time "
                       f"| {summary.anomaly_multiple:.1f}x ({report.ms(summary.anomaly_added_s)} vs "
                       f"{report.ms(summary.added_s)}) | {report.verdict(summary.anomaly_multiple >= 20)} |")
    return tables, targets


def hot_path_section(config: Config) -> tuple[list[report.Table], list[str]]:
    """Measure the Watcher's summaries against fused norm passes, and count host syncs per step."""
    tables, targets = [], []
    for workload in build_workloads(config):
        logger.info("hot path: %s", workload.name)
        results = hot_path.measure_hot_path(workload, rounds=config.hot_path_rounds, repeats=config.hot_path_repeats)
        table = report.Table(
            title=f"Hot path: {workload.name}, {count_parameters(workload.model) / 1e6:.1f}M parameters",
            headers=("work per step", "median time", f"ratio to {hot_path.FUSED}"),
        )
        for name, result in results.items():
            table.rows.append((name, report.ms(result.median_s, 3), report.ratio(result.median_ratio)))
        tables.append(table)
        summaries = results[hot_path.ALL_SUMMARIES].median_ratio
        targets.append(f"| {workload.name}: step summaries <= 1.3x one fused norm pass | {report.ratio(summaries)} "
                       f"| {report.verdict(summaries <= 1.3)} |")

        syncs = hot_path.count_syncs_per_step(workload, steps=config.sync_steps)
        sync_table = report.Table(
            title=f"Host synchronizations per training step: {workload.name}",
            headers=("variant", "calls per step", "added over the plain step"),
            notes=["Counted by wrapping Tensor.item/tolist/cpu/numpy/__bool__/__float__/__int__/__index__. "
                   "The plain step's item() calls come from AdamW reading its step counters."],
        )
        plain = sum(syncs[client_overhead.PLAIN].values())
        for name, counted in syncs.items():
            listed = ", ".join(f"{method} {value:g}" for method, value in sorted(counted.items())) or "none"
            sync_table.rows.append((name, listed, f"{sum(counted.values()) - plain:g}"))
        tables.append(sync_table)
        added = sum(syncs[client_overhead.WATCHER_NO_SERVICE].values()) - plain
        targets.append(f"| {workload.name}: at most one host sync added per step | {added:g} "
                       f"| {report.verdict(added <= 1)} |")
    return tables, targets


def service_section(config: Config) -> tuple[list[report.Table], list[str], dict]:
    """Measure throughput per rank count against the bare servers, and the HALT fan-out latency."""
    logger.info("service throughput: %s ranks", config.rank_counts)
    samples = service_throughput.measure_throughput(config.rank_counts, rounds=config.throughput_rounds,
                                                    warmup_s=config.warmup_s, measure_s=config.measure_s)
    table = report.Table(
        title="Service throughput over gRPC on loopback (one server process, one load process)",
        headers=("server", "ranks", "messages/s (measured)", "server CPU s per 1,000", "messages per server CPU-s",
                 "RSS per rank", "ratio to sink (measured)", "ratio to sink (per CPU-s)"),
        notes=[f"Medians of {config.throughput_rounds} round(s); {config.measure_s:g} s windows after "
               f"{config.warmup_s:g} s warm-up. Each simulated rank writes 1,792-byte WatchRequests as fast as "
               "flow control allows; 64 streams share one TCP connection. sink and echo are bare grpc.aio "
               "stream handlers on raw bytes (sink reads, echo sends each message back). The load process "
               "shares the 2 cores with the server, so 'measured' is bounded by the client as well; "
               "'per server CPU-s' is 1,000 / (CPU s per 1,000), what one fully busy server core would take."],
    )
    targets = []
    for ranks in config.rank_counts:
        table.rows += [_throughput_row(samples, kind, ranks) for kind in service_throughput.KINDS]
        targets.append(_bare_ratio_target(samples, ranks))
    measured_counts = [ranks for ranks in config.rank_counts if not _failure(samples[("nanwatch", ranks)])]
    failed_counts = [ranks for ranks in config.rank_counts if ranks not in measured_counts]
    largest = max(measured_counts, default=0)
    if largest:
        capacity = service_throughput.median_of(samples[("nanwatch", largest)], "reports_per_cpu_s")
        measured = service_throughput.median_of(samples[("nanwatch", largest)], "reports_per_s")
        failed_note = f"; streams failed to open at {failed_counts} ranks" if failed_counts else ""
        targets.append(f"| one process sustains 16,384 ranks at 1 report/s | measured {report.count(measured)}/s at "
                       f"{largest} ranks, {report.count(capacity)} per server CPU-s{failed_note} "
                       f"| {report.verdict(capacity >= 16384 and not failed_counts)} |")

    logger.info("halt latency: %d ranks, %d trials", config.halt_ranks, config.halt_trials)
    halt = service_throughput.measure_halt_latency(ranks=config.halt_ranks, trials=config.halt_trials)
    halt_table = report.Table(
        title=f"HALT fan-out: NaN report on rank 0 to HALT on the ranks of a {halt.ranks}-rank run",
        headers=("measured until", "p50", "p99", "max", "trials"),
        notes=["Each trial registers a new run, opens every rank's Watch stream, waits until the service lists "
               "them all as connected, then sends one report with a NaN loss on rank 0; no other traffic."],
    )
    for label, first in (("HALT on every rank", False), ("HALT on the first rank", True)):
        values = halt.first_rank_s if first else halt.all_ranks_s
        halt_table.rows.append((label, report.ms(halt.quantile(0.5, first=first)),
                                report.ms(halt.quantile(0.99, first=first)), report.ms(max(values)), str(len(values))))
    p99 = halt.quantile(0.99)
    targets.append(f"| p99 HALT fan-out at {halt.ranks} ranks < 50 ms | {report.ms(p99)} | {report.verdict(p99 < 0.05)} |")
    return [table, halt_table], targets, samples


def _failure(rows: list[service_throughput.ThroughputSample]) -> str:
    return next((row.failure for row in rows if row.failure), "")


def _throughput_row(samples: dict, kind: str, ranks: int) -> tuple[str, ...]:
    rows, sink = samples[(kind, ranks)], samples[("sink", ranks)]
    failure = _failure(rows) or _failure(sink)
    if failure:
        return (kind, str(ranks), f"failed: {failure}", "-", "-", "-", "-", "-")
    rate, per_cpu = (service_throughput.median_of(rows, name) for name in ("reports_per_s", "reports_per_cpu_s"))
    return (
        kind, str(ranks), report.count(rate), f"{service_throughput.median_of(rows, 'cpu_s_per_1000'):.3f}",
        report.count(per_cpu), f"{service_throughput.median_of(rows, 'rss_per_rank_bytes') / 1024:.1f} KiB",
        report.ratio(rate / service_throughput.median_of(sink, "reports_per_s")),
        report.ratio(per_cpu / service_throughput.median_of(sink, "reports_per_cpu_s")),
    )


def _bare_ratio_target(samples: dict, ranks: int) -> str:
    nanwatch, sink, echo = (samples[(kind, ranks)] for kind in ("nanwatch", "sink", "echo"))
    failure = _failure(nanwatch) or _failure(sink) or _failure(echo)
    if failure:
        return f"| {ranks} ranks: nanwatch >= 0.5x the bare stream's throughput | failed: {failure} | **not met** |"
    rate = service_throughput.median_of(nanwatch, "reports_per_s")
    to_sink = rate / service_throughput.median_of(sink, "reports_per_s")
    to_echo = rate / service_throughput.median_of(echo, "reports_per_s")
    return (f"| {ranks} ranks: nanwatch >= 0.5x the bare stream's throughput | sink {report.ratio(to_sink)}, "
            f"echo {report.ratio(to_echo)} | {report.verdict(min(to_sink, to_echo) >= 0.5)} |")


def scaling_section(config: Config) -> tuple[list[report.Table], list[scaling.SizePoint]]:
    logger.info("model-size scaling: %s", config.model_sizes)
    points = scaling.measure_model_sizes(config.model_sizes, rounds=config.scaling_rounds,
                                         steps=config.overhead_steps)
    table = report.Table(
        title="Client overhead against model size (MLP, batch 32, service process on 127.0.0.1)",
        headers=("parameters", "plain step", "nanwatch step", "ratio", "added per step", "added per 1M parameters"),
        notes=[f"{config.scaling_rounds} rounds x {config.overhead_steps} steps per variant."],
    )
    for point in points:
        added = point.watched.median_added_s
        table.rows.append((f"{point.parameters / 1e6:.1f}M", report.ms(point.plain.median_s),
                           report.ms(point.watched.median_s), report.ratio(point.watched.median_ratio),
                           report.ms(added), report.ms(added / (point.parameters / 1e6), 3)))
    return [table], points


def run_all(config: Config, output: Path, command: str) -> None:
    """Run every benchmark of config and write the Markdown report to output (and its plot beside it)."""
    torch.set_num_threads(1)
    started = time.monotonic()
    machine = describe_machine()
    overhead_tables, overhead_targets = overhead_section(config)
    hot_tables, hot_targets = hot_path_section(config)
    service_tables, service_targets, samples = service_section(config)
    scaling_tables, points = scaling_section(config)
    # Beside the default report the plot goes into benchmarks/, which the benchmarks own.
    plot_dir = Path(__file__).parent if output.parent.resolve() == REPO_ROOT else output.parent
    plot_path = plot_dir / "scaling.png"
    plotted = plot_scaling(points, samples, plot_path)

    parts = ["# nanwatch benchmarks", "", report.render_machine(machine, command),
             f"Run `{config.name}` took {time.monotonic() - started:.0f} s. Ratios are medians of per-round ratios "
             "from interleaved trials (every variant once per round, rotating order), so slow drifts of this "
             "shared machine cancel. Regenerate this file with the command above.", "",
             "## Targets", "", "| target | measured | verdict |", "| --- | --- | --- |",
             *overhead_targets, *hot_targets, *service_targets, "",
             "## Client", "", *[table.render() for table in overhead_tables + hot_tables],
             "## Service", "", *[table.render() for table in service_tables],
             "## Scaling", "", *[table.render() for table in scaling_tables]]
    if plotted:
        parts += [f"![client overhead against model size, service throughput against ranks]({plot_path.relative_to(output.parent.resolve()) if plot_dir != output.parent else plot_path.name})", ""]
    if FINDINGS.exists():
        parts += [FINDINGS.read_text(encoding="utf-8")]
    changes = preserved_changes(output)
    output.write_text("\n".join(parts + [changes] if changes else parts), encoding="utf-8")
    logger.info("wrote %s in %.0f s", output, time.monotonic() - started)


def preserved_changes(output: Path) -> str:
    """Return the CHANGES_HEADING section of an existing report, from its heading to the end, or ""."""
    if not output.exists():
        return ""
    text = output.read_text(encoding="utf-8")
    start = text.find(f"\n{CHANGES_HEADING}\n")
    return text[start + 1 :] if start >= 0 else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run nanwatch's benchmarks and write BENCHMARKS.md.")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter windows (about 3 minutes on 2 cores, "
                        "against about 8 without it)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "BENCHMARKS.md", help="Markdown file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("nanwatch").setLevel(logging.ERROR)  # expected outage warnings of the no-service variant
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    if args.output.resolve() != (REPO_ROOT / "BENCHMARKS.md").resolve():
        command += f" --output {args.output}"
    run_all(QUICK if args.quick else FULL, args.output, command)


if __name__ == "__main__":
    main(sys.argv[1:])
