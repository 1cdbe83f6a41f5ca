"""Judging a validator's measurements of an answer: pass or fail, with the reasons.

The validator measures (:class:`~covey.protocol.CheckReport`); the coordinator judges, so
every validator is held to one rule set and the thresholds live in one place
(:class:`CheckPolicy`). Thresholds come from honest miners: ``bench/verify.py`` re-checks
honest answers of the bundled model and prints the largest gaps seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from covey.protocol import CheckReport, Generate


@dataclass(frozen=True)
class CheckPolicy:
    """Verification settings.

    - ``rate``: share of finished jobs re-checked by a validator (0–1); ``chat_rate``: the
      same for text generation, which canaries watch too (None: ``rate``).
    - ``canary_rate``: covert canary jobs sent per user text job (0–1,
      :mod:`covey.coordinator.verify.canaries`). With ``chat_rate`` 0.005, 0.024 catches the
      sleeper (real weights for its trial, others after) within 200 jobs with probability
      ≥ 0.99 at ≤ 5% compute overhead (``bench/verify.py``, ``canaries``).
    - ``greedy_gap``: largest logit gap (validator's top logit minus the token's) a greedy
      token may have. Validator and miner evaluate the answer in different batch shapes
      (one prefill versus token-by-token decode), so their logits differ by rounding: up to
      0.9 logits on single vocabulary entries of the bundled Q4_1 model, while honest greedy
      gaps measured stay below 0.2 (``bench/verify.py``, ``honest_max_gap``). 1.0 leaves room
      for other CPUs and builds; a wrong token from another model is typically several
      logits away.
    - ``greedy_mean_gap``: a greedy answer also fails when its gaps add up to more than
      this per token (counted over at least 32 tokens): rounding flips a near tie now and
      then, so honest answers of 32 tokens sum to 0.4 logits at most (0 on most), while
      other weights that stay under ``greedy_gap`` at every token still drift off the
      model's choice at several (1.4 to 3.6 logits over 32 tokens; ``bench/verify.py``,
      ``honest_max_gap_sum``).
    - ``tail_q`` / ``tail_alpha``: a sampled answer fails when its count of tokens with
      probability below ``tail_q`` (under the request's own sampling distribution) is so
      high that an honest sampler would reach it with probability below ``tail_alpha``
      (Poisson tail with the expected count as mean).
    - ``likelihood_alpha``: a sampled answer fails when its log-likelihood Σ log q under the
      request's sampling distribution is so low that an honest sampler would get one as low
      with probability below this, by Chernoff's bound over the validator's moment
      generating function (a bound, so it holds whatever the shape of the distribution).
    - ``max_outside``: tokens a sampled answer may have outside its top-p set (after the
      validator's slack for rounding).
    - ``slash_bps``: basis points of the miner's stake slashed per failed check;
      ``validator_bps``: basis points of the slashed amount paid to the validator (0: a
      validator earns nothing from a slash, so framing pays nothing; it is paid per check
      instead, see :mod:`covey.coordinator.verify.confirm`).
    - ``validator_fee``: the least µcr a validator is paid per check, by the network's
      issuance (it gets the checked job's miner pay when that is more).
    - ``reputation_floor``: below it a miner gets no jobs until it passes a trial again.
    - ``timeout``: seconds a validator or a trial may take.
    - ``trials``: hold each new miner until it passes a trial task (off only for networks of
      trusted miners, or load tests of the coordinator itself).
    """

    rate: float = 0.05
    chat_rate: float | None = None
    canary_rate: float = 0.0
    greedy_gap: float = 1.0
    greedy_mean_gap: float = 0.045
    tail_q: float = 1e-4
    tail_alpha: float = 1e-6
    likelihood_alpha: float = 1e-6
    max_outside: int = 0
    slash_bps: int = 1000
    validator_bps: int = 0
    validator_fee: int = 10
    reputation_floor: float = 0.3
    timeout: float = 60.0
    trials: bool = True


@dataclass
class Verdict:
    """``passed`` unless ``reasons`` says why not; ``figures`` are the numbers judged."""

    reasons: list[str] = field(default_factory=list)
    figures: dict[str, object] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """No reasons to fail."""
        return not self.reasons

    def as_dict(self) -> dict[str, object]:
        return {"passed": self.passed, "reasons": self.reasons, "figures": self.figures}


def poisson_sf(k: int, mean: float) -> float:
    """P(X ≥ k) for X ~ Poisson(``mean``); 1.0 when k ≤ ``mean`` (the tail is then about
    one half or more, and only small tails matter here)."""
    if k <= 0 or k <= mean:
        return 1.0
    if mean <= 0:
        return 0.0
    # Sum the upper tail itself: 1 − P(X < k) loses all precision when the tail is tiny.
    upper, i = 0.0, k
    term = math.exp(k * math.log(mean) - mean - math.lgamma(k + 1))
    while i < k + 10_000 and term > 1e-300:
        upper += term
        i += 1
        term *= mean / i
    return min(1.0, upper)


CHERNOFF_LAMBDAS = (0.25, 0.5, 0.75, 0.9)
"""The λ of each entry of ``CheckReport.chernoff`` (the validator's grid)."""


def likelihood_bound(report: CheckReport) -> float:
    """Upper bound on the chance that an honest sampler's answer has a log-likelihood as low
    as ``report.logq_sum``: min over λ of exp(Σ log E[q^(−λ)] + λ·Σ log q) (Chernoff's
    bound on the lower tail of a sum of independent terms; 1.0 without data)."""
    logs = [c + lam * report.logq_sum for lam, c in zip(CHERNOFF_LAMBDAS, report.chernoff,
                                                       strict=False)]
    return math.exp(min(0.0, *logs)) if logs else 1.0


def judge(policy: CheckPolicy, job: Generate, report: CheckReport, prompt_tokens: int) -> Verdict:
    """Judge ``report`` on an answer to ``job`` whose miner reported ``prompt_tokens``."""
    v = Verdict()
    gaps = report.gaps
    v.figures = {"tokens": len(gaps), "prompt_tokens": [prompt_tokens, report.prompt_tokens],
                 "max_gap": max(gaps, default=0.0), "outside": report.outside,
                 "tail_count": report.tail_count, "tail_mass": round(report.tail_mass, 4),
                 "eos_checked": report.eos_checked}
    if not report.text_matches:
        v.reasons.append("the streamed text is not what the streamed token ids decode to")
    if report.prompt_tokens != prompt_tokens:
        v.reasons.append(f"the miner reported {prompt_tokens} prompt tokens; the validator "
                         f"counts {report.prompt_tokens}")
    if job.params.temperature == 0:
        wrong = [i for i, g in enumerate(gaps) if g > policy.greedy_gap]
        if wrong:
            v.figures["wrong_positions"] = wrong[:20]
            v.reasons.append(f"{len(wrong)} of {len(gaps)} greedy tokens are not the model's "
                             f"choice (largest gap {max(gaps):.2f} logits)")
        total, allowed = sum(gaps), policy.greedy_mean_gap * max(32, len(gaps))
        v.figures["gap_sum"] = round(total, 3)
        if not wrong and total > allowed:
            v.reasons.append(f"greedy tokens are not the model's choice: their gaps add up to "
                             f"{total:.2f} logits over {len(gaps)} tokens (at most "
                             f"{allowed:.2f} for the model's own answer)")
        return v
    if report.outside > policy.max_outside:
        v.reasons.append(f"{report.outside} of {len(gaps)} sampled tokens lie outside the "
                         f"top-p set (top_p {job.params.top_p})")
    p = poisson_sf(report.tail_count, report.tail_mass)
    v.figures["tail_p"] = p
    if p < policy.tail_alpha:
        v.reasons.append(f"{report.tail_count} of {len(gaps)} sampled tokens have probability "
                         f"below {policy.tail_q:g} where an honest sampler expects "
                         f"{report.tail_mass:.2f} (p = {p:.1e})")
    z = (report.logq_sum + report.entropy_sum) / math.sqrt(report.variance_sum) \
        if report.variance_sum > 0 else 0.0
    v.figures["z"] = round(z, 3)
    bound = likelihood_bound(report)
    v.figures["likelihood_p"] = bound
    if bound < policy.likelihood_alpha:
        v.reasons.append(f"the sampled tokens are far less likely than an honest sample's "
                         f"(log-likelihood {report.logq_sum:.1f} nats, expected "
                         f"{-report.entropy_sum:.1f}; p ≤ {bound:.1e})")
    return v
