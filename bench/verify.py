"""Verification: what re-checks cost and how fast they catch each cheat.

Runs in one process with the bundled model: a miner answers varied prompts (greedy and
sampled), a second context of the same weights re-checks every answer as the validator does
(one teacher-forced prefill, ``covey.miner.backends.scoring``), and the coordinator's judge
rules on it. From that:

- honest calibration: failed checks among honest answers (must be 0), the largest greedy
  logit gap and the smallest tail p-value seen;
- per-check detection rate of each cheat: another GGUF of the same shape (two layers
  swapped) answering under the real hash; 20% of each answer's tokens replaced by random
  ones. Stopping early and inflating usage are caught by the coordinator's recount on every
  job, whatever the check rate;
- for check rates 1%, 5%, 10%: verification compute as a share of inference compute, and
  jobs until each cheat is caught (median, p95, and P(caught within 200 jobs)), simulated
  from the measured per-check outcomes;
- ``canaries``: the sleeper (the real weights for its trial, the other weights for every
  other job) against covert greedy canaries from the built-in prompt grammar at
  ``--canary-rate`` per user job plus sampled re-checks at ``--chat-check-rate``: the
  per-canary detection rate, the compute overhead (canary inference and check, plus the
  sampled checks, over user inference) and the jobs until it is caught, canaries counted
  among the jobs.

Prints one JSON object; ``--markdown`` also prints the table for the docs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from covey.coordinator.verify.canaries import built_in_prompt
from covey.coordinator.verify.judge import CheckPolicy, judge
from covey.coordinator.verify.trials import TrialBook, compare
from covey.miner.backends.adversary import make_impostor
from covey.miner.backends.llama_cpp import LlamaCppBackend, LlamaCppConfig
from covey.miner.models import ModelFile, resolve_model, weights_sha256
from covey.protocol import Check, Delta, Done, Job, SamplingParams, Started
from covey.protocol.frames import ChatMessage

TOPICS = ["the moon", "bread", "rivers", "the number seven", "cats", "music", "winter",
          "volcanoes", "trains", "honey", "chess", "the ocean", "glass", "forests", "clocks",
          "bicycles", "salt", "the sun", "paper", "bees"]
FORMS = ["Tell me one fact about {}.", "Write a short poem about {}.",
         "Explain {} to a child in two sentences.", "List three words related to {}."]
SETTINGS = [(0.0, 1.0), (0.7, 0.9), (1.0, 1.0), (0.8, 0.95), (1.3, 1.0)]
RATES = (0.01, 0.05, 0.10)


def make_job(i: int, max_tokens: int) -> Job:
    text = FORMS[i % len(FORMS)].format(TOPICS[(i // len(FORMS)) % len(TOPICS)])
    t, top_p = SETTINGS[i % len(SETTINGS)]
    return Job(job_id=f"job-{i}", model="m", messages=(ChatMessage(role="user", content=text),),
               params=SamplingParams(temperature=t, top_p=top_p, max_tokens=max_tokens,
                                     seed=i))


async def answer(backend: LlamaCppBackend, job: Job) -> tuple[list[int], str, str, int, float]:
    """(token ids, text, finish, prompt tokens, seconds) of one generation."""
    ids: list[int] = []
    parts: list[str] = []
    finish, prompt = "length", 0
    start = time.perf_counter()
    async for frame in backend.generate(job):
        if isinstance(frame, Started):
            prompt = frame.prompt_tokens
        elif isinstance(frame, Delta):
            ids.extend(frame.token_ids)
            parts.append(frame.text)
        elif isinstance(frame, Done):
            finish = frame.finish_reason
    return ids, "".join(parts), finish, prompt, time.perf_counter() - start


async def recheck(validator: LlamaCppBackend, job: Job, ids: list[int], text: str,
                  finish: str, prompt: int, policy: CheckPolicy) -> tuple[object, float]:
    start = time.perf_counter()
    report = await validator.check(Check(job_id="chk", job=job, token_ids=tuple(ids),
                                         text=text, finish_reason=finish,
                                         tail_q=policy.tail_q))
    return judge(policy, job, report, prompt), time.perf_counter() - start


def corrupt(ids: list[int], share: float, vocab: int, piece, rng: random.Random
            ) -> tuple[list[int], str]:
    """What the random-tokens adversary sends: each token replaced with probability
    ``share``."""
    out = [rng.randrange(vocab) if rng.random() < share else t for t in ids]
    if out == ids:
        return ids, ""
    return out, b"".join(piece(t) for t in out).decode(errors="ignore")


def jobs_to_catch(rate: float, outcomes: list[bool], sims: int, rng: random.Random,
                  cap: int = 100_000, canary_rate: float = 0.0,
                  canary_outcomes: list[bool] | None = None) -> dict[str, float]:
    """Simulated jobs until the first failed check: each job is checked with probability
    ``rate``; a checked job is caught as one of the measured ``outcomes`` (drawn at random).
    With ``canary_rate``, each job is followed by a canary with that probability (caught as
    one of ``canary_outcomes``), which counts as a job too."""
    counts = []
    for _ in range(sims):
        n = 0
        while n < cap:
            n += 1
            if rng.random() < rate and rng.choice(outcomes):
                break
            if canary_rate and rng.random() < canary_rate:
                n += 1
                if rng.choice(canary_outcomes or [False]):
                    break
        counts.append(n)
    counts.sort()
    return {"median": counts[len(counts) // 2], "p95": counts[int(len(counts) * 0.95)],
            "p_within_200": round(sum(c <= 200 for c in counts) / len(counts), 4)}


async def main(args: argparse.Namespace) -> dict[str, object]:
    policy = CheckPolicy()
    model = resolve_model("smollm2-135m-instruct")
    sha = weights_sha256(model.path, Path(tempfile.gettempdir()) / "covey-bench")
    cfg = LlamaCppConfig(n_ctx=1024, n_threads=1, stream_interval=0)
    miner = LlamaCppBackend(model, sha, 1, cfg)
    validator = LlamaCppBackend(model, sha, 1, cfg)
    fake = make_impostor(model.path, Path(tempfile.mkdtemp()) / "impostor.gguf")
    impostor = LlamaCppBackend(ModelFile(model.name, fake), sha, 1, cfg)
    llm = miner._slots[0].llm
    vocab, piece = llm.n_vocab(), (lambda t: miner._piece(llm, t))
    rng = random.Random(7)

    infer_s = check_s = 0.0
    failed: list[str] = []
    greedy_gaps: list[float] = []
    gap_sums: list[float] = []
    tail_ps: list[float] = []
    zs: list[float] = []
    lps: list[float] = []
    answers = []
    for i in range(args.jobs):
        job = make_job(i, args.max_tokens)
        ids, text, finish, prompt, took = await answer(miner, job)
        verdict, checked = await recheck(validator, job, ids, text, finish, prompt, policy)
        infer_s += took
        check_s += checked
        answers.append((job, ids, text, finish, prompt))
        if not verdict.passed:
            failed.append(f"{job.job_id}: {verdict.reasons}")
        if job.params.temperature == 0:
            greedy_gaps.append(float(verdict.figures["max_gap"]))
            gap_sums.append(float(verdict.figures["gap_sum"]))
        else:
            tail_ps.append(float(verdict.figures.get("tail_p", 1.0)))
            zs.append(float(verdict.figures.get("z", 0.0)))
            lps.append(float(verdict.figures.get("likelihood_p", 1.0)))

    random_caught: list[bool] = []
    by_setting: dict[str, list[bool]] = {}
    cheat_z: list[float] = []
    for job, ids, _text, finish, prompt in answers[: args.cheat_jobs]:
        bad, text = corrupt(ids, 0.2, vocab, piece, rng)
        if not text:  # nothing replaced: the adversary's answer is the honest one
            text = _text
        verdict, _ = await recheck(validator, job, bad, text, finish, prompt, policy)
        random_caught.append(not verdict.passed)
        by_setting.setdefault(_setting(job), []).append(not verdict.passed)
        cheat_z.append(float(verdict.figures.get("likelihood_p", 1.0)))

    impostor_caught: list[bool] = []
    impostor_by_setting: dict[str, list[bool]] = {}
    impostor_z: list[float] = []
    for i in range(args.cheat_jobs):
        job = make_job(10_000 + i, args.max_tokens)
        ids, text, finish, prompt, _ = await answer(impostor, job)
        verdict, _ = await recheck(validator, job, ids, text, finish, prompt, policy)
        impostor_caught.append(not verdict.passed)
        impostor_by_setting.setdefault(_setting(job), []).append(not verdict.passed)
        impostor_z.append(float(verdict.figures.get("likelihood_p", 1.0)))
    canary_caught: list[bool] = []
    canary_infer_s = canary_check_s = 0.0
    prompts = random.Random(11)
    for i in range(args.cheat_jobs):
        job = Job(job_id=f"canary-{i}", model="m",
                  messages=(ChatMessage(role="user", content=built_in_prompt(prompts)),),
                  params=SamplingParams(temperature=0, max_tokens=args.max_tokens))
        ids, text, finish, prompt, took = await answer(impostor, job)
        verdict, checked = await recheck(validator, job, ids, text, finish, prompt, policy)
        canary_caught.append(not verdict.passed)
        canary_infer_s += took
        canary_check_s += checked
    canaries = sleeper_figures(
        args, canary_caught, impostor_caught, (canary_infer_s + canary_check_s) /
        args.cheat_jobs, check_s / args.jobs, infer_s / args.jobs, rng)
    trial_caught = []
    for ref in TrialBook().references.get(sha, []):
        job = Job(job_id="trial", model="m",
                  messages=tuple(ChatMessage(**m) for m in ref.messages),
                  params=SamplingParams(temperature=0, max_tokens=len(ref.token_ids)))
        ids, _, finish, _, _ = await answer(impostor, job)
        trial_caught.append(compare(ref, ids, finish) is not None)

    table = []
    for rate in RATES:
        table.append({
            "check_rate": rate,
            "overhead_share": round(rate * check_s / infer_s, 4),
            # Caught at its trial on join (job 0) when any trial answer differs; the figures
            # are for one that slipped past it (real weights for the trial, then others).
            "impostor_weights": {"caught_at_trial": any(trial_caught),
                                 **jobs_to_catch(rate, impostor_caught, args.sims, rng)},
            "random_tokens_20pct": jobs_to_catch(rate, random_caught, args.sims, rng),
            "stop_early": {"median": 1, "p95": 1, "p_within_200": 1.0},
            "inflate_usage": {"median": 1, "p95": 1, "p_within_200": 1.0},
        })
    for b in (miner, validator, impostor):
        b.close()
    return {
        "honest_jobs": args.jobs, "honest_failed_checks": len(failed), "failures": failed[:5],
        "honest_max_gap": round(max(greedy_gaps, default=0.0), 4),
        "honest_max_gap_sum": round(max(gap_sums, default=0.0), 4),
        "honest_min_tail_p": min(tail_ps, default=1.0),
        "honest_min_z": round(min(zs, default=0.0), 3),
        "honest_min_likelihood_p": min(lps, default=1.0),
        "check_s_per_job": round(check_s / args.jobs, 4),
        "inference_s_per_job": round(infer_s / args.jobs, 4),
        "impostor_detect_per_check": round(statistics.fmean(impostor_caught), 4),
        "random_tokens_detect_per_check": round(statistics.fmean(random_caught), 4),
        "impostor_trial_detect": round(statistics.fmean(trial_caught), 4) if trial_caught
        else None,
        "random_tokens_median_likelihood_p": statistics.median(cheat_z),
        "impostor_median_likelihood_p": statistics.median(impostor_z),
        "random_tokens_detect_by_setting": _rates(by_setting),
        "impostor_detect_by_setting": _rates(impostor_by_setting),
        "rates": table,
        "canaries": canaries,
    }


def sleeper_figures(args: argparse.Namespace, canary_caught: list[bool],
                    sampled_caught: list[bool], canary_s: float, check_s: float,
                    infer_s: float, rng: random.Random) -> dict[str, object]:
    """The sleeper against canaries and sampled checks at the configured rates, next to
    sampled checks alone at 5% (the previous default). ``canary_s``: seconds of one
    canary's inference and check; ``check_s`` / ``infer_s``: per user job."""
    overhead = (args.canary_rate * canary_s + args.chat_check_rate * check_s) / infer_s
    caught = jobs_to_catch(args.chat_check_rate, sampled_caught, args.sims, rng,
                           canary_rate=args.canary_rate, canary_outcomes=canary_caught)
    alone = jobs_to_catch(0.05, sampled_caught, args.sims, rng)
    return {"canary_rate": args.canary_rate, "chat_check_rate": args.chat_check_rate,
            "canary_detect_per_check": round(statistics.fmean(canary_caught), 4),
            "sampled_detect_per_check": round(statistics.fmean(sampled_caught), 4),
            "overhead_share": round(overhead, 4), "sleeper": caught,
            "sampled_5pct_alone": {**alone,
                                   "overhead_share": round(0.05 * check_s / infer_s, 4)}}



