"""Cross-rank halt agreement: every rank learns every rank's halt reasons at the same step."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class Agreement:
    """Shares each rank's reason code through one all-reduce (MAX) per optimizer step.

    Each rank writes its own code at its index of a zero vector as long as the
    group, so after the MAX all-reduce every rank has every rank's code. The
    pre-hook of optimizer.step() runs it, a point that every rank reaches even
    when only one rank's batch was bad. Without an initialized process group of
    more than one rank there is nothing to agree with, and exchange() returns
    the local code alone.

    Example:
        agreement = Agreement.from_process_group(None)
        codes = agreement.exchange(local_code)   # int64 tensor, one code per rank
    """

    def __init__(self, *, group: Any = None, index: int = 0, size: int = 1, global_ranks: list[int] | None = None) -> None:
        self.group = group
        self.index = index
        self.size = size
        self.global_ranks = global_ranks if global_ranks is not None else list(range(size))
        self._failed = False

    @classmethod
    def from_process_group(cls, group: Any = None, *, fallback_rank: int = 0) -> Agreement:
        """Return an Agreement over group (None = the default group), or a local one without torch.distributed."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(index=0, size=1, global_ranks=[fallback_rank])
        size = dist.get_world_size(group)
        index = dist.get_rank(group)
        global_ranks = [dist.get_global_rank(group, i) if group is not None else i for i in range(size)]
        return cls(group=group, index=index, size=size, global_ranks=global_ranks)

    @property
    def is_collective(self) -> bool:
        """True when exchange() runs an all-reduce."""
        return self.size > 1 and not self._failed

    def exchange(self, local_code: torch.Tensor) -> torch.Tensor:
        """Return every rank's reason code as an int64 vector; a collective when is_collective."""
        if not self.is_collective:
            return local_code.reshape(1).to(torch.int64)
        device = self._collective_device(local_code.device)
        codes = torch.zeros(self.size, dtype=torch.int64, device=device)
        codes[self.index] = local_code.to(device=device, dtype=torch.int64)
        try:
            dist.all_reduce(codes, op=dist.ReduceOp.MAX, group=self.group)
        except (RuntimeError, ValueError) as error:
            # NOTE: after a failed collective the ranks may be out of step, so this
            # rank stops agreeing and decides on its own checks from here on.
            logger.error("nanwatch: halt agreement all-reduce failed on group rank %d: %s; "
                         "deciding on local checks only from now on", self.index, error)
            self._failed = True
            local_only = torch.zeros(self.size, dtype=torch.int64, device=device)
            local_only[self.index] = codes[self.index]
            return local_only
        return codes

    def _collective_device(self, unused_device: torch.device) -> torch.device:
        """Return the device the group's backend needs: CUDA for NCCL, else the CPU."""
        backend = str(dist.get_backend(self.group)).lower()
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
