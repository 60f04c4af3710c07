"""Smoke test: every benchmark's quick path still runs end to end at tiny sizes (no timing assertions)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import run

TINY = run.Config(
    name="smoke", overhead_rounds=1, overhead_steps=1, hot_path_rounds=1, hot_path_repeats=1, sync_steps=1,
    rank_counts=(4,), throughput_rounds=1, warmup_s=0.2, measure_s=0.3, halt_ranks=4, halt_trials=2,
    model_sizes=(20_000,), scaling_rounds=1,
    workloads={"transformer": {"width": 16, "layers": 1, "seq_len": 8, "batch": 2, "vocab": 50},
               "mlp": {"parameter_count": 20_000, "batch": 4}},
)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> str:
    output = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    threads = torch.get_num_threads()
    try:
        run.run_all(TINY, output, "pytest smoke")
    finally:
        torch.set_num_threads(threads)
    return output.read_text(encoding="utf-8")


@pytest.mark.parametrize("section", ["## Targets", "## Client", "## Service", "## Scaling"])
def test_report_has_section(written: str, section: str) -> None:
    assert section in written


@pytest.mark.parametrize("row", [
    "| plain step |", "| torch.autograd.detect_anomaly |", "| nanwatch |", "| sink |", "| echo |",
    "| HALT on every rank |",
])
def test_report_has_row(written: str, row: str) -> None:
    assert row in written


def test_report_names_command(written: str) -> None:
    assert "Command: `pytest smoke`" in written


def test_report_names_machine(written: str) -> None:
    assert "- grpcio:" in written


def test_rerun_keeps_changes_section(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    output.write_text(f"# old tables\n\n{run.CHANGES_HEADING}\n\n| before | after |\n", encoding="utf-8")
    assert run.preserved_changes(output) == f"{run.CHANGES_HEADING}\n\n| before | after |\n"


def test_first_run_no_changes_section(tmp_path: Path) -> None:
    assert run.preserved_changes(tmp_path / "BENCHMARKS.md") == ""


def test_localization_rows_present() -> None:
    from benchmarks import localization_overhead as localization
    from benchmarks.models import mlp_workload

    threads = torch.get_num_threads()
    try:
        workload = mlp_workload(parameter_count=20_000, batch=4)
        results = localization.measure(workload, rounds=1, steps=1)
        table = localization.render(workload, results, localization.capture_cost(workload, repeats=10),
                                    localization.replay_cost(workload, repeats=1))
    finally:
        torch.set_num_threads(threads)
    for variant in localization.VARIANTS:
        assert f"| {variant} |" in table
    assert "| one localization of a failing step (replay) |" in table


def test_client_revisions_table_has_both_revisions() -> None:
    from benchmarks import client_revisions

    results = client_revisions.compare("HEAD", "mlp", rounds=1, tiny=True)
    table = client_revisions.render_table("mlp", results, rounds=1)
    assert "| HEAD (before) |" in table
    assert f"| {client_revisions.AFTER} |" in table
    for times in results:
        assert len(times.ratios()) == 1
        assert times.ratios()[0] > 0
