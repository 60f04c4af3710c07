"""Validation of incoming requests; each failure carries the gRPC status to answer with."""

from __future__ import annotations

import math

import grpc

from nanwatch.run_id import validate_run_id
from nanwatch.v1 import nanwatch_pb2 as pb

MAX_WORLD_SIZE = 1 << 20


class RequestError(Exception):
    """A request the service rejects, with the status code and a message that names the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_run_id(run_id: str, field_name: str = "run_id") -> None:
    try:
        validate_run_id(run_id)
    except ValueError as error:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: {error}") from None


def check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"rank {rank} is outside the world size {world_size}; send a rank in 0..{world_size - 1}",
        )


def check_registration(request: pb.RegisterRankRequest) -> None:
    check_run_id(request.run_id)
    if not 1 <= request.world_size <= MAX_WORLD_SIZE:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"world_size {request.world_size} is invalid; send the number of ranks, 1..{MAX_WORLD_SIZE}",
        )
    check_rank(request.rank, request.world_size)
    if not request.client_id:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "client_id is empty; send a random id per client process")


def check_report(report: pb.StepReport, last_step: int) -> None:
    """Reject a report whose step is negative or behind the rank's last step."""
    if report.step < 0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"report.step {report.step} is negative")
    if report.step < last_step:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"report.step {report.step} goes backwards (last step {last_step}); send steps in order",
        )
    # NaN and Inf are legitimate in loss and norms (that is what the checks look for),
    # but a learning rate is set by the script and must be a finite, non-negative number.
    if not math.isfinite(report.lr) or report.lr < 0:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"report.lr {report.lr} is invalid; send the optimizer's current lr"
        )
