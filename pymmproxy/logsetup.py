"""structlog configuration (done once, by the CLI) and a rate limiter for noisy error lines.

Verbosity follows go-mmproxy's ``-v``:

* ``0`` — lifecycle lines and connection errors, the latter at most ``burst`` per second
  (a flood of garbage cannot turn into a flood of log lines); a ``log.suppressed`` line
  reports how many were dropped.
* ``1`` — every connection error.
* ``2`` — additionally one ``conn.closed`` line per TCP connection and one ``udp.flow`` line
  per new UDP flow.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Literal

import structlog

LogFormat = Literal["json", "console", "auto"]


class LineLogger(structlog.WriteLogger):
    """structlog's ``WriteLogger`` (one ``write()`` per line: forked workers share stderr,
    and two lines must never merge) that drops a line it cannot write: a closed or broken
    stderr (EPIPE, EIO) must not stop a signal's handling or a connection."""

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().msg(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def configure(verbosity: int = 0, log_format: LogFormat = "auto") -> None:
    """Configure structlog for the whole process; JSON unless stderr is a TTY."""
    if log_format == "auto":
        log_format = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    level = logging.DEBUG if verbosity >= 2 else logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_args: LineLogger(sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(**bind: Any) -> structlog.typing.FilteringBoundLogger:  # noqa: ANN401
    """A logger with ``bind`` fields on every line."""
    return structlog.get_logger().bind(**bind)  # type: ignore[no-any-return]


class RateLimiter:
    """Token bucket: ``allow()`` is true at most ``burst`` times per ``period`` seconds."""

    __slots__ = ("_burst", "_period", "_tokens", "_stamp", "suppressed")

    def __init__(self, burst: int = 20, period: float = 1.0) -> None:
        self._burst = burst
        self._period = period
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        refill = (now - self._stamp) * self._burst / self._period
        self._stamp = now
        self._tokens = min(float(self._burst), self._tokens + refill)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        """Return and reset the count of suppressed events."""
        count, self.suppressed = self.suppressed, 0
        return count
