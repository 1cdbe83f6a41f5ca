"""Images through the network vs the same diffusers pipeline in-process.

Side by side in one run, the same tiny Stable Diffusion pipeline (built here from
configuration: the real diffusers classes, small and randomly initialised, as the tests use;
no text-to-image weights ship in any package here) and the same torch thread count
(``--threads``, 1 by default: on 2 cores the other one runs the coordinator and client):
  (a) :class:`~covey.miner.backends.diffusers.DiffusersBackend` in this process,
  (b) Covey: the ``openai`` client's ``images.generate`` → coordinator → miner on
      127.0.0.1, billed as every request is.
Rounds alternate (a, b, a, b …). Images per second (median over rounds) and the ratio
network ÷ in-process (target ≥ 0.95); what this measures is the coordinator's share, since
the tiny pipeline's images take a fraction of a second.

Also prints the pHash distances the image check relies on: between honest runs of one
seed (in-process vs network, 1 vs 2 threads) and between different seeds, and the
re-check cost at a 5 % check rate (one regeneration per checked request).

Prints one JSON line. Usage: python bench/images.py [--rounds 10] [--steps 20] [--size 64]
(the tiny pipeline announces 32, 64 and 128).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

import network

CHECK_RATE = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args()

    from openai import OpenAI

    from covey.coordinator.verify.media import phash_distance
    from covey.miner.backends.diffusers import DiffusersBackend, ImageConfig, build_tiny_pipeline
    from covey.miner.models import weights_sha256
    from covey.protocol import Paint

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_pipeline(Path(tmp) / "tiny-sd")
        local = DiffusersBackend(model.name, model, weights_sha256(model), 1,
                                 ImageConfig(threads=args.threads))

        def paint(seed: int) -> str:
            task = Paint(job_id=f"b{seed}", model=model.name, prompt="a lighthouse at dawn",
                         width=args.size, height=args.size, seed=seed, steps=args.steps)
            return asyncio.run(local.paint(task)).images[0]

        url, procs = network.start(Path(tmp), [str(model)], [model.name], args.threads)
        try:
            key = httpx.post(f"{url}/v1/accounts", timeout=10).json()["api_key"]
            client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)

            def net_paint(seed: int) -> str:
                return client.images.generate(
                    model=model.name, prompt="a lighthouse at dawn",
                    size=f"{args.size}x{args.size}",  # type: ignore[arg-type]
                    extra_body={"seed": seed, "steps": args.steps}).data[0].b64_json or ""

            paint(0), net_paint(0)  # warm up
            rate: dict[str, list[float]] = {"local": [], "network": []}
            honest: list[int] = []
            for r in range(args.rounds):
                t0 = time.perf_counter()
                a = paint(r)
                t1 = time.perf_counter()
                b = net_paint(r)
                t2 = time.perf_counter()
                rate["local"].append(1 / (t1 - t0))
                rate["network"].append(1 / (t2 - t1))
                honest.append(phash_distance(a, b))
            other_seed = [phash_distance(paint(s), paint(s + 1000)) for s in range(4)]
        finally:
            network.stop(procs)
            local.close()

    med = {k: statistics.median(v) for k, v in rate.items()}
    print(json.dumps({
        "bench": "images", "rounds": args.rounds, "steps": args.steps,
        "size": f"{args.size}x{args.size}", "threads": args.threads,
        "images_per_s_local": round(med["local"], 2),
        "images_per_s_network": round(med["network"], 2),
        "ratio": round(med["network"] / med["local"], 3),
        "honest_phash_max_bits": max(honest), "other_seed_phash_min_bits": min(other_seed),
        "recheck_share": CHECK_RATE,
    }))


if __name__ == "__main__":
    main()
