"""The parts of verification that need no miner: the validator's statistics, the judge, the
trial comparison and the penalty's money, on SQLite and the real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from conftest import postgres_database
from covey.coordinator.ledger import Ledger
from covey.coordinator.ledger.bank import Bank, BankPolicy, miner, user
from covey.coordinator.ledger.penalties import Evidence, failed_checks, penalize
from covey.coordinator.ledger.store import TREASURY, Transfer
from covey.coordinator.verify.judge import CheckPolicy, judge, likelihood_bound, poisson_sf
from covey.coordinator.verify.trials import Reference, TrialBook, compare
from covey.miner.backends.scoring import token_stats
from covey.protocol import CheckReport, Job, SamplingParams


def sampler(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator
            ) -> int:
    """llama.cpp's chain as the miner runs it: top-p on the untempered distribution, then
    temperature, then a draw."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
    q = np.exp((logits[keep] - logits[keep].max()) / temperature)
    return int(rng.choice(keep, p=q / q.sum()))


def test_greedy_gaps_and_a_token_outside_top_p():
    logits = np.array([[5.0, 4.0, 0.0, -3.0], [0.0, 9.0, 1.0, 1.0]])
    s = token_stats(logits, np.array([0, 2]), 0.0, 1.0, 1e-4)
    assert s.gaps == (0.0, 8.0) and s.outside == 0
    s = token_stats(logits, np.array([0, 3]), 1.0, 0.5, 1e-4)
    assert s.outside == 1  # token 3 is far outside the top-50% set of row 2


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), temperature=st.sampled_from([0.5, 0.8, 1.0, 1.5]),
       top_p=st.sampled_from([0.5, 0.9, 1.0]))
def test_honest_samples_pass_and_random_tokens_fail(seed: int, temperature: float,
                                                     top_p: float):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, size=(40, 2000))
    honest = np.array([sampler(row, temperature, top_p, rng) for row in logits])
    job = Job(job_id="j", model="m", prompt="x",
              params=SamplingParams(temperature=temperature, top_p=top_p))
    policy = CheckPolicy()

    def verdict(tokens: np.ndarray):
        s = token_stats(logits, tokens, temperature, top_p, policy.tail_q)
        report = CheckReport(job_id="c", prompt_tokens=1, text_matches=True, gaps=s.gaps,
                             outside=s.outside, tail_count=s.tail_count,
                             tail_mass=s.tail_mass, logq_sum=s.logq_sum,
                             entropy_sum=s.entropy_sum, variance_sum=max(s.variance_sum, 0),
                             chernoff=s.chernoff)
        return judge(policy, job, report, 1)

    assert verdict(honest).passed, verdict(honest).reasons
    cheat = np.where(rng.random(40) < 0.5, rng.integers(0, 2000, 40), honest)
    if temperature <= 1.0:  # hotter honest samples are themselves close to random
        assert not verdict(cheat).passed


def test_the_likelihood_bound_holds_for_honest_samples():
    """Chernoff's bound is a bound: of many honest answers, about none fall below a small
    p (the share below p must not exceed p, up to noise)."""
    rng = np.random.default_rng(1)
    below = 0
    for _ in range(200):
        logits = rng.normal(0, 3, size=(20, 500))
        tokens = np.array([sampler(row, 1.0, 1.0, rng) for row in logits])
        s = token_stats(logits, tokens, 1.0, 1.0, 1e-4)
        report = CheckReport(job_id="c", prompt_tokens=1, text_matches=True, gaps=s.gaps,
                             outside=0, logq_sum=s.logq_sum, chernoff=s.chernoff)
        below += likelihood_bound(report) < 0.05
    assert below <= 200 * 0.05 + 5


def test_judge_refuses_text_and_prompt_that_do_not_match():
    job = Job(job_id="j", model="m", prompt="x", params=SamplingParams(temperature=0))
    report = CheckReport(job_id="c", prompt_tokens=5, text_matches=False, gaps=(0.0,),
                         outside=0)
    v = judge(CheckPolicy(), job, report, 7)
    assert len(v.reasons) == 2
    assert "decode" in v.reasons[0] and "7 prompt tokens" in v.reasons[1]


