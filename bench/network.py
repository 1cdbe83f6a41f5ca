"""Starting a coordinator and one miner as child processes on 127.0.0.1, for the benchmarks
that compare a model through the network with the same library in-process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp: Path, models: list[str], served: list[str], threads: int,
          coordinator_args: Sequence[str] = ()) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """A coordinator (no sampled re-checks, no per-key limits; ``coordinator_args`` added)
    and one miner serving ``models`` (``--model`` values) with ``threads`` CPU threads;
    returns (base URL, the processes, miner first) once every name in ``served`` has a live
    miner. Logs go to ``tmp/net.log``.

    Raises:
        RuntimeError: a process exited, or the models were not served within 180 s.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cov = [sys.executable, "-m", "covey"]
    log = (tmp / "net.log").open("ab")
    coord = subprocess.Popen([*cov, "coordinator", "--port", str(port), "--data-dir",
                              str(tmp / "c"), "--check-rate", "0", "--log-level", "warning",
                              "--key-rpm", "0", "--key-concurrency", "0", *coordinator_args],
                             stdout=log, stderr=log)
    miner = subprocess.Popen([*cov, "miner", "--coordinator", url,
                              *(arg for m in models for arg in ("--model", m)),
                              "--threads", str(threads), "--data-dir", str(tmp / "m"),
                              "--log-level", "warning"], stdout=log, stderr=log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            live = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=2).json()["data"]
                    if m["miners"]}
            if set(served) <= live:
                return url, [miner, coord]
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        if coord.poll() is not None or miner.poll() is not None:
            break
        time.sleep(0.25)
    for p in (miner, coord):
        p.terminate()
    raise RuntimeError(f"the network did not start; see {tmp / 'net.log'}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate ``procs`` in order and wait for each."""
    for p in procs:
        p.terminate()
        p.wait(10)
