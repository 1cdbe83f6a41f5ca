"""Sharded models, side by side in one run: decode tokens/s and time to first token (TTFT) of
the bundled SmolLM2-135M served whole by one transformers miner (1 shard) and by chains of 2
and 3 shard miners, with transformers' own ``generate`` in this process as the floor; the
coordinator's cost per relay hop; and the pause when a shard dies mid-answer against the
time its replacement took to rebuild.

Every miner runs one CPU thread; on a 2-core machine the shards share the cores, so the
ratios measure what the relay costs, not what more machines would gain.

    python bench/shards.py [--rounds 5] [--max-tokens 64]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from covey.miner.backends.transformers_shard import (  # noqa: E402
    count_blocks,
    load_float_model,
    split_blocks,
)
from covey.miner.models import BUNDLED_MODEL, resolve_model, weights_sha256  # noqa: E402
from network import free_port  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def in_process(max_tokens: int, rounds: int) -> dict[str, float]:
    """transformers' own greedy ``generate``, one thread, in this process."""
    import torch

    torch.set_num_threads(1)
    path = resolve_model(BUNDLED_MODEL).path
    model, tok = load_float_model(path, weights_sha256(path))
    enc = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    ttfts, rates = [], []
    for _ in range(rounds):
        began = time.perf_counter()
        model.generate(**enc, max_new_tokens=1, do_sample=False)
        ttfts.append(time.perf_counter() - began)
        began = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False)
        n = out.shape[1] - enc["input_ids"].shape[1]
        rates.append((n - 1) / (time.perf_counter() - began - ttfts[-1]))
    return {"ttft_s": statistics.median(ttfts), "decode_tps": statistics.median(rates)}


def llama_cpp_text(max_tokens: int) -> str | None:
    """llama.cpp's greedy answer to the same prompt from the same GGUF (None without it)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(str(resolve_model(BUNDLED_MODEL).path), n_ctx=1024, n_threads=1,
                verbose=False)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": PROMPT}],
                                     max_tokens=max_tokens, temperature=0)
    return out["choices"][0]["message"]["content"]


def common_words(a: str, b: str) -> int:
    """How many leading words two texts share."""
    n = 0
    for x, y in zip(a.split(), b.split(), strict=False):
        if x != y:
            break
        n += 1
    return n


class Net:
    """A coordinator and shard miners, one per range (each may be given twice)."""

    def __init__(self, tmp: Path, ranges: list[tuple[int, int]], stall: float = 2.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        cov = [sys.executable, "-m", "covey"]
        self.log = (tmp / "net.log").open("ab")
        self.coord = subprocess.Popen(
            [*cov, "coordinator", "--port", str(self.port), "--data-dir", str(tmp / "c"),
             "--check-rate", "0", "--log-level", "warning", "--key-rpm", "0",
             "--key-concurrency", "0", "--stall-timeout", str(stall)],
            stdout=self.log, stderr=self.log)
        self.miners: list[tuple[tuple[int, int], subprocess.Popen[bytes]]] = []
        for i, (a, b) in enumerate(ranges):
            proc = subprocess.Popen(
                [*cov, "miner", "--coordinator", self.url, "--blocks", f"{a}:{b}",
                 "--threads", "1", "--ctx", "1024", "--data-dir", str(tmp / f"m{i}"),
                 "--log-level", "warning"], stdout=self.log, stderr=self.log)
            self.miners.append(((a, b), proc))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                data = httpx.get(f"{self.url}/v1/models", timeout=2).json()["data"]
                if data and data[0]["miners"] == len(ranges):
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.25)
        else:
            self.stop()
            raise RuntimeError(f"the network did not start; see {tmp / 'net.log'}")
        self.key = httpx.post(f"{self.url}/v1/accounts", timeout=10).json()["api_key"]

    def stream(self, max_tokens: int, on_token=None) -> dict[str, float]:
        """One greedy streamed answer: TTFT, decode rate, the longest gap between tokens."""
        body = {"model": BUNDLED_MODEL, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
        began = time.perf_counter()
        times: list[float] = []
        text = []
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {self.key}"}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    piece = choice["delta"].get("content")
                    if piece:
                        times.append(time.perf_counter())
                        text.append(piece)
                        if on_token is not None:
                            on_token(len(times))
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return {"ttft_s": times[0] - began,
                "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
                "step_s": statistics.median(gaps), "max_gap_s": max(gaps), "text": "".join(text)}

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def relay_p50(self) -> float:
        """The median relay cost per hop, from the coordinator's histogram (linear within
        the bucket that holds the median)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        buckets = [(float(le), float(v)) for le, v in re.findall(
            r'^covey_shard_relay_seconds_bucket\{le="([0-9.e+-]+)"\} ([0-9.e+-]+)$', text,
            re.M)]
        total = buckets[-1][1] if buckets else 0
        lo, below = 0.0, 0.0
        for le, count in buckets:
            if count >= total / 2:
                share = (total / 2 - below) / max(count - below, 1e-9)
                return lo + (le - lo) * share
            lo, below = le, count
        return float("nan")

    def stop(self) -> None:
        for _, p in self.miners:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
        self.coord.terminate()
        for _, p in self.miners:
            p.wait(15)
        self.coord.wait(15)