def test_poisson_tail():
    assert poisson_sf(0, 3.0) == 1.0
    assert poisson_sf(2, 1.0) == pytest.approx(1 - 2 * np.exp(-1))
    assert poisson_sf(1000, 20_000) == 1.0  # at or below the mean: no evidence at all
    assert poisson_sf(6, 0.5) == pytest.approx(1.4164e-5, rel=1e-3)
    assert 0 < poisson_sf(60, 0.5) < 1e-90  # no cancellation to zero


def test_trial_comparison_stops_only_at_a_near_tie():
    ref = Reference(messages=(), token_ids=(1, 2, 3, 4), margins=(3.0, 0.2, 3.0, 3.0),
                    finish="length")
    assert compare(ref, [1, 2, 3, 4], "length") is None
    assert compare(ref, [1, 9, 9, 9], "length") is None  # position 1 was a near tie
    assert "greedy choice" in compare(ref, [1, 2, 9, 4], "length")
    assert "ended after 2" in compare(Reference((), (1, 2, 3), (3.0, 3.0, 3.0), "length"),
                                      [1, 2], "stop")


def test_the_bundled_model_has_trial_references():
    from conftest import MODEL
    from covey.miner.models import bundled_path, weights_sha256

    book = TrialBook()
    sha = weights_sha256(bundled_path(MODEL))
    assert len(book.plan(sha)) == 5
    assert book.plan("0" * 64)[0][1] is None  # unknown weights: one prompt, no reference


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def bank(request, tmp_path_factory) -> Iterator[Bank]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('penalty')}/ledger.db"
        led = Ledger(url, SigningKey.generate())
        yield Bank(led, BankPolicy(grant=1_000_000))
        led.close()
        return
    with postgres_database() as url:
        led = Ledger(url, SigningKey.generate())
        yield Bank(led, BankPolicy(grant=1_000_000))
        led.close()


def test_a_penalty_refunds_slashes_pays_the_validator_once(bank: Bank):
    cheat, validator = "c" * 64, "d" * 64
    account, _ = bank.sign_up()
    bank.ledger.post("fund", [Transfer(user(account), miner(cheat), 500_000, "transfer")])
    bank.stake(cheat, 400_000, "s")
    bank.hold("job-1", account, 10_000)
    bank.settle("job-1", account, cheat, 2_000)  # the miner earns 1,900, the fee is 100
    before = bank.ledger.balance(user(account))
    evidence = Evidence("chk-1", "sampled", "job-1", cheat, "e" * 64,
                        {"passed": False, "reasons": ["junk"]}, account, validator)
    p = penalize(bank, evidence, slash_bps=1000, validator_bps=5000)
    # The user gets the 2,000 back: 1,900 clawed back from the miner's pay, 100 from the
    # slashed 40,000; half of the other 39,900 goes to the validator, half to the treasury.
    assert p is not None and p.slashed == 40_000 and p.refunded == 2_000
    assert p.to_validator == 19_950
    assert bank.ledger.balance(user(account)) == before + 2_000
    assert bank.ledger.balance(miner(cheat)) == 100_000
    assert bank.staked(cheat) == 360_000
    assert bank.ledger.balance(miner(validator)) == 19_950
    assert bank.ledger.balance(TREASURY) == 100 + 19_950
    assert penalize(bank, evidence, 1000, 5000) is None  # applied once
    [row] = failed_checks(bank, cheat)
    assert row["verdict"]["reasons"] == ["junk"] and row["slashed"] == 40_000
    assert bank.ledger.verify(bank.ledger.public_key).ok


def test_a_penalty_that_moves_no_credits_still_keeps_its_evidence(bank: Bank):
    broke = "f" * 64  # no stake, and a trial has no paying user
    evidence = Evidence("chk-2", "trial", "job-2", broke, "e" * 64,
                        {"passed": False, "reasons": ["wrong weights"]})
    p = penalize(bank, evidence, slash_bps=1000, validator_bps=5000)
    assert p is not None and (p.slashed, p.to_validator, p.refunded) == (0, 0, 0)
    [row] = failed_checks(bank, broke)
    assert row["kind"] == "trial" and row["verdict"]["reasons"] == ["wrong weights"]
