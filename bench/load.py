"""Load on one coordinator process: short-request throughput, added latency, and scale.

All on 127.0.0.1, bounded in time, side by side in one run:
  (1) ceiling: a bare uvicorn endpoint (a raw ASGI app answering a completion-sized JSON),
      driven by the same client at the same concurrency;
  (2) Covey: short completions (``max_tokens`` 1, billed: key check, escrow hold,
      settlement) through the coordinator to unthrottled synthetic miners;
  (3) scale: ``--scale-miners`` synthetic miners connected at once and ``--streams``
      concurrent streaming requests held open, with the coordinator's peak RSS;
  (4) with ``--replicas``: one replica against two on one PostgreSQL ledger and NATS, each
      pinned to its own core (a fresh database on ``--pg-admin``'s server for each).
The client is a lean keep-alive HTTP/1.1 client on asyncio streams, so the load generator's
own cost (it shares the 2 cores) stays small. Prints one JSON line.

Usage: python bench/load.py [--seconds 10] [--concurrency 64] [--scale-miners 1000]
                            [--streams 5000] [--skip-scale] [--replicas]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
BODY = json.dumps({"model": "synthetic", "prompt": "hi", "max_tokens": 1}).encode()

BARE_APP = '''
import json
BODY = json.dumps({"id": "cmpl-0", "object": "text_completion", "created": 0,
    "model": "synthetic", "choices": [{"index": 0, "text": " lorem", "finish_reason":
    "length", "logprobs": None}], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
    "total_tokens": 2}}).encode()
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": BODY})
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _miners(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/miners", timeout=30).json()["data"]


def _wait_miners(url: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_miners(url)) >= n:
            return
        time.sleep(0.5)
    raise RuntimeError(f"only {len(_miners(url))} of {n} miners connected")


class Http:
    """One keep-alive HTTP/1.1 connection (Content-Length or chunked bodies)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Http:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: bytes, headers: str = "") -> tuple[int, bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{headers}\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            parts = []
            while True:
                size = int((await self.reader.readline()).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            return status, b"".join(parts)
        i = lower.index(b"content-length:")
        length = int(lower[i + 15: lower.index(b"\r\n", i)])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _hammer(port: int, path: str, headers: str, concurrency: int, seconds: float
                  ) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal errors
        conn = await Http.open(port)
        try:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                status, _ = await conn.post(path, BODY, headers)
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
        finally:
            conn.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - t0
    latencies.sort()
    return {"requests_per_s": round(len(latencies) / wall, 1), "ok": len(latencies),
            "errors": errors,
            "latency_ms_p50": round(1000 * statistics.median(latencies), 2),
            "latency_ms_p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2)}


def _coordinator(tmp: Path, *extra: str, cpu: int | None = None
                 ) -> tuple[subprocess.Popen, int, str]:
    """A coordinator with no per-key limits and a rich faucet, data in ``tmp``; returns the
    process, its port and base URL once it answers. Trial tasks are off: the synthetic fleet
    joins a thousand miners at once to measure the coordinator's own capacity, and sampled
    re-checks (5%, the default) still run. ``extra``: more options; ``cpu``: the one core
    it may run on (``taskset``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = _port()
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    proc = subprocess.Popen(
        [*pin, sys.executable, "-m", "covey", "coordinator", "--port", str(port),
         "--data-dir", str(tmp), "--log-level", "warning", "--key-concurrency", "0",
         "--key-rpm", "0", "--queue-size", "100000", "--grant", str(10**13), "--no-trial",
         *extra],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "coordinator.err", "ab"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/healthz", proc)
    except BaseException:
        _stop(proc)
        raise
    return proc, port, url


def _fleet(url: str, miners: int, slots: int, rate: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "fleet.py"), "--coordinator", url, "--miners", str(miners),
         "--slots", str(slots), "--rate", str(rate)], stdout=subprocess.DEVNULL)


def throughput(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    """Phases (1) and (2)."""
    bare_port = _port()
    (tmp / "bare_app.py").write_text(BARE_APP)
    bare = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare_app:app", "--port",
                             str(bare_port), "--log-level", "warning", "--no-access-log"],
                            cwd=tmp)
    try:
        _wait_http(f"http://127.0.0.1:{bare_port}/", bare)
        asyncio.run(_hammer(bare_port, "/", "", args.concurrency, 2))  # warm-up
        ceiling = asyncio.run(_hammer(bare_port, "/", "", args.concurrency, args.seconds))
    finally:
        _stop(bare)

    coord, port, url = _coordinator(tmp / "a")
    fleet = None
    try:
        fleet = _fleet(url, args.miners, 64, 0)
        _wait_miners(url, args.miners)
        key = httpx.post(f"{url}/v1/accounts", timeout=10).json()["api_key"]
        auth = f"Authorization: Bearer {key}\r\n"
        asyncio.run(_hammer(port, "/v1/completions", auth, args.concurrency, 2))  # warm-up
        proc = psutil.Process(coord.pid)
        cpu0, t0 = proc.cpu_times(), time.monotonic()
        covey = asyncio.run(_hammer(port, "/v1/completions", auth, args.concurrency,
                                    args.seconds))
        cpu1, wall = proc.cpu_times(), time.monotonic() - t0
        used = cpu1.user + cpu1.system - cpu0.user - cpu0.system
        covey["coordinator_cpu_cores"] = round(used / wall, 2)
        covey["coordinator_cpu_ms_per_request"] = round(1000 * used / max(1, covey["ok"]), 3)
        covey["coordinator_rss_mb"] = round(proc.memory_info().rss / 2**20, 1)
    finally:
        if fleet is not None:
            _stop(fleet)
        _stop(coord)
    return {"ceiling_bare_uvicorn": ceiling, "covey": covey,
            "covey_vs_ceiling": round(covey["requests_per_s"] / ceiling["requests_per_s"], 3),
            "added_latency_ms_p50": round(covey["latency_ms_p50"] - ceiling["latency_ms_p50"],
                                          2),
            "added_latency_ms_p99": round(covey["latency_ms_p99"] - ceiling["latency_ms_p99"],
                                          2)}


async def _hammer_all(ports: list[int], headers: str, concurrency: int, seconds: float
                      ) -> dict[str, float]:
    """:func:`_hammer` on each port at once, ``concurrency`` connections in all."""
    parts = await asyncio.gather(*(_hammer(p, "/v1/completions", headers,
                                           concurrency // len(ports), seconds) for p in ports))
    return {"requests_per_s": round(sum(x["requests_per_s"] for x in parts), 1),
            "ok": sum(x["ok"] for x in parts), "errors": sum(x["errors"] for x in parts),
            "latency_ms_p50": max(x["latency_ms_p50"] for x in parts)}


def replicas(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    """Phase (4): one replica, then two, on one fresh PostgreSQL ledger and NATS
    (``--nats-url``), each replica pinned to a core of its own with its own
    synthetic fleet; the client splits its connections between them. Reports requests/s,
    the ratio of two to one, and coordinator CPU per request (both replicas' CPU over all
    requests)."""
    import psycopg

    out: dict[str, object] = {}
    for n in (1, 2):
        procs, fleets, ports = [], [], []
        name = f"covey_load_{n}"
        with psycopg.connect(args.pg_admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
        database_url = args.pg_admin.replace("postgresql://", "postgresql+psycopg://", 1)
        database_url = database_url.rsplit("/", 1)[0] + f"/{name}"
        try:
            key_file = tmp / f"r{n}-key"
            for i in range(n):
                data = tmp / f"replicas{n}-{i}"
                data.mkdir(parents=True)
                if key_file.exists():  # replicas share the network's identity key
                    (data / "coordinator.key").write_bytes(key_file.read_bytes())
                    (data / "coordinator.key").chmod(0o600)
                proc, port, url = _coordinator(data, "--database-url", database_url,
                                               "--nats-url", args.nats_url,
                                               cpu=i % (os.cpu_count() or 1))
                key_file.write_bytes((data / "coordinator.key").read_bytes())
                procs.append(proc)
                ports.append(port)
                fleets.append(_fleet(url, args.miners, 64, 0))
                _wait_miners(url, args.miners * (i + 1))
            key = httpx.post(f"http://127.0.0.1:{ports[0]}/v1/accounts",
                             timeout=10).json()["api_key"]
            auth = f"Authorization: Bearer {key}\r\n"
            asyncio.run(_hammer_all(ports, auth, args.concurrency, 2))  # warm-up
            cpus = [psutil.Process(p.pid) for p in procs]
            before = [c.cpu_times() for c in cpus]
            got = asyncio.run(_hammer_all(ports, auth, args.concurrency, args.seconds))
            used = sum(a.user + a.system - b.user - b.system
                       for a, b in zip((c.cpu_times() for c in cpus), before, strict=True))
            got["coordinator_cpu_ms_per_request"] = round(1000 * used / max(1, got["ok"]), 3)
            got["requests_per_cpu_s"] = round(got["ok"] / max(used, 1e-9), 1)
            out[f"replicas_{n}"] = got
        finally:
            for f in fleets:
                _stop(f)
            for p in procs:
                _stop(p)
    one, two = out["replicas_1"], out["replicas_2"]
    out["two_vs_one"] = round(two["requests_per_s"] / one["requests_per_s"], 3)
    # On 2 cores the client, PostgreSQL and NATS share the replicas' cores, so the measured
    # ratio is capped near 1; this one assumes each replica had a core of its own and its
    # CPU were its limit: it says what sharing the ledger and the registry costs each.
    out["two_vs_one_if_cpu_bound"] = round(
        2 * two["requests_per_cpu_s"] / one["requests_per_cpu_s"], 3)
    return out


async def _hold_streams(port: int, key: str, n: int, max_tokens: int, url: str,
                        proc: psutil.Process, ramp_per_s: float) -> dict[str, object]:
    body = json.dumps({"model": "synthetic", "prompt": "hold", "max_tokens": max_tokens,
                       "stream": True}).encode()
    auth = f"Authorization: Bearer {key}\r\n"
    done_ok = 0
    failed: dict[str, int] = {}

    async def one() -> None:
        nonlocal done_ok
        try:
            conn = await Http.open(port)
            try:
                status, data = await conn.post("/v1/completions", body, auth)
            finally:
                conn.close()
            if status == 200 and data.rstrip().endswith(b"[DONE]") and b'"error"' not in data:
                done_ok += 1
            else:
                failed[str(status)] = failed.get(str(status), 0) + 1
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1

    peak_rss, held = 0, 0
    tasks: list[asyncio.Task[None]] = []

    async def watch() -> None:
        nonlocal peak_rss, held
        async with httpx.AsyncClient(timeout=30) as client:
            while len(tasks) < n or not all(t.done() for t in tasks):
                peak_rss = max(peak_rss, proc.memory_info().rss)
                with contextlib.suppress(httpx.HTTPError):
                    text = (await client.get(f"{url}/metrics")).text
                    line = next(x for x in text.splitlines()
                                if x.startswith("covey_jobs_running "))
                    held = max(held, int(float(line.split()[1])))
                await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    for i in range(n):  # a steady ramp: the listen backlog is finite
        tasks.append(asyncio.create_task(one()))
        if i % 50 == 49:
            await asyncio.sleep(50 / ramp_per_s)
    await asyncio.gather(*tasks)
    await watcher
    return {"streams_completed": done_ok, "streams_failed": failed,
            "max_streams_running_at_once": held,
            "coordinator_peak_rss_mb": round(peak_rss / 2**20, 1)}


def scale(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    """Phase (3)."""
    coord, port, url = _coordinator(tmp / "b")
    fleet = None
    try:
        slots = -(-args.streams // args.scale_miners) + 1
        fleet = _fleet(url, args.scale_miners, slots, args.stream_rate)
        t0 = time.monotonic()
        _wait_miners(url, args.scale_miners, timeout=180)
        joined_s = time.monotonic() - t0
        proc = psutil.Process(coord.pid)
        idle_rss = proc.memory_info().rss
        key = httpx.post(f"{url}/v1/accounts", timeout=10).json()["api_key"]
        held = asyncio.run(_hold_streams(port, key, args.streams, args.stream_tokens, url,
                                         proc, args.ramp))
        return {"miners_connected": args.scale_miners, "miners_join_s": round(joined_s, 1),
                "coordinator_rss_mb_with_miners_idle": round(idle_rss / 2**20, 1),
                "streams_requested": args.streams, **held}
    finally:
        if fleet is not None:
            _stop(fleet)
        _stop(coord)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--miners", type=int, default=8, help="miners for the throughput phase")
    ap.add_argument("--scale-miners", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=5000)
    ap.add_argument("--stream-tokens", type=int, default=120)
    ap.add_argument("--ramp", type=float, default=200.0, help="streams opened per second")
    ap.add_argument("--stream-rate", type=float, default=2.0, help="tokens/s per stream")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--replicas", action="store_true",
                    help="also phase (4): one against two replicas on PostgreSQL and NATS")
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="PostgreSQL server for phase (4): it makes a database per run")
    ap.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    args = ap.parse_args()
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    with tempfile.TemporaryDirectory(prefix="covey-load-") as d:
        tmp = Path(d)
        out: dict[str, object] = {"cpus": os.cpu_count(), **throughput(args, tmp)}
        if not args.skip_scale:
            out["scale"] = scale(args, tmp)
        if args.replicas:
            out["replicas"] = replicas(args, tmp)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
