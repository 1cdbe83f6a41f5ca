"""Settlements per second on SQLite and on PostgreSQL (one JSON line).

A settlement here is what one finished request costs the ledger: the hold (user → escrow)
and the close (escrow → miner, treasury, user), each one database transaction with its chain
append and signed head. ``--workers`` threads settle concurrently, as request handlers do.

Usage: python bench/ledger.py [--seconds 10] [--workers 4] [--pg URL]
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
import threading
import time

import psycopg
from nacl.signing import SigningKey

from covey.coordinator.ledger import Ledger
from covey.coordinator.ledger.bank import Bank, BankPolicy

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def run(url: str, seconds: float, workers: int) -> dict[str, float]:
    ledger = Ledger(url, SigningKey.generate())
    bank = Bank(ledger, BankPolicy(grant=10**15, fee_bps=500))
    users = [bank.sign_up()[0] for _ in range(workers)]
    miner_id = "cd" * 32
    done = [0] * workers
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            job = f"{i}-{n}"
            bank.hold(job, users[i], 1_000)
            bank.settle(job, users[i], miner_id, 700)
            n += 1
        done[i] = n

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    report = ledger.verify()
    ledger.close()
    return {"settlements_per_s": round(sum(done) / elapsed, 1), "settlements": sum(done),
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
