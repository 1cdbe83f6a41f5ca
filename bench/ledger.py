"""Settlements per second on SQLite and on PostgreSQL (one JSON line).

A settlement is the close of a request's escrow (escrow → miner, treasury, user), once, with
its chained entries and signed head; a request costs the ledger a hold (user → escrow) and
a settlement. Reported: settlements/s alone (closing escrows held beforehand), holds/s, and
whole requests/s (hold then settle). ``--workers`` threads act concurrently, as request
handlers do; the ledger commits their operations together.

Usage: python bench/ledger.py [--seconds 10] [--workers 4] [--pg URL]
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
import threading
import time
from collections.abc import Callable

import psycopg
from nacl.signing import SigningKey

from covey.coordinator.ledger import Ledger
from covey.coordinator.ledger.bank import Bank, BankPolicy

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def _parallel(workers: int, seconds: float, step: Callable[[int, int], None]) -> int:
    """Run ``step(worker, n)`` in ``workers`` threads for ``seconds``; total steps done."""
    done = [0] * workers
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            step(i, n)
            n += 1
        done[i] = n

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def run(url: str, seconds: float, workers: int) -> dict[str, object]:
    """Three timed phases on a fresh ledger: holds alone, settlements alone (closing the
    escrows held in phase 1), then whole requests (hold + settlement)."""
    ledger = Ledger(url, SigningKey.generate())
    bank = Bank(ledger, BankPolicy(grant=10**15, fee_bps=500))
    users = [bank.sign_up()[0] for _ in range(workers)]
    miner_id = "cd" * 32
    held: list[list[str]] = [[] for _ in range(workers)]

    def hold(i: int, n: int) -> None:
        bank.hold(f"h{i}-{n}", users[i], 1_000)
        held[i].append(f"h{i}-{n}")

    def settle(i: int, n: int) -> None:
        if n < len(held[i]):
            bank.settle(held[i][n], users[i], miner_id, 700)
        else:
            time.sleep(0.001)

    def request(i: int, n: int) -> None:
        bank.hold(f"r{i}-{n}", users[i], 1_000)
        bank.settle(f"r{i}-{n}", users[i], miner_id, 700)

    t0 = time.perf_counter()
    holds = _parallel(workers, seconds, hold)
    t_holds = time.perf_counter() - t0
    t0 = time.perf_counter()
    settles = _parallel(workers, seconds, settle)
    t_settles = time.perf_counter() - t0
    settles = min(settles, holds)
    t0 = time.perf_counter()
    requests = _parallel(workers, seconds, request)
    t_requests = time.perf_counter() - t0
    report = ledger.verify()
    ledger.close()
    return {"settlements_per_s": round(settles / t_settles, 1),
            "holds_per_s": round(holds / t_holds, 1),
            "requests_per_s": round(requests / t_requests, 1),
            "verify_ok": report.ok, "entries": report.entries}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--workers", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = run(f"sqlite:///{tmp}/ledger.db", args.seconds, args.workers)
    name = f"covey_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        pg = run(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", args.seconds,
                 args.workers)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
    print(json.dumps({"bench": "ledger", "workers": args.workers, "seconds": args.seconds,
                      "sqlite": sqlite, "postgresql": pg, "target_pg_per_s": 1000}))


if __name__ == "__main__":
    main()
