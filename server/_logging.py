"""Log set-up: plain text or one JSON object per line. Tensor contents are never logged."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

__all__ = ["CALL_FIELDS", "configure_logging", "escape", "RateLimitedLog"]

# Fields a call's log record carries (``extra=``), emitted as JSON keys.
CALL_FIELDS = ("request_id", "method", "function", "code", "duration_ms", "peer")


def escape(text: object, limit: int = 128) -> str:
    """A client-supplied string made safe for one log line.

    Printable text of at most ``limit`` characters passes unchanged; anything else (CR,
    LF, ANSI escapes, other control or non-printable characters, or too long) is shown
    as a Python literal of its first ``limit`` characters, so it can never forge a line
    or drive a terminal.
    """
    text = str(text)
    if len(text) <= limit and text.isprintable():
        return text
    cut = text[:limit]
    return repr(cut) + ("..." if len(text) > limit else "")


class RateLimitedLog:
    """Log at most ``per_s`` records a second on average (bursts up to ``burst``); count the rest.

    For lines a caller can cause at will (refused tokens): the log stays bounded, and
    the first record after a quiet spell says how many were suppressed.
    """

    def __init__(self, logger: logging.Logger, per_s: float = 1.0, burst: int = 10) -> None:
        self._log = logger
        self._per_s = per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._suppressed = 0
        self._lock = threading.Lock()

    def log(self, level: int, msg: str, *args: object) -> bool:
        """Log unless over the rate; returns whether it was logged."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._per_s)
            self._last = now
            if self._tokens < 1.0:
                self._suppressed += 1
                return False
            self._tokens -= 1.0
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            msg += f" ({suppressed} similar line(s) suppressed)"
        self._log.log(level, msg, *args)
        return True


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
