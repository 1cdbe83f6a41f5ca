"""Many miners' earnings and stakes in one read, for listings (``GET /v1/miners``).

The same figures as :meth:`~covey.coordinator.ledger.bank.Bank.miner_earnings` gives for
one miner, read for every listed miner with one statement per table on one connection
(not three queries per miner), so a page polling the list costs the database the same
whether the network has two miners or two hundred.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select

from covey.coordinator.ledger.bank import miner, stake_account
from covey.coordinator.ledger.schema import balances, usage
from covey.coordinator.ledger.store import Ledger


def earnings_of(ledger: Ledger, miner_ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """``{miner id: {"jobs", "completion_tokens", "balance", "staked"}}`` for each id:
    paid jobs, completion tokens served, µcr on the miner's account (its earnings after the
    fee, less what it staked) and µcr staked. A miner the ledger never saw gets zeros."""
    ids = sorted(set(miner_ids))
    out = {m: {"jobs": 0, "completion_tokens": 0, "balance": 0, "staked": 0} for m in ids}
    if not ids:
        return out
    accounts = {miner(m): (m, "balance") for m in ids} | {
        stake_account(m): (m, "staked") for m in ids}
    served = (select(usage.c.miner, func.count(), func.sum(usage.c.completion_tokens))
              .where(usage.c.miner.in_(ids)).group_by(usage.c.miner))
    held = select(balances.c.account, balances.c.balance).where(
        balances.c.account.in_(list(accounts)))
    with ledger.engine.connect() as conn:
        for m, jobs, tokens in conn.execute(served):
            out[m]["jobs"] = int(jobs)
            out[m]["completion_tokens"] = int(tokens or 0)
        for account, balance in conn.execute(held):
            m, field = accounts[account]
            out[m][field] = int(balance)
    return out
