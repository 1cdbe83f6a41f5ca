"""Observability: Prometheus metrics and one structured log line per request.

Metrics live in a registry of the app's own (not prometheus-client's global one), so several
coordinators in one process stay apart. The request log carries ids, sizes and timings, never
prompt or answer text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("covey.requests")

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


@dataclass
class RequestRecord:
    """One API request as the log and the metrics see it.

    ``status`` is the HTTP status the request ended with (for a stream that failed after its
    headers, the status of the error event; 499 when the client left); ``ttft_s`` and
    ``duration_s`` are seconds from arrival; ``decode_tps`` is tokens per second after the
    first; token counts are those billed.
    """

    request_id: str
    model: str
    account: str
    stream: bool
    arrived: float = field(default_factory=time.monotonic)
    status: int | None = None
    code: str | None = None
    miner: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    decode_tps: float | None = None
    failovers: int = 0


@dataclass
class ModelSpeed:
    """A model's measured speed over its recent answers: moving averages (weight
    :data:`SPEED_WEIGHT` on the newest) of the time to first token (seconds from arrival) and
    of the decode rate (tokens per second after the first); None until measured."""

    ttft_s: float | None = None
    decode_tps: float | None = None
    answers: int = 0

    def add(self, ttft_s: float | None, decode_tps: float | None) -> None:
        """Fold one answer's figures in."""
        self.answers += 1
        if ttft_s is not None:
            self.ttft_s = _average(self.ttft_s, ttft_s)
        if decode_tps is not None:
            self.decode_tps = _average(self.decode_tps, decode_tps)


SPEED_WEIGHT = 0.2
"""Weight of the newest answer in :class:`ModelSpeed`: about the last ten answers count."""


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + SPEED_WEIGHT * (new - old)


class Metrics:
    """The coordinator's Prometheus instruments, and each model's :class:`ModelSpeed` (for
    the catalog).

    ``queue_depth``, ``miners_online`` and ``jobs_running`` are read from the given
    callables when scraped.
    """

    def __init__(self, queue_depth: Callable[[], float], miners_online: Callable[[], float],
                 jobs_running: Callable[[], float] = lambda: 0.0) -> None:
        self.registry = CollectorRegistry()
        self.speeds: dict[str, ModelSpeed] = {}
        r = self.registry
        self.requests = Counter("covey_requests", "API requests by model and final status.",
                                ["model", "status"], registry=r)
        self.ttft = Histogram("covey_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first token.",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.decode = Histogram("covey_decode_tokens_per_second",
                                "Decode rate of each answer after its first token.",
                                ["model"], buckets=_TPS_BUCKETS, registry=r)
        self.failovers = Counter("covey_failovers",
                                 "Jobs moved to another miner, by model and reason.",
                                 ["model", "reason"], registry=r)
        self.evictions = Counter("covey_evictions", "Miner sessions ended by the coordinator.",
                                 ["reason"], registry=r)
        self.checks = Counter("covey_checks", "Verifications by kind (trial, sampled, canary, "
                              "usage, ...) and result (passed, failed, skipped; unconfirmed: "
                              "a failed verdict a second validator did not confirm; alone: "
                              "one no other validator could confirm).", ["kind", "result"],
                              registry=r)
        self.dissents = Counter("covey_validator_dissents", "Validator reports that differed "
                                "from the ruling on a failed verdict (each costs the "
                                "validator reputation).", registry=r)
        self.validator_fees = Counter("covey_validator_fees_ucr", "µcr paid to validators "
                                      "for their checks, whatever the verdict.", registry=r)
        self.shard_relay = Histogram(
            "covey_shard_relay_seconds", "Per hop of a chain of shards: the round trip less "
            "the shard's own compute (what relaying through the coordinator costs).",
            buckets=(0.0002, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.02,
                     0.05, 0.1), registry=r)
        self.shard_rebuild = Histogram(
            "covey_shard_rebuild_seconds", "Rebuilding a failed link of a chain of shards "
            "elsewhere: planning and replaying its inputs.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.slashed = Counter("covey_slashed_ucr", "µcr slashed from miners' stakes.",
                               registry=r)
        Gauge("covey_queue_depth", "Requests waiting for a free miner slot.",
              registry=r).set_function(queue_depth)
        Gauge("covey_miners_online", "Miners connected now.",
              registry=r).set_function(miners_online)
        Gauge("covey_jobs_running", "Jobs running on miners now.",
              registry=r).set_function(jobs_running)

    def render(self) -> bytes:
        """The text exposition format (``text/plain; version=0.0.4``)."""
        return generate_latest(self.registry)

    def refused(self, path: str, status: int, code: str | None) -> None:
        """Count and log an inference request refused before it had an id and a model (no
        or a wrong API key, a body that does not parse or validate)."""
        self.requests.labels("", str(status)).inc()
        log.info("request refused %s", status, extra={"fields": {
            "request_id": None, "path": path, "status": status, "code": code}})

    def finish(self, record: RequestRecord) -> None:
        """Count a finished request and write its log line."""
        status = record.status or 0
        self.requests.labels(record.model, str(status)).inc()
        if record.ttft_s is not None:
            self.ttft.labels(record.model).observe(record.ttft_s)
        if record.decode_tps is not None:
            self.decode.labels(record.model).observe(record.decode_tps)
        if status == 200 and (record.ttft_s is not None or record.decode_tps is not None):
            self.speeds.setdefault(record.model, ModelSpeed()).add(record.ttft_s,
                                                                   record.decode_tps)
        if not log.isEnabledFor(logging.INFO):
            return  # the request log is off: no line to build
        fields = asdict(record)
        fields.pop("arrived")
        fields["duration_s"] = round(time.monotonic() - record.arrived, 4)
        for k in ("ttft_s", "decode_tps"):
            if fields[k] is not None:
                fields[k] = round(fields[k], 4)
        log.info("request %s %s", record.request_id, status, extra={"fields": fields})
