"""Class targets outside [0, num_classes): found when a classification loss raises on them."""

from __future__ import annotations

import torch

from nanwatch.v1 import nanwatch_pb2 as pb

# Losses that index their input with integer class targets.
CLASS_INDEX_LOSSES = frozenset({"cross_entropy", "nll_loss"})
DEFAULT_IGNORE_INDEX = -100
MAX_LISTED_SAMPLES = 16


def target_range_finding(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int,
                         loss_name: str) -> pb.Finding | None:
    """Return a DATA_TARGET_RANGE finding when an integer target lies outside [0, num_classes), else None.

    The class dimension is 1 for batched logits and 0 for a single sample, as in F.cross_entropy.
    """
    if targets.is_floating_point() or targets.is_complex() or logits.dim() == 0:
        return None
    num_classes = logits.shape[1] if logits.dim() >= 2 else logits.shape[0]
    bad = ((targets < 0) & (targets != ignore_index)) | (targets >= num_classes)
    if not bool(bad.any()):
        return None

    per_sample = bad.reshape(bad.shape[0], -1).any(dim=1) if bad.dim() > 0 else bad.reshape(1)
    samples = per_sample.nonzero().flatten().tolist()
    values = targets[bad]
    low, high = int(values.min()), int(values.max())
    finding = pb.Finding(
        stage=pb.STAGE_DATA, severity=pb.SEVERITY_CRITICAL, code="DATA_TARGET_RANGE",
        message=(f"Class targets of {loss_name} hold {values.numel()} values outside [0, {num_classes}) "
                 f"(from {low} to {high}) in batch samples {_list(samples)}; the loss cannot index them."),
        fix=(f"Map the labels to 0..{num_classes - 1} (for 1-based labels subtract 1), give the model "
             f"{high + 1} outputs if there are that many classes, or mark unlabeled samples with "
             f"ignore_index={ignore_index}."),
    )
    finding.evidence.tensor = "targets"
    finding.evidence.sample_indices.extend(samples[:MAX_LISTED_SAMPLES])
    finding.evidence.values.update({"num_classes": str(num_classes), "min_bad_target": str(low),
                                    "max_bad_target": str(high), "bad_count": str(values.numel())})
    return finding


def _list(samples: list[int]) -> str:
    shown = ", ".join(str(index) for index in samples[:MAX_LISTED_SAMPLES])
    return shown + (f" and {len(samples) - MAX_LISTED_SAMPLES} more" if len(samples) > MAX_LISTED_SAMPLES else "")
