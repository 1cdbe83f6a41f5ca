"""``covey coordinator --record-traffic FILE``: write every byte of every request body and
WebSocket message the coordinator receives or sends to a file, for audits.

With it, anyone can check what a coordinator was given, not only what it chose to keep:
a plain request's words are in the file (the prompt in the request body, the answer in the
miner's ``delta`` frames), a sealed request's are not (``covey audit`` searches the file).
It is an audit aid for test networks: the file holds every plain prompt and answer.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any


class TrafficRecorder:
    """ASGI middleware appending one line per message to ``path``: seconds since the epoch,
    direction (``>`` received, ``<`` sent), the path, and the body as text (UTF-8, bad
    bytes replaced). HTTP response bodies are recorded too, streamed ones chunk by chunk."""

    def __init__(self, app: Any, path: Path) -> None:
        self.app = app
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8", errors="replace", buffering=1)
        self._lock = threading.Lock()

    def _write(self, direction: str, where: str, data: bytes | str | None) -> None:
        if not data:
            return
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        with self._lock:
            self._file.write(f"{time.time():.3f} {direction} {where} {text}\n")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        where = scope.get("path", "")

        async def recorded_receive() -> dict[str, Any]:
            message = await receive()
            self._write(">", where, message.get("body") or message.get("text")
                        or message.get("bytes"))
            return message

        async def recorded_send(message: dict[str, Any]) -> None:
            self._write("<", where, message.get("body") or message.get("text")
                        or message.get("bytes"))
            await send(message)

        await self.app(scope, recorded_receive, recorded_send)
