"""Overhead of the network path vs llama.cpp in-process and llama-cpp-python's own server.

Side by side in one run, same prompts, greedy, same settings (no top-k, no min-p, no repeat
penalty, ``logits_all`` off, one slot with all CPU threads):
  (a) llama-cpp-python in-process (``Llama.create_completion(stream=True)``),
  (b) ``python -m llama_cpp.server`` over HTTP streaming,
  (c) Covey: client → coordinator → miner, all on 127.0.0.1, billed (API key, escrow hold
      before dispatch, settlement after the last token) as every request is.
(b) and (c) are read by the same lean SSE client (httpx + json), so the client's own parsing
cost, which is not the servers', stays small on this shared 2-core CPU.
Rounds are interleaved (a, b, c, a, b, c …) so machine noise hits all three alike.
Prints one JSON line: decode tokens/s (p50) and TTFT in ms (p50, p95) per path, and ratios.

Usage: python bench/overhead.py [--rounds 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from covey.miner.models import BUNDLED_MODEL, bundled_path

PROMPTS = [
    "The history of the printing press begins",
    "Here is a recipe for a simple tomato soup:",
    "The three laws of motion, explained simply:",
    "A short story about a lighthouse keeper:",
    "Ten tips for learning a new language:",
]
N_CTX = 2048


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, ok: Callable[[httpx.Response], bool], proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if ok(httpx.get(url, timeout=2)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def _measure(chunks: Iterator[str | int], t0: float) -> tuple[float, float, int]:
    """(TTFT s, decode tokens/s, tokens) from a stream of text pieces.

    A stream may end with an int, the completion tokens from its usage chunk (a server may
    put several tokens in one chunk); otherwise each piece counts as one token. Decode
    tokens/s counts the tokens after the first over the time from first to last piece.
    """
    times: list[float] = []
    tokens = 0
    for piece in chunks:
        if isinstance(piece, int):
            tokens = piece
        elif piece:
            times.append(time.perf_counter())
    tokens = tokens or len(times)
    if len(times) < 2:
        raise RuntimeError("the model stopped after one token; pick another prompt")
    return times[0] - t0, (tokens - 1) / (times[-1] - times[0]), tokens


def _sse_texts(lines: Iterator[str]) -> Iterator[str | int]:
    """Text of each completion chunk of an SSE stream, then the usage's completion tokens if
    the server sent them (the same lean parser for both servers, so neither pays for a
    heavier client on this shared CPU)."""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                yield chunk["choices"][0]["text"]
            if chunk.get("usage"):
                yield chunk["usage"]["completion_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import llama_cpp

    model_path = bundled_path(BUNDLED_MODEL)
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="covey-bench-"))
    logs = (tmp / "children.log").open("wb")

    def spawn(cmd: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdout=logs, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=N_CTX, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
        server_port, covey_port = _port(), _port()
        server = spawn([sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
                        "--n_ctx", str(N_CTX), "--n_threads", str(args.threads),
                        "--n_threads_batch", str(args.threads), "--logits_all", "False",
                        "--host", "127.0.0.1", "--port", str(server_port)])
        coord = spawn([sys.executable, "-m", "covey", "coordinator", "--port", str(covey_port),
                       "--data-dir", str(tmp / "c"), "--log-level", "warning"])
        _wait(f"http://127.0.0.1:{covey_port}/healthz", lambda r: r.status_code == 200, coord)
        spawn([sys.executable, "-m", "covey", "miner", "--coordinator",
               f"http://127.0.0.1:{covey_port}", "--ctx", str(N_CTX), "--threads",
               str(args.threads), "--data-dir", str(tmp / "m"), "--log-level", "warning"])
        _wait(f"http://127.0.0.1:{covey_port}/v1/models",
              lambda r: any(m["miners"] for m in r.json()["data"]), coord)
        _wait(f"http://127.0.0.1:{server_port}/v1/models", lambda r: r.status_code == 200,
              server)

        http = httpx.Client(timeout=120)
        covey_key = http.post(f"http://127.0.0.1:{covey_port}/v1/accounts").json()["api_key"]
        greedy = {"max_tokens": args.max_tokens, "temperature": 0.0}

        def inprocess(prompt: str) -> tuple[float, float, int]:
            t0 = time.perf_counter()
            stream = llm.create_completion(prompt, stream=True, top_k=0, top_p=1.0, min_p=0.0,
                                           repeat_penalty=1.0, **greedy)
            return _measure((c["choices"][0]["text"] for c in stream), t0)

        def via(port: int, extra: dict, key: str = "unused"
                ) -> Callable[[str], tuple[float, float, int]]:
            url = f"http://127.0.0.1:{port}/v1/completions"
            headers = {"Authorization": f"Bearer {key}"}

            def run(prompt: str) -> tuple[float, float, int]:
                body = {"model": BUNDLED_MODEL, "prompt": prompt, "stream": True, **greedy,
                        "stream_options": {"include_usage": True}, **extra}
                t0 = time.perf_counter()
                with http.stream("POST", url, json=body, headers=headers) as resp:
                    resp.raise_for_status()
                    return _measure(_sse_texts(resp.iter_lines()), t0)
            return run

        paths = {
            "inprocess": inprocess,
            "llama_cpp_server": via(server_port, {"top_k": 0, "min_p": 0.0,
                                                  "repeat_penalty": 1.0}),
            "covey": via(covey_port, {}, covey_key),
        }
        for run in paths.values():  # warm-up: page cache, first-request paths
            run(PROMPTS[0])
        samples: dict[str, list[tuple[float, float, int]]] = {k: [] for k in paths}
        for _ in range(args.rounds):
            for prompt in PROMPTS:
                for name, run in paths.items():
                    samples[name].append(run(prompt))

        def summary(rows: list[tuple[float, float, int]]) -> dict[str, float]:
            ttft = sorted(r[0] * 1000 for r in rows)
            return {
                "decode_tps_p50": round(statistics.median(r[1] for r in rows), 1),
                "ttft_ms_p50": round(statistics.median(ttft), 1),
                "ttft_ms_p95": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 1),
                "tokens_mean": round(statistics.mean(r[2] for r in rows), 1),
            }

        result = {name: summary(rows) for name, rows in samples.items()}
        base = result["inprocess"]
        out = {
            "bench": "overhead",
            "model": BUNDLED_MODEL,
            "settings": {"max_tokens": args.max_tokens, "temperature": 0, "top_k": 0,
                         "min_p": 0, "repeat_penalty": 1.0, "n_ctx": N_CTX,
                         "threads": args.threads, "logits_all": False,
                         "requests_per_path": len(samples["covey"])},
            **result,
            "ratios": {
                "covey_decode_vs_inprocess": round(
                    result["covey"]["decode_tps_p50"] / base["decode_tps_p50"], 3),
                "server_decode_vs_inprocess": round(
                    result["llama_cpp_server"]["decode_tps_p50"] / base["decode_tps_p50"], 3),
                "covey_added_ttft_ms_p50": round(
                    result["covey"]["ttft_ms_p50"] - base["ttft_ms_p50"], 1),
                "server_added_ttft_ms_p50": round(
                    result["llama_cpp_server"]["ttft_ms_p50"] - base["ttft_ms_p50"], 1),
            },
        }
        print(json.dumps(out))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()


if __name__ == "__main__":
    main()
