"""Several coordinators on one ledger (covey.coordinator.ledger.replicas): escrows carry
their replica's lease, only those of dead replicas are refunded (once), and the duties'
leader is one replica at a time. The ledger on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from nacl.signing import SigningKey

from conftest import MODEL, Network, Proc, free_port, ledger_verify, postgres_database
from covey.coordinator.ledger import Ledger
from covey.coordinator.ledger.bank import Bank, BankPolicy, user
from covey.coordinator.ledger.replicas import (
    Lease,
    live_replicas,
    orphaned_escrows,
    refund_orphaned,
    replica_id,
)
from tcp_balancer import Balancer
from test_billing import GRANT, account, cost, sign_up


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
        return
    with postgres_database() as found:
        yield found


def test_only_the_escrows_of_a_dead_replica_are_refunded_once(url: str):
    led = Ledger(url, SigningKey.generate())
    try:
        a, b, old = (Bank(led, BankPolicy(grant=1_000_000)) for _ in range(3))
        a.replica, b.replica = "a" * 16, "b" * 16  # ``old`` predates replicas: no owner
        lease_a, lease_b = Lease(led, a.replica), Lease(led, b.replica)
        lease_a.take()
        lease_b.take()
        assert live_replicas(led) == {a.replica, b.replica}
        payer, _ = a.sign_up()
        a.hold("job-a", payer, 1_000)
        b.hold("job-b", payer, 2_000)
        old.hold("job-old", payer, 4_000)
        assert led.balance(user(payer)) == 1_000_000 - 7_000
        # Both replicas live: only the escrow nobody owns is an orphan.
        assert orphaned_escrows(a) == [("job-old", payer)]
        lease_a.end()  # a is gone (here cleanly; a killed one's lease runs out)
        assert live_replicas(led) == {b.replica}
        assert sorted(orphaned_escrows(b)) == [("job-a", payer), ("job-old", payer)]
        assert refund_orphaned(b) == 2
        assert refund_orphaned(b) == 0  # refunded once, whoever sweeps again
        assert led.balance(user(payer)) == 1_000_000 - 2_000  # b's job still holds its own
        assert led.balance("escrow:job-b") == 2_000
        # b restarting: its own escrows are from its previous run, refunded at start-up.
        assert refund_orphaned(b, own=b.replica) == 1
        assert led.balance(user(payer)) == 1_000_000
        assert led.verify(led.public_key).ok
    finally:
        led.close()


def test_the_owner_rows_of_closed_escrows_are_pruned(url: str):
    """One owner row per request would grow for ever: a sweep drops those of escrows that
    closed, and keeps those of open ones (and of any written in the last minute)."""
    from sqlalchemy import select

    from covey.coordinator.ledger.replicas import prune_owners
    from covey.coordinator.ledger.schema import escrow_owners

    led = Ledger(url, SigningKey.generate())
    try:
        bank = Bank(led, BankPolicy(grant=1_000_000))
        bank.replica = "a" * 16
        payer, _ = bank.sign_up()
        for job in ("settled", "refunded", "open"):
            bank.hold(job, payer, 1_000)
        bank.settle("settled", payer, "f" * 64, 10)
        bank.refund("refunded", payer)

        def owners() -> set[str]:
            with led.engine.connect() as conn:
                return set(conn.execute(select(escrow_owners.c.job_id)).scalars())

        assert prune_owners(led) == 0  # written just now: kept a while
        assert owners() == {"settled", "refunded", "open"}
        later = time.time_ns() // 1000 + 61_000_000
        assert prune_owners(led, now_us=later) == 2
        assert owners() == {"open"}
        assert orphaned_escrows(bank, own=bank.replica) == [("open", payer)]
        assert led.verify(led.public_key).ok
    finally:
        led.close()


def test_an_expired_lease_is_dead_without_an_end(url: str):
    led = Ledger(url, SigningKey.generate())
    try:
        bank = Bank(led, BankPolicy(grant=1_000_000))
        bank.replica = "c" * 16
        lease = Lease(led, bank.replica, ttl=1.0)
        lease.take()
        payer, _ = bank.sign_up()
        bank.hold("job-c", payer, 500)
        assert orphaned_escrows(bank) == []
        now_later = time.time_ns() // 1000 + 2_000_000  # two seconds on, never renewed
        assert orphaned_escrows(bank, now_us=now_later) == [("job-c", payer)]
        lease.renew()
        assert orphaned_escrows(bank, now_us=time.time_ns() // 1000 + 500_000) == []
    finally:
        led.close()


def test_one_replica_leads_the_duties_at_a_time():
    with postgres_database() as found:
        first, second = (Ledger(found, SigningKey.generate()) for _ in range(2))
        try:
            one, two = Lease(first, "1" * 16), Lease(second, "2" * 16)
            assert one.lead() and one.lead()  # taken, then kept
            assert not two.lead()
            one.end()  # its connection (and the lock with it) is gone
            assert two.lead()
            assert not one.lead()
        finally:
            for led in (first, second):
                led.close()


def test_the_replica_id_is_kept_in_the_data_folder(tmp_path: Path):
    made = replica_id(tmp_path)
    assert len(made) == 16 and replica_id(tmp_path) == made


@pytest.mark.parametrize("bus", [False, True], ids=["ledger-only", "nats"])
def test_two_replicas_serve_one_network_and_either_can_die(tmp_path: Path, bus: bool,
                                                           request: pytest.FixtureRequest):
    """Two coordinators on one PostgreSQL ledger behind a TCP balancer, a miner on each
    (each miner knows both URLs); with NATS, each replica also routes to the other's miner.
    One replica is killed mid-load: its miner moves to the other, its escrows are refunded
    once its lease runs out (and only those: the other replica's jobs finish, or fail
    over, and are charged once), and the network keeps serving."""
    with postgres_database() as db:
        args = ["--database-url", db, "--lease-ttl", "3"]
        if bus:
            args += ["--nats-url", request.getfixturevalue("nats_url")]
        one, two = replicas(tmp_path, *args)
        balancer = Balancer([one.port, two.port])
        try:
            for n, (net, urls) in enumerate(((one, (one.url, two.url)),
                                             (two, (two.url, one.url)))):
                net.miners.append(Proc(
                    ["miner", "--coordinator", urls[0], "--coordinator", urls[1],
                     "--data-dir", str(net.tmp / "miner"), "--threads", "1", "--ctx", "1024"],
                    net.tmp / "miner.log"))
                net.wait_miners(n + 1 if bus else 1)
            r = httpx.post(f"{balancer.url}/v1/accounts", timeout=10)
            assert r.status_code == 201
            headers = {"Authorization": f"Bearer {r.json()['api_key']}"}
            charged: list[int] = []
            failed: list[str] = []

            def ask(i: int) -> None:
                body = {"model": MODEL, "max_tokens": 120, "temperature": 0.8, "seed": i,
                        "messages": [{"role": "user", "content": f"Tell a story {i}."}]}
                try:
                    r = httpx.post(f"{balancer.url}/v1/chat/completions", headers=headers,
                                   json=body, timeout=120)
                except httpx.HTTPError as exc:  # the replica it went to died
                    failed.append(repr(exc))
                    return
                if r.status_code != 200:
                    failed.append(r.text)
                    return
                u = r.json()["usage"]
                charged.append(cost(u["prompt_tokens"], u["completion_tokens"]))

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (one.active_jobs() and
                                                         two.active_jobs()):
                time.sleep(0.05)
            assert one.active_jobs() and two.active_jobs(), "load did not reach both"
            one.coordinator.popen.send_signal(signal.SIGKILL)
            one.coordinator.popen.wait()
            for t in threads:
                t.join(120)
            assert failed, "no request was on the killed replica"
            assert charged, "no request finished on the live replica"
            two.wait_miners(2, timeout=30)  # the dead replica's miner moved over
            deadline = time.monotonic() + 30  # the lease (3 s) runs out, a sweep refunds
            while time.monotonic() < deadline and account(two, headers)["held"]:
                time.sleep(0.25)
            a = account(two, headers)
            assert a["held"] == 0
            assert a["balance"] == GRANT - sum(charged)  # refunded once, charged once
            r = httpx.post(f"{balancer.url}/v1/chat/completions", headers=headers, timeout=60,
                           json={"model": MODEL, "max_tokens": 4,
                                 "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200, r.text  # the balancer skips the dead replica
        finally:
            balancer.close()
            for net in (one, two):
                net.close()
        check = ledger_verify(tmp_path / "two" / "coordinator", db)
        assert check.returncode == 0, check.stdout + check.stderr


NATS = "nats://127.0.0.1:4222"


@pytest.fixture
def nats_url() -> str:
    """The NATS server at 127.0.0.1:4222 (CI runs one: its tests must run there)."""
    import socket

    try:
        socket.create_connection(("127.0.0.1", 4222), timeout=2).close()
    except OSError as exc:
        if os.environ.get("COVEY_REQUIRE_NATS"):
            raise
        pytest.skip(f"no NATS at 127.0.0.1:4222 ({exc})")
    return NATS


def replicas(tmp_path: Path, *args: str) -> tuple[Network, Network]:
    """Two coordinator replicas started with ``args``, sharing one identity key."""
    (tmp_path / "one").mkdir()
    one = Network(tmp_path / "one", *args)
    (tmp_path / "two" / "coordinator").mkdir(parents=True)
    shutil.copy(tmp_path / "one" / "coordinator" / "coordinator.key",
                tmp_path / "two" / "coordinator" / "coordinator.key")
    try:
        return one, Network(tmp_path / "two", *args)
    except Exception:
        one.close()
        raise


def test_a_replica_serves_through_a_miner_connected_to_another(tmp_path: Path, nats_url):
    with postgres_database() as db:
        one, two = replicas(tmp_path, "--database-url", db, "--nats-url", nats_url)
        try:
            miner_args = ["miner", "--data-dir", str(tmp_path / "miner"), "--threads", "1",
                          "--ctx", "1024"]
            two.miners.append(Proc([*miner_args, "--coordinator", two.url],
                                   tmp_path / "miner.log"))
            two.wait_miners(1)
            one.wait_miners(1, timeout=15)  # announced over NATS
            [listed] = httpx.get(f"{one.url}/v1/miners", timeout=5).json()["data"]
            headers = sign_up(one)
            body = {"model": MODEL, "max_tokens": 12,
                    "messages": [{"role": "user", "content": "Name a colour."}]}
            r = httpx.post(f"{one.url}/v1/chat/completions", headers=headers, json=body,
                           timeout=60)
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer["system_fingerprint"] == f"miner-{listed['id'][:16]}"
            assert answer["choices"][0]["message"]["content"]
            u = answer["usage"]
            # Streamed too, token by token, through the other replica.
            with httpx.stream("POST", f"{one.url}/v1/chat/completions", headers=headers,
                              json={**body, "stream": True}, timeout=60) as s:
                lines = [x for x in s.iter_lines() if x.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and len(lines) > 3
            # One ledger: the other replica sees the same account and charges.
            a = account(two, headers)
            assert a["held"] == 0 and a["balance"] < GRANT - cost(u["prompt_tokens"],
                                                                   u["completion_tokens"]) + 1
            # The same key connecting to the first replica: one session network-wide; the
            # process it replaced is told another uses its key, and stops.
            second = Proc([*miner_args, "--coordinator", one.url], tmp_path / "miner2.log")
            one.miners.append(second)
            two.miners[0].popen.wait(30)
            assert "another miner process connected with this miner's key" in \
                two.miners[0].output()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not (
                    one.live_miners() == 1 and two.live_miners() == 1
                    and len(httpx.get(f"{two.url}/v1/miners").json()["data"]) == 1):
                time.sleep(0.2)
            for net in (one, two):
                assert [m["id"] for m in httpx.get(f"{net.url}/v1/miners").json()["data"]] \
                    == [listed["id"]]
            r = httpx.post(f"{two.url}/v1/chat/completions", headers=headers, json=body,
                           timeout=60)
            assert r.status_code == 200, r.text  # now served the other way round
        finally:
            for net in (one, two):
                net.close()


def test_a_replica_with_another_identity_key_is_refused(tmp_path: Path, nats_url):
    with postgres_database() as db:
        args = ("--database-url", db, "--nats-url", nats_url)
        (tmp_path / "one").mkdir()
        one = Network(tmp_path / "one", *args)
        try:  # the second replica's data folder holds a key of its own
            r = subprocess.run([sys.executable, "-m", "covey", "coordinator", "--port",
                                str(free_port()), "--data-dir", str(tmp_path / "other"),
                                *args], capture_output=True, text=True, timeout=60)
            assert r.returncode == 2, r.stderr
            assert "copy the first replica's coordinator.key" in r.stderr
            assert "Traceback" not in r.stderr
        finally:
            one.close()
