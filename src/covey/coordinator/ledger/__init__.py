"""The ledger: double-entry, append-only, hash-chained transfers of micro-credits (µcr).

Every movement of credits is a transfer between two accounts with an idempotency key;
balances are derived from the log (a cache table is kept in the same transaction and
re-checked by :meth:`Ledger.verify`). See DESIGN.md, "Money".
"""

from covey.coordinator.ledger.store import (
    InsufficientFunds,
    Ledger,
    LedgerError,
    Transfer,
    VerifyReport,
)

__all__ = ["InsufficientFunds", "Ledger", "LedgerError", "Transfer", "VerifyReport"]