def _setting(job: Job) -> str:
    return f"T={job.params.temperature:g},top_p={job.params.top_p:g}"


def _rates(groups: dict[str, list[bool]]) -> dict[str, float]:
    return {k: round(statistics.fmean(v), 3) for k, v in sorted(groups.items())}


def markdown(result: dict) -> str:
    rows = ["| check rate | verification compute / inference | other weights (after trial) "
            "median / p95 / P(≤200) | 20% random tokens median / p95 / P(≤200) | stop early, "
            "inflate usage |", "| --- | --- | --- | --- | --- |"]
    for r in result["rates"]:
        a, b = r["impostor_weights"], r["random_tokens_20pct"]
        rows.append(f"| {r['check_rate']:.0%} | {r['overhead_share']:.2%} | "
                    f"{a['median']} / {a['p95']} / {a['p_within_200']} | "
                    f"{b['median']} / {b['p95']} / {b['p_within_200']} | 1 job (every job) |")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=300, help="honest answers to re-check")
    parser.add_argument("--cheat-jobs", type=int, default=100,
                        help="answers per cheat to re-check")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sims", type=int, default=20_000)
    parser.add_argument("--canary-rate", type=float, default=0.024)
    parser.add_argument("--chat-check-rate", type=float, default=0.005)
    parser.add_argument("--markdown", action="store_true")
    a = parser.parse_args()
    out = asyncio.run(main(a))
    print(json.dumps(out))
    if a.markdown:
        print(markdown(out), file=sys.stderr)
