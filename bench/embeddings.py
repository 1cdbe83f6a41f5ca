"""Embeddings through the network vs sentence-transformers in-process.

Side by side in one run, same sentences, same model (the bundled all-MiniLM-L6-v2) and the
same torch thread count (``--threads``, 1 by default: on 2 cores the other one runs the
coordinator and the client):
  (a) ``SentenceTransformer.encode`` in this process,
  (b) Covey: the ``openai`` client's ``embeddings.create`` → coordinator → miner, all on
      127.0.0.1, billed (API key, escrow hold, settlement) as every request is.
Rounds alternate (a, b, a, b …) so machine noise hits both alike. Batch 64: sentences per
second (median over rounds); batch 1: p50 latency in ms, and what the network adds.
Also prints ``honest_max_distance``: the largest cosine distance between the network's
vectors and in-process ones (the verification bound is 1e-3).

Prints one JSON line. Usage: python bench/embeddings.py [--rounds 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

import network
from covey.miner.models import BUNDLED_EMBEDDING_MODEL, bundled_path


def _sentences(n: int) -> list[str]:
    import pydoc_data.topics as topics

    words = " ".join(topics.topics.values()).split()
    return [" ".join(words[i * 17:i * 17 + 12 + i % 9]) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from openai import OpenAI
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    local = SentenceTransformer(str(bundled_path(BUNDLED_EMBEDDING_MODEL)), device="cpu")
    batch = _sentences(64)
    with tempfile.TemporaryDirectory() as d:
        url, procs = network.start(Path(d), [BUNDLED_EMBEDDING_MODEL],
                                   [BUNDLED_EMBEDDING_MODEL], args.threads)
        try:
            key = httpx.post(f"{url}/v1/accounts", timeout=10).json()["api_key"]
            client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)

            def remote(texts: list[str]) -> np.ndarray:
                r = client.embeddings.create(model=BUNDLED_EMBEDDING_MODEL, input=texts)
                return np.array([d.embedding for d in r.data])

            def timed(fn, texts):  # noqa: ANN001, ANN202
                t = time.perf_counter()
                out = fn(texts)
                return time.perf_counter() - t, out

            remote(batch), local.encode(batch)  # warm both
            rates: dict[str, list[float]] = {"local": [], "network": []}
            lat: dict[str, list[float]] = {"local": [], "network": []}
            worst = 0.0
            for i in range(args.rounds):
                t_local, want = timed(local.encode, batch)
                t_net, got = timed(remote, batch)
                rates["local"].append(len(batch) / t_local)
                rates["network"].append(len(batch) / t_net)
                cos = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(
                    got, axis=1)
                worst = max(worst, float(1 - cos.min()))
                for s in batch[i % 4::4][:8]:
                    lat["local"].append(timed(local.encode, [s])[0])
                    lat["network"].append(timed(remote, [s])[0])
        finally:
            network.stop(procs)
    p50 = {k: statistics.median(v) * 1000 for k, v in lat.items()}
    rate = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({
        "bench": "embeddings", "model": BUNDLED_EMBEDDING_MODEL, "threads": args.threads,
        "cpus": os.cpu_count(), "rounds": args.rounds,
        "batch64_sentences_per_s": {k: round(v, 1) for k, v in rate.items()},
        "batch64_ratio": round(rate["network"] / rate["local"], 3),
        "batch1_p50_ms": {k: round(v, 2) for k, v in p50.items()},
        "batch1_added_p50_ms": round(p50["network"] - p50["local"], 2),
        "honest_max_distance": worst,
        "targets": {"batch64_ratio": ">= 0.9", "batch1_added_p50_ms": "<= 5"},
    }))


if __name__ == "__main__":
    main()
