"""A replica's background duties: renew its lease, and, on the leader only, refund the
escrows of replicas that died and drop the owner rows of closed escrows
(:mod:`covey.coordinator.ledger.replicas`)."""

from __future__ import annotations

import asyncio
import logging

from covey.coordinator.billing import Billing
from covey.coordinator.ledger.replicas import Lease, prune_owners, refund_orphaned

log = logging.getLogger("covey.coordinator.ledger")


async def run_duties(lease: Lease, billing: Billing) -> None:
    """Every ``lease.ttl / 3`` seconds until cancelled: renew ``lease``; when this replica
    leads, refund the orphaned escrows and prune owner rows. A failed round (the database
    away) is logged and tried again next round; the lease then runs out, as it should."""
    while True:
        await asyncio.sleep(lease.ttl / 3)
        try:
            await billing.ledger_call(lease.renew)
            if await billing.ledger_call(lease.lead):
                refunded = await billing.ledger_call(refund_orphaned, billing.bank)
                if refunded:
                    log.warning("refunded %d escrows of replicas that died", refunded)
                await billing.ledger_call(prune_owners, billing.bank.ledger)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a duty round must not end the loop
            log.exception("replica duties failed this round")
