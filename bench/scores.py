"""Scoring through the network: plain vs encrypted (TenSEAL CKKS) vs proved (ezkl).

One coordinator and one miner on 127.0.0.1 serve the bundled breast-cancer models (trained
here into a temporary home): ``breast-cancer-lr`` for plain and encrypted rows,
``breast-cancer-mlp`` for proved ones. Per request, over ``--rounds`` requests of one row
each (rows of the data set in turn), side by side in one run:

- latency p50 (client → coordinator → miner → back, billed), in ms;
- the miner's CPU seconds per request (user + system time of its process and of the child
  process it proves in);
- bytes on the wire: the request body and the answer body as the client sent and got them
  (the coordinator forwards the same payloads to the miner);
- for encrypted rows also the one-time key registration (bytes, ms) and the first request,
  which hands the keys to the miner; for proofs the proving time (the answer's ``work_ms``),
  the offline verification time (:func:`covey.scoring.proofs.verify_answer`) and the proof's
  size, and the proof setup's time.

Targets (issue "Decisions on sensitive data"): encrypted ≤ 100 ms p50 on loopback; proof of
the MLP ≤ 10 s, verification ≤ 50 ms, proof ≤ 16 KB.

Prints one JSON line. Usage: python bench/scores.py [--rounds 30] [--proofs 5]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

import network

LR, MLP = "breast-cancer-lr", "breast-cancer-mlp"


def _p50(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def _cpu(process: psutil.Process) -> float:
    """CPU seconds of ``process`` and its live children (the miner proves in a child)."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--proofs", type=int, default=5)
    args = parser.parse_args()

    from sklearn.datasets import load_breast_cancer

    from covey.scoring.bundled import materialize
    from covey.scoring.he import ClientKeys
    from covey.scoring.proofs import prove_setup, verify_answer

    rows = load_breast_cancer().data.tolist()
    out: dict[str, Any] = {"bench": "scores", "rounds": args.rounds, "proofs": args.proofs}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["COVEY_SCORING_HOME"] = str(tmp / "home")
        materialize(LR)
        mlp = materialize(MLP)
        t0 = time.perf_counter()
        prove_setup(mlp / "model.onnx", mlp / "proof")
        out["proof_setup_s"] = round(time.perf_counter() - t0, 1)
        url, procs = network.start(tmp, [LR, MLP], [LR, MLP], 1,
                                   ["--proof-setup", f"{MLP}={mlp / 'proof'}"])
        miner = psutil.Process(procs[0].pid)
        try:
            key = httpx.post(f"{url}/v1/accounts", timeout=10).json()["api_key"]
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=url, headers=headers, timeout=300) as http:

                def run(bodies: list[dict[str, Any]]) -> dict[str, Any]:
                    """Latency, miner CPU and wire bytes of ``bodies``, one at a time."""
                    times, sent, got, answers = [], [], [], []
                    cpu = _cpu(miner)
                    for body in bodies:
                        content = json.dumps(body).encode()
                        t = time.perf_counter()
                        r = http.post("/v1/scores", content=content,
                                      headers={"Content-Type": "application/json"})
                        times.append((time.perf_counter() - t) * 1000)
                        r.raise_for_status()
                        sent.append(len(content))
                        got.append(len(r.content))
                        answers.append(r.json())
                    used = _cpu(miner) - cpu
                    return {"p50_ms": _p50(times), "miner_cpu_s": round(used / len(bodies), 4),
                            "request_bytes": int(statistics.median(sent)),
                            "answer_bytes": int(statistics.median(got)), "answers": answers}

                n = args.rounds
                run([{"model": LR, "inputs": [rows[0]]}])  # warm up
                plain = run([{"model": LR, "inputs": [rows[i % len(rows)]]} for i in range(n)])
                plain.pop("answers")
                out["plain"] = plain

                keys = ClientKeys.generate()
                t = time.perf_counter()
                sha = http.post("/v1/scores/keys", content=keys.public, headers={
                    "Content-Type": "application/octet-stream"}).json()["keys_sha256"]
                register_ms = (time.perf_counter() - t) * 1000

                def sealed(i: int) -> dict[str, Any]:
                    ct = base64.b64encode(keys.encrypt(rows[i % len(rows)])).decode()
                    return {"model": LR, "encrypted": {"ciphertext": ct, "keys_sha256": sha}}

                first = run([sealed(0)])
                encrypted = run([sealed(i) for i in range(1, n + 1)])
                answers = encrypted.pop("answers")
                t = time.perf_counter()
                for answer in answers[:10]:
                    keys.decrypt(base64.b64decode(answer["data"][0]["encrypted"]))
                encrypted["client_decrypt_ms"] = round((time.perf_counter() - t) * 100, 2)
                encrypted.update(keys_bytes=len(keys.public),
                                 register_keys_ms=round(register_ms, 1),
                                 first_request_ms=first["p50_ms"],
                                 first_request_miner_cpu_s=first["miner_cpu_s"])
                out["encrypted"] = encrypted

                proved = run([{"model": MLP, "inputs": [rows[i]], "proof": True}
                              for i in range(args.proofs)])
                answers = proved.pop("answers")
                verify_ms = []
                for answer in answers:
                    t = time.perf_counter()
                    verify_answer(answer, mlp / "proof" / "vk.key")
                    verify_ms.append((time.perf_counter() - t) * 1000)
                proved.update(
                    prove_ms_p50=_p50([a["usage"]["work_ms"] for a in answers]),
                    verify_ms_p50=_p50(verify_ms),
                    proof_bytes=int(statistics.median(len(a["data"][0]["proof"])
                                                      for a in answers)))
                out["proved"] = proved
        finally:
            network.stop(procs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
