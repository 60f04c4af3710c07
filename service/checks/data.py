"""Stage 1: NaN/Inf in the tensors of a batch, from rank-side summaries or whole batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from nanwatch.service.checks.catalog import Where, format_list, new_finding
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb


def check_batch_summaries(
    summaries: Sequence[pb.TensorSummary], where: Where, thresholds: Thresholds
) -> list[pb.Finding]:
    """Return a DATA_NONFINITE finding for each summarized batch tensor that contains NaN or Inf."""
    findings = []
    for summary in summaries:
        if summary.nan_count > 0 or summary.inf_count > 0:
            findings.append(_summary_finding(summary, where, thresholds))
    return findings


def _summary_finding(summary: pb.TensorSummary, where: Where, thresholds: Thresholds) -> pb.Finding:
    samples = list(summary.nonfinite_sample_indices)
    values = {
        "nan_count": str(summary.nan_count),
        "inf_count": str(summary.inf_count),
        "shape": _format_shape(summary.shape),
    }
    in_samples = f" in batch samples {format_list(samples, thresholds.max_listed)}" if samples else ""
    message = (
        f"Batch tensor '{summary.name}' {_format_shape(summary.shape)} on rank {where.rank} at step "
        f"{where.step} contains {summary.nan_count} NaN and {summary.inf_count} Inf values{in_samples}."
    )
    return new_finding(
        "DATA_NONFINITE",
        pb.SEVERITY_CRITICAL,
        where,
        message=message,
        fix=_fix_text(summary.name),
        tensor=summary.name,
        values=values,
        sample_indices=samples,
    )


def check_batch_arrays(
    tensors: Mapping[str, np.ndarray],
    sample_ids: Sequence[int],
    where: Where,
    thresholds: Thresholds,
) -> list[pb.Finding]:
    """Return a DATA_NONFINITE finding for each whole batch tensor that contains NaN or Inf.

    Samples are rows of the first dimension. When sample_ids has one id per
    row, findings name those ids; otherwise they name batch indices.
    """
    findings = []
    for name, array in tensors.items():
        if not np.issubdtype(array.dtype, np.floating):
            continue  # integer and bool tensors cannot hold NaN or Inf
        nonfinite = ~np.isfinite(array)
        if nonfinite.any():
            findings.append(_array_finding(name, array, nonfinite, sample_ids, where, thresholds))
    return findings


def _array_finding(
    name: str,
    array: np.ndarray,
    nonfinite: np.ndarray,
    sample_ids: Sequence[int],
    where: Where,
    thresholds: Thresholds,
) -> pb.Finding:
    # Measure: counts, offending rows and the first few element positions.
    nan_count = int(np.isnan(array).sum())
    inf_count = int(nonfinite.sum()) - nan_count
    rows = _nonfinite_rows(nonfinite)
    uses_ids = array.ndim > 0 and len(sample_ids) == array.shape[0]
    samples = [int(sample_ids[row]) for row in rows] if uses_ids else rows
    positions = _first_positions(nonfinite, thresholds.max_listed)

    # Assemble the finding.
    label = "sample ids" if uses_ids else "batch samples"
    in_samples = f" in {label} {format_list(samples, thresholds.max_listed)}" if samples else ""
    message = (
        f"Batch tensor '{name}' {_format_shape(array.shape)} on rank {where.rank} at step {where.step} "
        f"contains {nan_count} NaN and {inf_count} Inf values{in_samples}; first positions {positions}."
    )
    values = {
        "nan_count": str(nan_count),
        "inf_count": str(inf_count),
        "shape": _format_shape(array.shape),
        "positions": positions,
        "sample_indices_are": "sample_ids" if uses_ids else "batch_indices",
    }
    return new_finding(
        "DATA_NONFINITE",
        pb.SEVERITY_CRITICAL,
        where,
        message=message,
        fix=_fix_text(name),
        tensor=name,
        values=values,
        sample_indices=samples,
    )


def _nonfinite_rows(nonfinite: np.ndarray) -> list[int]:
    """Return the first-dimension indices that contain a non-finite element; [] for a 0-d tensor."""
    if nonfinite.ndim == 0:
        return []
    per_row = nonfinite.reshape(nonfinite.shape[0], -1).any(axis=1)
    return [int(row) for row in np.flatnonzero(per_row)]


def _first_positions(nonfinite: np.ndarray, limit: int) -> str:
    """Return the first `limit` element positions as "(row, col), ..." and how many more there are."""
    first = np.argwhere(nonfinite)[:limit]
    shown = ", ".join("(" + ", ".join(str(int(i)) for i in index) + ")" for index in first)
    remaining = int(nonfinite.sum()) - len(first)
    return f"{shown} and {remaining} more" if remaining > 0 else shown


def _format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(dim)) for dim in shape) + "]"


def _fix_text(name: str) -> str:
    return (
        f"Drop or mask the samples whose '{name}' contains NaN/Inf before the forward pass "
        f"(keep rows where torch.isfinite({name}) is true for every element, or compute the loss "
        f"only on them), or fix the data source that writes NaN/Inf into '{name}'."
    )
