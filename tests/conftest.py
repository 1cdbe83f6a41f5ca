"""Fixtures that start real coordinators and miners as processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A ``python -m covey …`` child process with its log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = log
        self._fh = log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "covey", *args],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env} if env else None,
        )

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._fh.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Network:
    """A coordinator and any number of miners, all children of the test process."""

    def __init__(self, tmp: Path, *coordinator_args: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.coordinator_args = list(coordinator_args)
        self.miners: list[Proc] = []
        self.coordinator = self._start_coordinator()
        self._api_key: str | None = None

    @property
    def api_key(self) -> str:
        """A key of an account signed up on this coordinator (made on first use)."""
        if self._api_key is None:
            r = httpx.post(f"{self.url}/v1/accounts", timeout=10)
            r.raise_for_status()
            self._api_key = r.json()["api_key"]
        return self._api_key

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def _start_coordinator(self) -> Proc:
        proc = Proc(
            [
                "coordinator",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.tmp / "coordinator"),
                "--log-level",
                "warning",
                # Sampled re-checks and canaries take miner slots at random moments; tests
                # of other things run without them (a later --check-rate or --canary-rate in
                # the args wins).
                "--check-rate",
                "0",
                "--canary-rate",
                "0",
                *self.coordinator_args,
            ],
            self.tmp / "coordinator.log",
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("coordinator did not start:\n" + proc.output())

    def restart_coordinator(self) -> None:
        self.coordinator.stop()
        self.coordinator = self._start_coordinator()

    def add_miner(self, *args: str, wait: bool = True, threads: int = 1,
                  env: dict[str, str] | None = None) -> Proc:
        i = len(self.miners)
        data = self.tmp / f"miner-{i}"
        proc = Proc(
            [
                "miner",
                "--coordinator",
                self.url,
                "--data-dir",
                str(data),
                "--threads",
                str(threads),
                *args,
            ],
            self.tmp / f"miner-{i}.log",
            env,
        )
        self.miners.append(proc)
        if wait:
            self.wait_miners(len(self.miners))
        return proc

    def live_miners(self, model: str = MODEL) -> int:
        data = httpx.get(f"{self.url}/v1/models", timeout=5).json()["data"]
        return next((m["miners"] for m in data if m["id"] == model), 0)

    def wait_miners(self, n: int, model: str = MODEL, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.live_miners(model) == n:
                return
            for m in self.miners:
                if m.popen.poll() is not None:
                    raise RuntimeError("miner exited:\n" + m.output())
            time.sleep(0.1)
        logs = "\n".join(m.output()[-2000:] for m in self.miners)
        raise RuntimeError(f"expected {n} miners, have {self.live_miners(model)}\n{logs}")

    def active_jobs(self) -> int:
        """Jobs running on all live miners, as the coordinator counts them."""
        return sum(m["active"] for m in httpx.get(f"{self.url}/v1/miners").json()["data"])

    def wait_idle(self, timeout: float) -> bool:
        """True once no miner has a running job, polling for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.active_jobs() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.active_jobs() == 0

    def close(self) -> None:
        for m in self.miners:
            m.stop()
        self.coordinator.stop()


@pytest.fixture(scope="session")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """Shared: one coordinator, two miners of the bundled model (1 slot, 1 thread each)."""
    net = Network(tmp_path_factory.mktemp("net"))
    try:
        net.add_miner("--ctx", "1024", wait=False)
        net.add_miner("--ctx", "1024", wait=False)
        net.wait_miners(2)
        yield net
    finally:
        net.close()


@pytest.fixture
def bare_network(tmp_path: Path) -> Iterator[Network]:
    """A coordinator of its own, no miners yet."""
    net = Network(tmp_path)
    try:
        yield net
    finally:
        net.close()


def metric(net: Network, name: str) -> float:
    """Sum of the samples of a Prometheus series at ``GET /metrics`` whose line starts with
    ``name`` (a bare name sums over all labels)."""
    text = httpx.get(f"{net.url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the PostgreSQL at 127.0.0.1:5432, dropped afterwards."""
    import psycopg

    name = f"covey_test_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("COVEY_REQUIRE_POSTGRES"):
            raise
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432 ({exc})")
    with admin as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def ledger_verify(data_dir: Path, database_url: str | None = None) -> subprocess.CompletedProcess:
    """Run `covey ledger verify` as a user would."""
    args = [sys.executable, "-m", "covey", "ledger", "verify", "--data-dir", str(data_dir)]
    if database_url:
        args += ["--database-url", database_url]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)
