"""Log set-up: plain text or one JSON object per line. Tensor contents are never logged."""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["CALL_FIELDS", "configure_logging"]

# Fields a call's log record carries (``extra=``), emitted as JSON keys.
CALL_FIELDS = ("request_id", "method", "function", "code", "duration_ms", "peer")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the call fields present."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in CALL_FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send logs to stderr as ``text`` or ``json``.

    Raises
    ------
    ValueError
        Unknown level or format.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"--log-format must be text or json, got {fmt!r}")
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)sZ %(levelname)s %(name)s: %(message)s")
    formatter.converter = time.gmtime  # UTC, as the Z says
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
