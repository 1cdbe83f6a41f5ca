"""How a job can fail on a miner, as the client sees it."""

from __future__ import annotations

from covey.coordinator.errors import ApiError
from covey.protocol import JobError

# Miner error codes that describe the request, not the miner; they keep their 400.
_CLIENT_ERROR_CODES = {"context_length_exceeded", "invalid_value", "invalid_prompt",
                       "invalid_ciphertext"}


def miner_error(frame: JobError) -> ApiError:
    """Map a miner's ``error`` frame to the API error the client sees."""
    if frame.code in _CLIENT_ERROR_CODES:
        return ApiError(400, frame.message, code=frame.code, param=frame.param)
    return ApiError(502, f"The miner failed: {frame.message}", code=frame.code,
                    type="server_error")


class MinerFault(Exception):
    """The miner, not the request, failed: another miner may finish the job.

    ``reason`` is a metrics label (``disconnected``, ``stalled``, ``miner_error``,
    ``protocol``, ``context_length``); ``error`` is what the client sees if no other miner
    can take over.
    """

    def __init__(self, reason: str, error: ApiError, blame: bool = True) -> None:
        super().__init__(error.message)
        self.reason = reason
        self.error = error
        self.blame = blame
        """False when the miner did nothing wrong (its context is just too short): its
        reputation is left alone."""


def gone() -> MinerFault:
    """The miner's socket closed mid-job."""
    return MinerFault("disconnected", ApiError(
        502, "The miner serving this request disconnected before it finished; please retry.",
        code="miner_disconnected", type="server_error"))


def protocol(what: str) -> MinerFault:
    """The miner sent a frame it may not send now (``what`` says which)."""
    return MinerFault("protocol", ApiError(502, f"The miner broke the protocol ({what}).",
                                           code="miner_protocol_error", type="server_error"))
