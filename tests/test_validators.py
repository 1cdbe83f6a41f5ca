"""Checking the checkers: a failed verdict needs a second validator's word before a slash
(covey.coordinator.verify.confirm), validators are paid per check whatever they report, and
canary jobs (covey.coordinator.verify.canaries) are drawn as the policy says. Pure parts
here; the network tests (a framing validator, the sleeper caught by canaries) are in
test_trust.py."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from covey.coordinator.ledger.bank import Bank, miner, user
from covey.coordinator.ledger.store import FAUCET
from covey.coordinator.outcome import Outcome, TextAnswer
from covey.coordinator.verify.canaries import (
    CANARY_ACCOUNT,
    MAX_TOKENS,
    MIN_TOKENS,
    Canaries,
    built_in_prompt,
    fund,
    load_pool,
)
from covey.coordinator.verify.confirm import pay_validator, rule
from covey.coordinator.verify.judge import Verdict
from covey.coordinator.verify.validators import NoVerdict
from covey.protocol import Generate, SamplingParams
from covey.protocol.frames import ChatMessage
from covey.protocol.openai import ChatCompletionRequest
from covey.protocol.requests import chat_job
from test_checks import bank  # noqa: F401 - the fixture: a bank on SQLite and PostgreSQL

ACCUSED, FIRST = "a" * 64, "f" * 64


def voters(*votes: bool | NoVerdict):
    """A rejudge that answers with ``votes`` in turn (a NoVerdict is raised), recording the
    miners each call excluded."""
    calls: list[list[str]] = []
    queue = list(votes)

    async def rejudge(exclude: Sequence[str]) -> tuple[Verdict, str | None]:
        calls.append(list(exclude))
        vote = queue.pop(0)
        if isinstance(vote, NoVerdict):
            raise vote
        return Verdict([] if vote else ["wrong"]), f"{len(calls)}" * 64

    return rejudge, calls


def test_a_second_failing_report_confirms():
    rejudge, calls = voters(False)
    ruling = asyncio.run(rule(FIRST, ACCUSED, rejudge))
    assert ruling.confirmed and not ruling.alone and ruling.dissenters == []
    assert calls == [[ACCUSED, FIRST]]  # neither the accused nor the accuser judges again


def test_a_framer_outvoted_loses_and_the_accused_is_cleared():
    rejudge, calls = voters(True, True)
    ruling = asyncio.run(rule(FIRST, ACCUSED, rejudge))
    assert not ruling.confirmed and ruling.dissenters == [FIRST]
    assert calls == [[ACCUSED, FIRST], [ACCUSED, FIRST, "1" * 64]]


def test_a_tie_broken_by_a_third_failing_report_confirms():
    rejudge, _ = voters(True, False)
    ruling = asyncio.run(rule(FIRST, ACCUSED, rejudge))
    assert ruling.confirmed and ruling.dissenters == ["1" * 64]  # it passed a cheat


def test_a_tie_with_no_third_validator_is_not_confirmed():
    rejudge, _ = voters(True, NoVerdict("nobody else", nobody=True))
    ruling = asyncio.run(rule(FIRST, ACCUSED, rejudge))
    assert not ruling.confirmed and not ruling.alone and ruling.dissenters == []


def test_the_only_validator_of_some_weights_is_believed_alone():
    rejudge, _ = voters(NoVerdict("no other miner serves these weights", nobody=True))
    ruling = asyncio.run(rule(FIRST, ACCUSED, rejudge))
    assert ruling.confirmed and ruling.alone and ruling.dissenters == []


def test_a_busy_second_validator_leaves_the_verdict_unconfirmed():
    rejudge, _ = voters(NoVerdict("no validator was free"))
    ruling = asyncio.run(rule(FIRST, ACCUSED, rejudge))
    assert not ruling.confirmed and not ruling.alone
    assert "free" in ruling.reason


def test_a_validator_is_paid_per_check_once_from_issuance(bank: Bank):  # noqa: F811
    account, _ = bank.sign_up()
    worker, checker = "c" * 64, "d" * 64
    bank.hold("job-9", account, 10_000)
    bank.settle("job-9", account, worker, 2_000)  # the miner earns 1,900
    minted = -bank.ledger.balance(FAUCET)
    assert pay_validator(bank, checker, "job-9", floor=10) == 1_900
    assert pay_validator(bank, checker, "job-9", floor=10) == 0  # once per check
    assert pay_validator(bank, checker, "trial-1", floor=10) == 10  # nobody paid a trial
    assert bank.ledger.balance(miner(checker)) == 1_910
    assert -bank.ledger.balance(FAUCET) == minted + 1_910
    assert bank.ledger.verify(bank.ledger.public_key).ok


def test_the_canary_account_is_topped_up_to_what_a_hold_needs(bank: Bank):  # noqa: F811
    assert fund(bank, "job-1", 500) == 500
    assert fund(bank, "job-1", 500) == 0  # the same canary again: nothing more
    bank.hold("job-2", CANARY_ACCOUNT, 300)
    assert fund(bank, "job-3", 500) == 300  # only what is missing
    assert bank.ledger.balance(user(CANARY_ACCOUNT)) == 500


def _outcome(max_tokens: int | None, account: str = "acct") -> Outcome:
    job = Generate(job_id="chatcmpl-1", model="m", messages=(ChatMessage(role="user",
                                                                          content="hi"),),
                   params=SamplingParams(temperature=0.8, max_tokens=max_tokens))
    return Outcome(job_id=job.job_id, account=account, model="m", ending="done",
                   miner_id=ACCUSED, answer=TextAnswer(sent=job, token_ids=[1], text="x",
                                                       finish_reason="stop", delivered=1))


async def _never(job: Generate) -> None:  # pragma: no cover - draw() sends nothing
    raise AssertionError


def test_canaries_are_greedy_shaped_like_the_user_job_and_drawn_at_the_rate():
    rng = random.Random(3)
    canaries = Canaries(0.25, _never, rng=rng)
    drawn = [canaries.draw(_outcome(40)) for _ in range(4000)]
    sent = [c for c in drawn if c is not None]
    assert 0.22 < len(sent) / len(drawn) < 0.28
    assert all(c.job.params.temperature == 0 and c.job.params.max_tokens == 40 for c in sent)
    # The same job a user's greedy request of that size makes, prompt aside.
    user = chat_job(ChatCompletionRequest(model="m", max_tokens=40, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}]))
    assert sent[0].job.params == user.params and sent[0].job.stop_ids == user.stop_ids
    assert all(c.job.job_id.startswith("chatcmpl-") and c.job.model == "m" for c in sent)
    assert all(0 <= c.delay <= 30 for c in sent)
    assert len({c.job.messages[0].content for c in sent}) > 500  # not a handful of prompts
    always = Canaries(1.0, _never, rng=rng)
    assert always.draw(_outcome(1)).job.params.max_tokens == MIN_TOKENS
    assert always.draw(_outcome(None)).job.params.max_tokens == MAX_TOKENS
    assert Canaries.is_canary(CANARY_ACCOUNT) and not Canaries.is_canary("acct")


def test_the_built_in_grammar_and_an_operators_pool(tmp_path: Path):
    rng = random.Random(1)
    assert len({built_in_prompt(rng) for _ in range(20_000)}) > 3000
    pool = tmp_path / "pool.txt"
    pool.write_text('Name a river.\n\n{"messages": [{"role": "system", "content": "Be '
                    'brief."}, {"role": "user", "content": "Why is the sky blue?"}]}\n')
    first, second = load_pool(pool)
    assert first[0].content == "Name a river." and len(second) == 2
    canaries = Canaries(1.0, _never, pool=[first, second], rng=rng)
    assert canaries.draw(_outcome(20)).job.messages in (first, second)
    # A canary must be a request a user could send: the API's own rules hold.
    for bad, why in (("", "no prompt"), ('{"messages": 3}\n', "line 1: messages"),
                     ('Hi\n{"messages": []}\n', "line 2: messages"),
                     ('{"messages": [{"role": "bogus", "content": "x"}]}', "line 1: messages"),
                     ('{"foo": 1}', "line 1: expected a JSON object with messages"),
                     ("{not json", "line 1:")):
        pool.write_text(bad)
        with pytest.raises(ValueError, match=why):
            load_pool(pool)
    pool.write_bytes(b"\xfb\xfe")
    with pytest.raises(ValueError, match="UTF-8"):
        load_pool(pool)
