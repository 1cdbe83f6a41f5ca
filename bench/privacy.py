"""Privacy benchmark: what end-to-end encryption and private models cost, and what a fixed
permutation leaks. Prints one JSON object (``--markdown`` adds tables).

1. E2E latency: the same short request (8 tokens, non-streamed) sent straight to the
   coordinator and through ``covey proxy`` (sealed), alternating, one at a time, to an
   unthrottled synthetic miner: every millisecond that differs is the cost of the proxy hop,
   the route round trip and the sealing, not of a model. p50 of each and of the difference.
2. E2E decode speed: the bundled model streams the same greedy answer with and without
   E2E, alternating; tokens/s after the first token, as the client sees them.
3. Private model decode speed: the permuted copy vs the plain model, side by side
   (``bench/privacy_attack.py``).
4. Frequency analysis of a fixed permutation after 10, 100 and 1,000 observed requests,
   and with per-user keys and key rotation (``bench/privacy_attack.py``).

Targets (issue "Privacy"): E2E adds ≤ 2 ms p50 and ≤ 2% decode throughput; the permuted
model runs at the plain model's speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load import _port, _stop, _wait_http  # noqa: E402

MODEL = "smollm2-135m-instruct"
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


def _covey(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "covey", *args], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


class Net:
    """A coordinator, one miner and a ``covey proxy``, all on loopback, data in ``tmp``."""

    def __init__(self, tmp: Path, miner_args: list[str]) -> None:
        self.procs: list[subprocess.Popen] = []
        tmp.mkdir(parents=True, exist_ok=True)
        port = _port()
        self.url = f"http://127.0.0.1:{port}"
        self.procs.append(_covey(["coordinator", "--port", str(port), "--data-dir",
                                  str(tmp / "coordinator"), "--log-level", "warning",
                                  "--check-rate", "0", "--no-trial", "--key-rpm", "0",
                                  "--key-concurrency", "0", "--grant", str(10**12)],
                                 tmp / "coordinator.log"))
        _wait_http(f"{self.url}/healthz", self.procs[0])
        self.procs.append(_covey(["miner", "--coordinator", self.url, "--data-dir",
                                  str(tmp / "miner"), *miner_args], tmp / "miner.log"))
        self.key = httpx.post(f"{self.url}/v1/accounts", timeout=10).json()["api_key"]
        proxy_port = _port()
        self.proxy = f"http://127.0.0.1:{proxy_port}"
        self.procs.append(_covey(["proxy", "--coordinator", self.url, "--api-key", self.key,
                                  "--port", str(proxy_port)], tmp / "proxy.log"))
        _wait_http(f"{self.proxy}/health", self.procs[-1])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(m["miners"] for m in httpx.get(f"{self.url}/v1/models").json()["data"]):
                return
            time.sleep(0.2)
        raise RuntimeError("the miner did not join")

    def close(self) -> None:
        for p in reversed(self.procs):
            _stop(p)


def crypto_cost(rounds: int = 2000) -> dict[str, float]:
    """CPU time (µs, median) of the sealing one short request needs: seal and open the job
    (X25519 + XSalsa20-Poly1305), and seal and open 8 deltas of one token each."""
    from nacl.public import PrivateKey

    from covey.protocol.sealing import SealedContent, open_delta, open_job, seal_delta, seal_job

    miner = PrivateKey.generate()
    content = SealedContent(prompt="Write a haiku about pigeons." * 4)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        sealed, key = seal_job(miner.public_key, content)
        _, opened = open_job(miner, sealed)
        for i in range(8):
            open_delta(key, seal_delta(opened, " word", (i,)))
        times.append(time.perf_counter() - t0)
    return {"us_per_request": round(1e6 * statistics.median(times), 1)}


def e2e_latency(tmp: Path, requests: int) -> dict[str, object]:
    """Phase 1: p50 per-request latency (ms) straight and sealed, alternating."""
    net = Net(tmp, ["--backend", "synthetic", "--name", MODEL, "--tokens-per-second", "0",
                    "--slots", "4"])
    body = {"model": MODEL, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello"}]}
    lat: dict[str, list[float]] = {"direct": [], "sealed": []}
    try:
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {net.key}"}) as c:
            for i in range(requests + 20):
                for kind, base in (("direct", net.url), ("sealed", net.proxy)):
                    t0 = time.perf_counter()
                    r = c.post(f"{base}/v1/chat/completions", json=body)
                    elapsed = time.perf_counter() - t0
                    r.raise_for_status()
                    if i >= 20:  # the first 20 warm connections and caches up
                        lat[kind].append(elapsed)
    finally:
        net.close()
    p50 = {k: 1000 * statistics.median(v) for k, v in lat.items()}
    diffs = [1000 * (s - d) for d, s in zip(lat["direct"], lat["sealed"], strict=True)]
    return {"requests": requests, "direct_ms_p50": round(p50["direct"], 2),
            "sealed_ms_p50": round(p50["sealed"], 2),
            "added_ms_p50": round(p50["sealed"] - p50["direct"], 2),
            "paired_added_ms_p50": round(statistics.median(diffs), 2)}


def _decode_rate(client: httpx.Client, base: str, tokens: int) -> float:
    """Tokens/s after the first token of one streamed greedy answer."""
    body = {"model": MODEL, "max_tokens": tokens, "temperature": 0, "stream": True,
            "messages": STORY, "stream_options": {"include_usage": True}}
    first = last = None
    usage = 0
    with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in event.get("choices", [])):
                last = time.perf_counter()
                first = first or last
    assert first is not None and last is not None and usage > 1
    return (usage - 1) / (last - first)


def e2e_decode(tmp: Path, runs: int, tokens: int) -> dict[str, object]:
    """Phase 2: decode tokens/s of the bundled model straight and sealed, alternating."""
    net = Net(tmp, ["--threads", "1", "--ctx", "1024"])
    rates: dict[str, list[float]] = {"direct": [], "sealed": []}
    try:
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {net.key}"}) as c:
            _decode_rate(c, net.url, 16)  # warm-up
            for _ in range(runs):
                for kind, base in (("direct", net.url), ("sealed", net.proxy)):
                    rates[kind].append(_decode_rate(c, base, tokens))
    finally:
        net.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"runs": runs, "tokens": tokens,
            "direct_tokens_per_s": round(med["direct"], 1),
            "sealed_tokens_per_s": round(med["sealed"], 1),
            "sealed_vs_direct": round(med["sealed"] / med["direct"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="phase 1 pairs")
    parser.add_argument("--runs", type=int, default=6, help="phase 2 answers per side")
    parser.add_argument("--tokens", type=int, default=96, help="phase 2 answer length")
    parser.add_argument("--markdown", action="store_true", help="also print tables")
    parser.add_argument("--skip-private", action="store_true",
                        help="only the E2E phases")
    parser.add_argument("--speed-rounds", type=int, default=5,
                        help="alternating decode runs per model, permuted vs plain")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result: dict[str, object] = {
            "e2e_crypto": crypto_cost(),
            "e2e_latency": e2e_latency(Path(tmp) / "latency", args.requests),
            "e2e_decode": e2e_decode(Path(tmp) / "decode", args.runs, args.tokens)}
    if not args.skip_private:
        import privacy_attack

        result["private"] = privacy_attack.run(args.speed_rounds)
    if args.markdown:
        lat, dec = result["e2e_latency"], result["e2e_decode"]
        print("| E2E | straight | sealed (covey proxy) | added |\n| --- | --- | --- | --- |")
        print(f"| latency p50, 8-token request | {lat['direct_ms_p50']} ms | "  # type: ignore[index]
              f"{lat['sealed_ms_p50']} ms | {lat['added_ms_p50']} ms |")  # type: ignore[index]
        print(f"| decode tokens/s | {dec['direct_tokens_per_s']} | "  # type: ignore[index]
              f"{dec['sealed_tokens_per_s']} | "  # type: ignore[index]
              f"{100 * (dec['sealed_vs_direct'] - 1):+.1f}% |\n")  # type: ignore[index]
        print(f"sealing CPU per request (seal + open the job and 8 deltas): "
              f"{result['e2e_crypto']['us_per_request']} µs\n")  # type: ignore[index]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
