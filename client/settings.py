"""Resolution and validation of Watcher arguments: run id, rank, world size, AMP dtype."""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from nanwatch.run_id import RUN_ID_ENV, validate_run_id

logger = logging.getLogger(__name__)

TORCHELASTIC_RUN_ID_ENV = "TORCHELASTIC_RUN_ID"
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def generate_run_id() -> str:
    """Return "run-<UTC timestamp>-<pid>"."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"run-{stamp}-{os.getpid()}"


def _shared_generated_run_id(group: Any) -> str:
    """Return rank 0's generated run id on every rank of group, or this process's own one."""
    run_id = generate_run_id()
    if not _distributed_ready() or dist.get_world_size(group) < 2:
        return run_id
    holder = [run_id]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return str(holder[0])


def resolve_run_id(run_id: str | None, group: Any = None) -> str:
    """Return run_id, else $NANWATCH_RUN_ID, else $TORCHELASTIC_RUN_ID, else a generated id.

    torchrun sets TORCHELASTIC_RUN_ID to "none" when no --rdzv-id is given; that value
    would make unrelated runs share one id, so it is skipped. A generated id is
    broadcast from rank 0 when a process group is initialized, so that every
    rank reports under the same id. In that case Watcher() is a collective call.
    """
    if run_id is not None:
        return validate_run_id(run_id)
    for env in (RUN_ID_ENV, TORCHELASTIC_RUN_ID_ENV):
        value = os.environ.get(env, "")
        if value and value != "none":
            try:
                return validate_run_id(value)
            except ValueError as error:
                raise ValueError(f"${env}: {error}") from None
    return _shared_generated_run_id(group)


def _int_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${name}={raw!r} is not an integer; unset it or pass rank/world_size to Watcher") from None


def resolve_rank_and_world_size(rank: int | None, world_size: int | None, group: Any = None) -> tuple[int, int]:
    """Return (rank, world_size): the arguments, else torch.distributed, else $RANK/$WORLD_SIZE, else 0/1."""
    if _distributed_ready():
        default_rank, default_world = dist.get_rank(), dist.get_world_size()
    else:
        default_rank, default_world = _int_from_env("RANK", 0), _int_from_env("WORLD_SIZE", 1)
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size} is invalid; need world_size >= 1 and 0 <= rank < world_size")
    return rank, world_size


def resolve_amp_dtype(amp_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Return the autocast dtype as a torch.dtype; accepts torch.float16/bfloat16 or their names."""
    if amp_dtype is None:
        return None
    if isinstance(amp_dtype, str):
        amp_dtype = AMP_DTYPES.get(amp_dtype.removeprefix("torch."), amp_dtype)
    if amp_dtype not in AMP_DTYPES.values():
        raise ValueError(f"amp_dtype={amp_dtype!r} is invalid; use None, torch.float16 or torch.bfloat16")
    return amp_dtype


def validate_limits(
    *, max_queued_reports: int, flush_timeout_s: float, halt_exit_code: int | None,
    fail_closed_after_s: float | None = None, max_report_delay_s: float = 0.0,
) -> None:
    """Raise ValueError naming the first Watcher limit that is out of range."""
    if not 0.0 <= max_report_delay_s <= 60.0:
        raise ValueError(
            f"max_report_delay_s={max_report_delay_s} is outside 0..60; give the seconds a healthy step's report "
            "may wait to share a message with later ones (0 sends every report at once)"
        )
    if fail_closed_after_s is not None and not fail_closed_after_s > 0:
        raise ValueError(
            f"fail_closed_after_s={fail_closed_after_s} is invalid; give the seconds of outage after which "
            "to halt (> 0), or None to train on while the service is unreachable"
        )
    if max_queued_reports < 1:
        raise ValueError(f"max_queued_reports={max_queued_reports} is invalid; buffer at least 1 report")
    if flush_timeout_s < 0:
        raise ValueError(f"flush_timeout_s={flush_timeout_s} is negative; use 0 to skip waiting")
    if halt_exit_code is not None and not 1 <= halt_exit_code <= 255:
        raise ValueError(f"halt_exit_code={halt_exit_code} is outside 1..255; pick an exit code in that range")
