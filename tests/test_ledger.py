"""The ledger's rules under random interleavings, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from sqlalchemy import text

from conftest import postgres_database
from covey.coordinator.ledger import InsufficientFunds, Ledger, store
from covey.coordinator.ledger.bank import Bank, BankPolicy, escrow, miner, user
from covey.coordinator.ledger.schema import metadata


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request, tmp_path_factory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('ledger')}/ledger.db"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def ledger(db_url: str) -> Iterator[Ledger]:
    led = Ledger(db_url, SigningKey.generate())
    yield led
    led.close()


def _reset(led: Ledger) -> None:
    with led.engine.begin() as conn:
        for table in ("transfers", "balances", "api_keys"):
            conn.execute(text(f"DELETE FROM {table}"))
        conn.execute(text("DELETE FROM chain_head"))
    led.__init__(str(led.engine.url.render_as_string(hide_password=False)), led.key)


amounts = st.integers(min_value=1, max_value=30_000_000)
idx = st.integers(min_value=0, max_value=5)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("signup")),
        st.tuples(st.just("hold"), idx, amounts),
        st.tuples(st.just("settle"), idx, st.integers(min_value=0, max_value=40_000_000)),
        st.tuples(st.just("refund"), idx),
        st.tuples(st.just("transfer"), idx, idx, amounts),
        st.tuples(st.just("stake"), amounts),
        st.tuples(st.just("unstake"), amounts),
        st.tuples(st.just("slash"), amounts),
        st.tuples(st.just("repeat"), idx),
    ),
    min_size=1,
    max_size=25,
)

MINER = "ab" * 32


def _snapshot(led: Ledger) -> dict[str, int]:
    return {k: v for k, v in led.balances_like("").items()}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_random_interleavings_keep_the_books(ledger: Ledger, ops):
    _reset(ledger)
    bank = Bank(ledger, BankPolicy(grant=20_000_000, fee_bps=700, unbonding_s=0))
    users: list[str] = []
    jobs: list[tuple[str, str]] = []  # (job id, payer)
    done: list[tuple] = []  # operations that can be replayed with the same key
    for n, op in enumerate(ops):
        kind = op[0]
        try:
            if kind == "signup":
                users.append(bank.sign_up()[0])
            elif kind == "hold" and users:
                job = (f"job{n}", users[op[1] % len(users)])
                bank.hold(job[0], job[1], op[2])
                jobs.append(job)
                done.append(("hold", job, op[2]))
            elif kind == "settle" and jobs:
                job = jobs[op[1] % len(jobs)]
                s = bank.settle(job[0], job[1], MINER, op[2])
                assert s is None or min(s.miner, s.fee, s.refund) >= 0
                done.append(("settle", job, op[2]))
            elif kind == "refund" and jobs:
                bank.refund(*jobs[op[1] % len(jobs)])
            elif kind == "transfer" and users:
                a, b = users[op[1] % len(users)], users[op[2] % len(users)]
                if a != b:
                    bank.transfer(a, b, op[3], f"t{n}")
                    done.append(("transfer", (a, b), op[3], f"t{n}"))
            elif kind == "stake":
                bank.stake(MINER, op[1], f"s{n}")
            elif kind == "unstake":
                bank.unstake(MINER, op[1], f"u{n}")
                bank.release_unbonded(MINER)
            elif kind == "slash":
                bank.slash(MINER, op[1], "test", f"x{n}")
            elif kind == "repeat" and done:
                before = _snapshot(ledger)
                again = done[op[1] % len(done)]
                if again[0] == "hold":
                    bank.hold(again[1][0], again[1][1], again[2])
                elif again[0] == "settle":
                    bank.settle(again[1][0], again[1][1], MINER, again[2])
                else:
                    bank.transfer(again[1][0], again[1][1], again[2], again[3])
                assert _snapshot(ledger) == before  # a repeated key has no second effect
        except InsufficientFunds:
            pass
        assert all(v >= 0 for k, v in _snapshot(ledger).items() if k != "faucet")
    report = ledger.verify()
    assert report.ok, report.problems
    assert report.minted == 20_000_000 * len(users)


def test_settle_splits_exactly_and_only_once(ledger: Ledger):
    _reset(ledger)
    bank = Bank(ledger, BankPolicy(grant=1_000_000, fee_bps=500))
    account, _ = bank.sign_up()
    bank.hold("j1", account, 400_000)
    assert ledger.balance(user(account)) == 600_000
    s = bank.settle("j1", account, MINER, 100_000)
    assert (s.miner, s.fee, s.refund) == (95_000, 5_000, 300_000)
    assert bank.settle("j1", account, MINER, 100_000) is None
    assert bank.refund("j1", account) == 0
    assert ledger.balance(user(account)) == 900_000
    assert ledger.balance(miner(MINER)) == 95_000
    assert ledger.balance(escrow("j1")) == 0
    with pytest.raises(InsufficientFunds):
        bank.hold("j2", account, 900_001)
    assert ledger.verify().ok


def test_submitted_operations_resolve_on_the_loop(ledger: Ledger):
    """``Ledger.submit``: a future of the operation's result; its error, or what
    ``on_error`` makes of it; and a cancelled future does not withdraw the operation."""
    _reset(ledger)
    bank = Bank(ledger, BankPolicy(grant=1_000_000, fee_bps=500))
    account, _ = bank.sign_up()

    async def scenario() -> None:
        assert await ledger.submit(bank.hold_op("s1", account, 300_000)) is True
        assert await ledger.submit(bank.hold_op("s1", account, 300_000)) is False  # a repeat
        with pytest.raises(InsufficientFunds):
            await ledger.submit(bank.hold_op("s2", account, 700_001))

        def refused(exc: BaseException) -> str:
            return f"refused: {type(exc).__name__}"
        assert await ledger.submit(bank.hold_op("s2", account, 700_001),
                                   refused) == "refused: InsufficientFunds"
        gone = ledger.submit(bank.hold_op("s3", account, 100_000))
        gone.cancel()
        # Written all the same: the next operation commits after it.
        await ledger.submit(bank.refund_op("s1", account))

    asyncio.run(scenario())
    assert ledger.balance(escrow("s3")) == 100_000
    assert ledger.balance(user(account)) == 900_000
    assert ledger.verify().ok


def test_a_closed_escrow_leaves_no_balance_row(ledger: Ledger):
    """The balance table keeps open escrows only, however many jobs ran: closed in a later
    commit, in the same commit as the hold, or by a refund."""
    _reset(ledger)
    bank = Bank(ledger, BankPolicy(grant=1_000_000, fee_bps=500))
    account, _ = bank.sign_up()
    bank.hold("open", account, 1_000)
    bank.hold("later", account, 1_000)
    assert set(ledger.balances_like("escrow:")) == {escrow("open"), escrow("later")}
    bank.settle("later", account, MINER, 10)
    hold, close = bank.hold_op("together", account, 500), bank.refund_op("together", account)
    ledger._commit([hold.pending, close.pending])  # one transaction: the row never appears
    assert close.finish(close.pending.applied) == 500
    assert ledger.balances_like("escrow:") == {escrow("open"): 1_000}
    assert ledger.balance(escrow("later")) == 0
    assert ledger.balance(user(account)) == 1_000_000 - 1_000 - 10
    assert ledger.verify().ok
    # The migration drops the empty rows earlier versions left.
    with ledger.engine.begin() as conn:
        conn.execute(text("INSERT INTO balances (account, balance) VALUES ('escrow:old', 0)"))
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store.__file__).parent / "migrations"))
    with ledger.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    store.migrate(ledger.engine)
    assert set(ledger.balances_like("escrow:")) == {escrow("open")}
    assert ledger.verify().ok


def test_a_repeat_is_found_by_its_exact_key(ledger: Ledger):
    """Keys are matched whole, whatever they hold: the writer's one-statement lookups must
    not cut, fold or widen them (a NUL only where the database can store one)."""
    _reset(ledger)
    bank = Bank(ledger, BankPolicy(grant=1_000))
    a, _ = bank.sign_up()
    b, _ = bank.sign_up()
    keys = ["k", "K", "k_", "k%", "ключ", "k\\"]
    if ledger.engine.dialect.name == "sqlite":
        keys += ["k\x00x"]
    for key in keys:
        assert bank.transfer(a, b, 1, key) is True
    for key in keys:
        assert bank.transfer(a, b, 1, key) is False  # a repeat, not an error
    assert ledger.balance(user(b)) == 1_000 + len(keys)
    assert ledger.verify().ok


def test_tampering_with_one_row_is_caught(ledger: Ledger):
    _reset(ledger)
    bank = Bank(ledger, BankPolicy(grant=1_000_000))
    for _ in range(3):
        bank.sign_up()
    assert ledger.verify().ok
    with ledger.engine.begin() as conn:
        conn.execute(text("UPDATE transfers SET amount = amount + 1 WHERE seq = 2"))
        conn.execute(
            text(
                "UPDATE balances SET balance = balance + 1 "
                "WHERE account = (SELECT credit FROM transfers WHERE seq = 2)"
            )
        )
    report = ledger.verify()
    assert not report.ok
    assert any("entry 2" in p for p in report.problems)


def test_a_forged_head_signature_is_caught(ledger: Ledger):
    _reset(ledger)
    Bank(ledger, BankPolicy(grant=5)).sign_up()
    with ledger.engine.begin() as conn:
        conn.execute(text("UPDATE chain_head SET signature = :s"), {"s": "00" * 64})
    assert "chain head signature is invalid" in ledger.verify().problems


def test_schema_matches_the_migration(ledger: Ledger):
    from sqlalchemy import inspect

    names = set(inspect(ledger.engine).get_table_names())
    assert set(metadata.tables) <= names


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(), st.text(), st.text(), st.integers(0, 2**63 - 1),
       st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_entry_hashes_are_the_canonical_json_ones(key, debit, credit, kind, seq, amount, at):
    """The chain's entries are hashed from bytes written directly, for speed: the very
    bytes of ``canonical_json`` (the chain's definition), whatever the text."""
    import hashlib

    from covey.coordinator.ledger.chain import GENESIS, entry_hash
    from covey.protocol.signing import canonical_json
    try:
        body = canonical_json([seq, key, debit, credit, amount, kind, at])
    except UnicodeEncodeError:  # a lone surrogate: neither can hash it
        with pytest.raises(UnicodeEncodeError):
            entry_hash(GENESIS, seq, key, debit, credit, amount, kind, at)
        return
    expected = hashlib.sha256(GENESIS.encode() + body).hexdigest()
    assert entry_hash(GENESIS, seq, key, debit, credit, amount, kind, at) == expected
