"""Logging setup shared by the commands: JSON lines (one object per record) or plain text."""

from __future__ import annotations

import json
import logging
import re
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (Unix seconds), ``level``, ``logger``, ``msg``,
    and the fields of a record logged with ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {"ts": round(record.created, 3), "level": record.levelname,
                                  "logger": record.name, "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


_BEARER = re.compile(r"(?i)\bbearer\s+[^\s'\"]+")
_API_KEY = re.compile(r"sk-covey-[A-Za-z0-9_\-]+")
"""Anything shaped like a Covey API key, wherever it stands (a browser's ``bearer.<key>``
WebSocket subprotocol, a key pasted into the wrong field)."""


def redact_secrets(record: logging.LogRecord) -> bool:
    """Logging filter: replace ``Bearer <key>`` and anything shaped like a Covey API key in
    a record's message by ``[redacted]``. uvicorn logs every WebSocket handshake header at
    debug level (``Authorization``, and the subprotocols a browser sends its key in), and a
    key must never reach a log."""
    message = record.getMessage()
    if _BEARER.search(message) or _API_KEY.search(message):
        message = _API_KEY.sub("sk-covey-[redacted]", message)
        record.msg, record.args = _BEARER.sub("Bearer [redacted]", message), None
    return True


def setup_logging(level: str, fmt: str = "text") -> None:
    """Configure the root logger; ``fmt`` is ``json`` or ``text``.

    Raises:
        ValueError: an unknown level or format.
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json or text, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(redact_secrets)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
