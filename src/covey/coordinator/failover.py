"""The failover policy and its decisions, as pure functions.

A task whose miner fails (disconnects, stalls, errors, answers out of shape) moves to
another miner with the same weights until :attr:`FailoverPolicy.max_tries` miners have had
it; a refusal of the request itself (a 400) never moves. Streamed generations
(:mod:`covey.coordinator.jobs`) and single-reply tasks (:mod:`covey.coordinator.run`) follow
these same rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from covey.coordinator.errors import ApiError
from covey.coordinator.job_faults import MinerFault


@dataclass(frozen=True)
class FailoverPolicy:
    """``max_tries``: miners a job may run on in all (the first included) before the client
    gets the last miner's error; ``stall_timeout``: seconds a miner may send nothing for a
    running job before it counts as stalled."""

    max_tries: int = 3
    stall_timeout: float = 30.0


def may_retry(policy: FailoverPolicy, tried: int, error: ApiError | MinerFault) -> bool:
    """Whether a task that ``tried`` miners have had moves on after ``error``: only a
    miner's fault moves it (a request error, status 400, is the client's), and only while
    fewer than ``policy.max_tries`` miners have had it."""
    return isinstance(error, MinerFault) and tried < policy.max_tries


def no_takeover(fault: MinerFault, routing: ApiError) -> ApiError:
    """The client's error when ``fault`` ended the task on a miner and routing found no
    other to take it over (``routing``: 503, 429 …): a 502 saying both, with the miner's
    error code."""
    return ApiError(502, f"{fault.error.message} No other miner could take the request "
                    f"over: {routing.message}", code=fault.error.code, type="server_error")
