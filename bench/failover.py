"""How long a client's stream pauses when its miner is killed mid-answer.

One coordinator and two miners of the bundled model (1 thread each, every token in its own
frame) on 127.0.0.1. For each case a chat answer is streamed, the serving miner is SIGKILLed
after ``cut`` delivered chunks, and the longest gap between chunks is taken as the pause; a
replacement miner is started before the next case. Greedy answers are also compared with the
uninterrupted one. Prints one JSON line.

Usage: python bench/failover.py [--cuts 10,100] [--max-tokens 200]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from covey.miner.models import BUNDLED_MODEL

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from load import _port, _stop, _wait_http  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def _miner(url: str, data: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "covey", "miner", "--coordinator", url, "--data-dir", str(data),
         "--threads", "1", "--ctx", "1024", "--stream-interval", "0"],
        stdout=subprocess.DEVNULL, stderr=open(data.with_suffix(".log"), "ab"))  # noqa: SIM115


def _live(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/miners", timeout=10).json()["data"]


def _wait_live(url: str, n: int) -> None:
    deadline = time.monotonic() + 60
    while len(_live(url)) != n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"expected {n} miners")
        time.sleep(0.2)


def _case(url: str, headers: dict, body: dict, cut: int, miners: dict[str, subprocess.Popen]
          ) -> tuple[str, float]:
    text: list[str] = []
    gap, last = 0.0, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=headers,
                      json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event)
            now = time.monotonic()
            if last is not None:
                gap = max(gap, now - last)
            last = now
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    text.append(choice["delta"]["content"])
                    if len(text) == cut:
                        busy = next(m["id"] for m in _live(url) if m["active"])
                        miners.pop(busy).send_signal(signal.SIGKILL)
    return "".join(text), gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuts", default="10,100")
    ap.add_argument("--max-tokens", type=int, default=200)
    args = ap.parse_args()
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    cuts = [int(c) for c in args.cuts.split(",")]
    with tempfile.TemporaryDirectory(prefix="covey-failover-") as d:
        tmp = Path(d)
        port = _port()
        url = f"http://127.0.0.1:{port}"
        coord = subprocess.Popen(
            [sys.executable, "-m", "covey", "coordinator", "--port", str(port), "--data-dir",
             str(tmp / "c"), "--log-level", "warning"], stdout=subprocess.DEVNULL,
            stderr=open(tmp / "coordinator.log", "ab"))  # noqa: SIM115
        miners: dict[str, subprocess.Popen] = {}
        procs: list[subprocess.Popen] = []
        try:
            _wait_http(f"{url}/healthz", coord)
            headers = {"Authorization": "Bearer " + httpx.post(f"{url}/v1/accounts").json()[
                "api_key"]}

            def top_up(n: int) -> None:
                while len(miners) < n:
                    before = {m["id"] for m in _live(url)}
                    p = _miner(url, tmp / f"m{len(procs)}")
                    procs.append(p)
                    _wait_live(url, len(before) + 1)
                    (new,) = {m["id"] for m in _live(url)} - before
                    miners[new] = p

            top_up(2)
            greedy = {"model": BUNDLED_MODEL, "max_tokens": args.max_tokens, "temperature": 0,
                      "messages": [{"role": "user", "content": PROMPT}]}
            reference = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=greedy,
                                   timeout=120).json()["choices"][0]["message"]["content"]
            out: dict[str, object] = {"max_tokens": args.max_tokens}
            for kind, body in (("greedy", greedy),
                               ("sampled", {**greedy, "temperature": 0.8, "seed": 1})):
                for cut in cuts:
                    top_up(2)
                    text, gap = _case(url, headers, body, cut, miners)
                    out[f"{kind}_pause_s_after_{cut}"] = round(gap, 2)
                    if kind == "greedy":
                        out[f"greedy_identical_after_{cut}"] = text == reference
        finally:
            for p in procs:
                _stop(p)
            _stop(coord)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
