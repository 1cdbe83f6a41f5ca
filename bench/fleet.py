"""Many synthetic miners in one process: each its own key and WebSocket, for load tests.

Usage: python bench/fleet.py --coordinator URL --miners 1000 --slots 8 --rate 20
Prints "ready" once every miner's hello was welcomed... approximately: it prints when the
connections are open; the caller polls the coordinator's /v1/models to be sure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from nacl.signing import SigningKey

from covey.miner.agent import MinerAgent
from covey.miner.backends.synthetic import SyntheticBackend


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--miners", type=int, default=10)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--rate", type=float, default=20.0, help="tokens/s per job (0: unthrottled)")
    ap.add_argument("--stream-interval", type=float, default=0.05)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    agents = [MinerAgent(args.coordinator, SigningKey.generate(),
                         SyntheticBackend("synthetic", args.slots, args.rate,
                                          stream_interval=args.stream_interval))
              for _ in range(args.miners)]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = []
    for i, agent in enumerate(agents):  # a gentle ramp, as real miners join over time
        tasks.append(asyncio.create_task(agent.run()))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    print("ready", flush=True)
    await stop.wait()
    for agent in agents:
        agent.stop()
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
