"""Settlement and failover decisions as pure functions: no process, no network."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from covey.coordinator.errors import ApiError
from covey.coordinator.failover import FailoverPolicy, may_retry, no_takeover
from covey.coordinator.job_faults import MinerFault, gone
from covey.coordinator.ledger.pricing import Price
from covey.coordinator.outcome import Charge, Outcome, Refund, settle

PRICE = Price(prompt=100_000, completion=200_000)
MINER = "ab" * 32


def _done(**kw: object) -> Outcome:
    base: dict[str, object] = {"job_id": "j1", "account": "u1", "model": "m", "ending": "done",
                               "miner_id": MINER, "prompt_tokens": 10, "completion_tokens": 5}
    return Outcome(**{**base, **kw})  # type: ignore[arg-type]


def test_a_finished_request_pays_its_miner_for_the_tokens_delivered():
    op = settle(_done(), PRICE)
    assert isinstance(op, Charge)
    assert (op.job_id, op.account, op.miner_id) == ("j1", "u1", MINER)
    # 10 × 0.1 + 5 × 0.2 µcr = 2 µcr
    assert op.amount == 2
    assert (op.usage.model, op.usage.prompt_tokens, op.usage.completion_tokens) == ("m", 10, 5)


def test_a_client_that_left_pays_for_what_it_was_sent():
    op = settle(_done(ending="client_closed", completion_tokens=3), PRICE)
    assert isinstance(op, Charge) and op.usage.completion_tokens == 3


def test_nobody_is_paid_for_failures_false_usage_or_no_miner():
    for outcome in (_done(ending="failed"), _done(fault="reported 9 tokens, streamed 5"),
                    _done(miner_id=None)):
        assert settle(outcome, PRICE) == Refund("j1", "u1")


def test_an_embedding_is_billed_per_input_token():
    op = settle(_done(prompt_tokens=1_000_000, completion_tokens=0), PRICE)
    assert isinstance(op, Charge) and op.amount == PRICE.prompt


@given(st.integers(0, 10**7), st.integers(0, 10**7))
def test_the_charge_never_rounds_a_non_empty_request_to_zero(prompt: int, completion: int):
    op = settle(_done(prompt_tokens=prompt, completion_tokens=completion), PRICE)
    assert isinstance(op, Charge)
    assert (op.amount > 0) == (prompt + completion > 0)
    assert op.amount * 1_000_000 >= prompt * PRICE.prompt + completion * PRICE.completion


def test_failover_moves_a_miners_fault_until_the_tries_are_spent():
    policy = FailoverPolicy(max_tries=3)
    assert may_retry(policy, 1, gone()) and may_retry(policy, 2, gone())
    assert not may_retry(policy, 3, gone())
    refused = ApiError(400, "prompt too long", code="context_length_exceeded")
    assert not may_retry(policy, 1, refused)  # the request's fault: no other miner helps
    too_short = MinerFault("context_length", refused, blame=False)
    assert may_retry(policy, 1, too_short) and not too_short.blame


def test_no_takeover_keeps_the_miners_error_code():
    error = no_takeover(gone(), ApiError(503, "No miner is serving 'm'.",
                                         code="no_miner_available"))
    assert error.status == 502 and error.code == "miner_disconnected"
    assert "No other miner could take the request over" in error.message