def chain(tmp: Path, shards: int, total: int, max_tokens: int, rounds: int) -> dict:
    net = Net(tmp, split_blocks(total, shards))
    try:
        net.stream(8)  # warm up: first answers load caches and measure speeds
        runs = [net.stream(max_tokens) for _ in range(rounds)]
        return {"ttft_s": statistics.median(r["ttft_s"] for r in runs),
                "decode_tps": statistics.median(r["decode_tps"] for r in runs),
                "step_s": statistics.median(r["step_s"] for r in runs),
                "relay_p50_ms": net.relay_p50() * 1000 if shards > 1 else None,
                "text": runs[0]["text"]}
    finally:
        net.stop()


def failure(tmp: Path, total: int, max_tokens: int) -> dict:
    """A spare for the second half; the one serving it is killed after 10 tokens."""
    half = split_blocks(total, 2)
    net = Net(tmp, [half[0], half[1], half[1]])
    try:
        net.stream(8)
        reference = net.stream(max_tokens)

        def kill(n: int) -> None:
            if n != 10:
                return
            data = httpx.get(f"{net.url}/v1/miners", timeout=5).json()["data"]
            busy = next(m["id"] for m in data if m["active"]
                        and m["models"][0]["shard"]["start"] == half[1][0])
            os.kill(_process_of(net, busy).pid, signal.SIGKILL)

        cut = net.stream(max_tokens, kill)
        rebuild = net.metric("covey_shard_rebuild_seconds_sum")
        return {"pause_s": cut["max_gap_s"], "rebuild_s": rebuild,
                "normal_step_s": reference["step_s"],
                "same_text": cut["text"] == reference["text"]}
    finally:
        net.stop()


def _process_of(net: Net, miner_id: str) -> subprocess.Popen[bytes]:
    """The miner process whose key is ``miner_id`` (its data folder's key file)."""
    from covey.protocol.identity import load_or_create

    for i, (_, proc) in enumerate(net.miners):
        key = load_or_create(net.tmp / f"m{i}" / "miner.key")
        if key.verify_key.encode().hex() == miner_id:
            return proc
    raise LookupError(miner_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    total = count_blocks(resolve_model(BUNDLED_MODEL).path)
    out: dict[str, object] = {"model": BUNDLED_MODEL, "blocks": total,
                              "max_tokens": args.max_tokens, "rounds": args.rounds}
    out["in_process"] = in_process(args.max_tokens, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for k in (1, 2, 3):
            (Path(tmp) / f"s{k}").mkdir()
            runs[k] = chain(Path(tmp) / f"s{k}", k, total, args.max_tokens, args.rounds)
        base = runs[1]
        base_text = base["text"]
        llama = llama_cpp_text(args.max_tokens)
        if llama is not None:
            out["llama_cpp"] = {"common_leading_words": common_words(llama, base_text),
                                "of_words": len(base_text.split())}
        for r in runs.values():
            r["same_text_as_1_shard"] = r.pop("text") == base_text
        base_step = base["step_s"]
        for k in (2, 3):
            runs[k]["decode_ratio"] = runs[k]["decode_tps"] / base["decode_tps"]
            runs[k]["added_per_hop_ms"] = (runs[k]["step_s"] - base_step) * 1000 / (k - 1)
        out["shards"] = {str(k): {kk: (round(v, 4) if isinstance(v, float) else v)
                                  for kk, v in r.items()} for k, r in runs.items()}
        (Path(tmp) / "fail").mkdir()
        fail = failure(Path(tmp) / "fail", total, args.max_tokens)
        fail["pause_within_rebuild_plus_1s"] = fail["pause_s"] <= fail["rebuild_s"] + 1.0
        out["failure"] = {k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in fail.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
