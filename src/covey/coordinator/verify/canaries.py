"""Canary jobs: covert greedy jobs the coordinator sends as if a user had, judged like
sampled re-checks.

The sleeper cheat answers its trial with the real weights and serves other (cheaper)
weights afterwards; trial prompts are public, so it can also keep answering those honestly.
Sampled re-checks of sampled answers catch other weights only in about one check of five
(``bench/verify.py``), while a greedy answer from other weights fails nearly every check.
So after a share ``CheckPolicy.canary_rate`` of user text jobs, the coordinator sends a
canary: a prompt from a private pool, greedy, with the user job's ``max_tokens``, after a
random delay, through the same routing, escrow, settlement and receipt as any job, so a
miner sees nothing that tells it apart. Every canary answer is re-checked by a validator
(kind ``canary``) and a failure is confirmed and punished like any sampled check.

- **Pool.** ``--canary-prompts FILE`` (one prompt per line, or JSON lines with
  ``messages``) is the operator's private pool. Without one, prompts are drawn from a
  built-in grammar (:func:`built_in_prompt`, 6,850 prompts): its words are public, so
  a miner that learns them could answer every prompt of that shape honestly; real networks
  keep their pool private.
- **Paid by issuance.** The canary account is funded from the faucet (the network's
  issuance), job by job, with what the escrow needs; what a canary does not use stays
  there for the next.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from covey.coordinator.ledger.bank import Bank, user
from covey.coordinator.ledger.store import FAUCET, Transfer
from covey.coordinator.outcome import Outcome
from covey.protocol import Generate
from covey.protocol.frames import ChatMessage
from covey.protocol.openai import ChatCompletionRequest
from covey.protocol.requests import chat_job

log = logging.getLogger("covey.coordinator.verify")

CANARY_ACCOUNT = "covey:canary"
"""The ledger account canaries are paid from (``user:covey:canary``)."""

DELAY_MEAN_S = 3.0
"""Mean of the exponential delay between the user job that draws a canary and the canary,
so canaries arrive at random moments, not right after a job ends."""
DELAY_MAX_S = 30.0
MAX_PENDING = 16
"""Canaries waiting or running at once; more are dropped (counted as skipped)."""
MIN_TOKENS, MAX_TOKENS = 16, 256
"""Canary ``max_tokens`` is the user job's, kept within these bounds (short greedy answers
say little; long ones cost more than they tell)."""

_SUBJECTS = (
    "the moon", "bread", "rivers", "volcanoes", "trains", "honey", "chess", "glaciers",
    "clocks", "bicycles", "salt", "paper", "bees", "owls", "lighthouses", "deserts",
    "coral reefs", "maple trees", "thunderstorms", "copper", "the printing press",
    "penguins", "windmills", "tea", "rainbows", "octopuses", "bridges", "caves", "kites",
    "the alphabet", "pottery", "tides", "fungi", "comets", "wolves", "silk", "marathons",
    "sailboats", "cheese", "the telescope", "libraries", "snowflakes", "canals", "violins",
    "ants", "mountains", "lanterns", "compasses", "orchards", "whales",
)
_FORMS = (
    "Tell me one fact about {s}.", "Write a short poem about {s}.",
    "Explain {s} to a child in two sentences.", "List three words related to {s}.",
    "What is the history of {s}, briefly?", "Explain how {s} work, step by step.",
    "Describe {s} in the style of a weather report.", "Why do people find {s} {a}?",
    "Write a haiku about {s} at {t}.", "Compare {s} and {o} in one paragraph.",
    "Tell me a story about {s} and {o}.", "What would a {p} say about {s}?",
    "Write a letter from a {p} about {s}.", "Describe a day in the life of a {p} who "
    "loves {s}.",
)
"""Open-ended forms: a canary's worth is the tokens it makes a miner commit to, so forms
that end after a few words (a riddle's answer) are left out (``bench/verify.py`` measures
how often a canary catches other weights)."""
_ADJECTIVES = ("interesting", "useful", "beautiful", "strange", "calming", "important")
_TIMES = ("dawn", "noon", "dusk", "midnight", "the end of winter")
_PEOPLE = ("sailor", "child", "baker", "scientist", "poet", "farmer", "historian")


def built_in_prompt(rng: random.Random) -> str:
    """One prompt from the built-in grammar: 14 forms over 50 subjects (two of them over
    pairs of subjects) and their fillers, 6,850 distinct prompts."""
    s, o = rng.sample(_SUBJECTS, 2)
    return rng.choice(_FORMS).format(s=s, o=o, a=rng.choice(_ADJECTIVES),
                                     t=rng.choice(_TIMES), p=rng.choice(_PEOPLE))


def load_pool(path: Path) -> list[tuple[ChatMessage, ...]]:
    """An operator's prompt pool: each non-empty line is a prompt, or a JSON object with
    ``messages`` (OpenAI chat messages), held to the rules of a user's chat request (a
    canary must be a request a user could send).

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not UTF-8 text, a line is not valid, or it holds no prompt.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    pool: list[tuple[ChatMessage, ...]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if not line.startswith("{"):
            line = json.dumps({"messages": [{"role": "user", "content": line}]})
        try:
            body = json.loads(line)
            if not isinstance(body, dict) or "messages" not in body:
                raise ValueError("expected a JSON object with messages")
            request = ChatCompletionRequest.model_validate(
                {"model": "canary", "messages": body["messages"]})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ValueError(f"line {n}: {where}: {first['msg']}") from None
        except ValueError as exc:
            raise ValueError(f"line {n}: {exc}") from None
        pool.append(tuple(ChatMessage(role=m.role, content=m.text())
                          for m in request.messages))
    if not pool:
        raise ValueError("no prompt in the file")
    return pool


def fund(bank: Bank, job_id: str, needed: int) -> int:
    """Top the canary account up from the faucet to ``needed`` µcr for ``job_id``;
    returns µcr minted (0 when the account already holds enough)."""
    account = user(CANARY_ACCOUNT)
    minted: list[int] = []

    def make(bal: Mapping[str, int]) -> list[Transfer]:
        short = max(0, needed - bal.get(account, 0))
        minted.append(short)
        return [Transfer(FAUCET, account, short, "canary")] if short else []

    bank.ledger.post_computed(f"canary:{job_id}", [account, FAUCET], make)
    return minted[0] if minted else 0


@dataclass(frozen=True)
class CanaryJob:
    """A canary about to be sent: the job and when (seconds from now)."""

    job: Generate
    delay: float


class Canaries:
    """Draws canaries after user jobs and sends them through ``send`` (the coordinator's
    own serving path: hold, route, settle, re-check; it raises on refusal).

    ``rate``: canaries per user text job (0–1); ``pool``: an operator's prompts (None: the
    built-in grammar); ``skipped``: called when a canary could not be sent.
    """

    def __init__(self, rate: float, send: Callable[[Generate], Awaitable[None]],
                 pool: Sequence[tuple[ChatMessage, ...]] | None = None,
                 skipped: Callable[[], None] = lambda: None,
                 rng: random.Random | None = None) -> None:
        self.rate = rate
        self.send = send
        self.pool = list(pool) if pool else None
        self.skipped = skipped
        # Seeded from the OS once: a draw per user job must not cost a system call, and
        # the draws are never seen by a miner.
        self._rng = rng or random.Random(random.SystemRandom().getrandbits(128))
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def is_canary(account: str) -> bool:
        """Whether a job of ``account`` was a canary."""
        return account == CANARY_ACCOUNT

    def draw(self, outcome: Outcome) -> CanaryJob | None:
        """After a user's text job: a canary with probability ``rate`` (None otherwise,
        and for private models, whose miners cannot read a text prompt)."""
        if outcome.offer is not None and outcome.offer.private:
            return None
        if self._rng.random() >= self.rate:
            return None
        sent = getattr(outcome.answer, "sent", None)
        wanted = sent.params.max_tokens if isinstance(sent, Generate) else None
        max_tokens = min(MAX_TOKENS, max(MIN_TOKENS, wanted or MAX_TOKENS))
        messages = (self._rng.choice(self.pool) if self.pool else
                    (ChatMessage(role="user", content=built_in_prompt(self._rng)),))
        # Made the way a user's greedy request is, so nothing in the job differs.
        job = chat_job(ChatCompletionRequest(
            model=outcome.model, max_tokens=max_tokens, temperature=0,
            messages=[{"role": m.role, "content": m.content} for m in messages]))
        delay = min(DELAY_MAX_S, self._rng.expovariate(1 / DELAY_MEAN_S))
        return CanaryJob(job, delay)

    def after_user_job(self, outcome: Outcome, checkable: Callable[[], bool]) -> None:
        """Maybe send a canary after ``outcome`` (a user's finished text job);
        ``checkable()`` says whether a validator could check it (asked only once one is
        drawn: it scans the miners)."""
        canary = self.draw(outcome)
        if canary is None or not checkable():
            return
        if len(self._tasks) >= MAX_PENDING:
            self.skipped()
            return
        task = asyncio.ensure_future(self._later(canary))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _later(self, canary: CanaryJob) -> None:
        await asyncio.sleep(canary.delay)
        try:
            await self.send(canary.job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a refused canary is only a lost sample
            self.skipped()
            log.info("canary %s not sent: %s", canary.job.job_id, exc)

    def close(self) -> None:
        """Drop the canaries not sent yet (at shutdown)."""
        for task in self._tasks:
            task.cancel()
