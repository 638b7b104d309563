"""sd_notify(3) without libsystemd: tell the service manager about readiness and state.

The protocol is one ``AF_UNIX``/``SOCK_DGRAM`` datagram of newline-separated ``KEY=VALUE``
assignments sent to the socket named by ``$NOTIFY_SOCKET`` (a filesystem path, or an
abstract-namespace name written with a leading ``@``).  Without ``$NOTIFY_SOCKET`` (not run
by systemd, or not ``Type=notify``) every call is a no-op.

Like ``sd_notify(unset_environment=1)`` the variables are removed from ``os.environ`` once
read, so helper processes we spawn do not inherit them and talk to systemd in our name.
Nothing here raises into the caller or logs: each call returns whether a datagram was sent.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import MutableMapping

__all__ = ["Notifier"]

#: How long one send may block if the manager's receive queue is full (it never is in
#: practice; systemd itself blocks without a limit).  Keeps an event loop from stalling.
SEND_TIMEOUT = 1.0

_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _socket_address(value: str) -> bytes | None:
    """``/path`` or ``@abstract`` -> sockaddr bytes; anything else (vsock:, relative) -> None."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None


class Notifier:
    """A handle on the service manager's notification socket (inert when there is none)."""

    def __init__(
        self,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = True,
        timeout: float = SEND_TIMEOUT,
    ) -> None:
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        self._watchdog_usec = self._read_watchdog(env)
        self._timeout = timeout
        if unset_environment:
            for name in _ENV_VARS:
                env.pop(name, None)

    @staticmethod
    def _read_watchdog(env: MutableMapping[str, str]) -> int | None:
        """``sd_watchdog_enabled()``: WATCHDOG_USEC, if WATCHDOG_PID is absent or is us."""
        usec_text = env.get("WATCHDOG_USEC", "")
        pid_text = env.get("WATCHDOG_PID", "")
        if not usec_text.isdigit() or int(usec_text) == 0:
            return None
        if pid_text and (not pid_text.isdigit() or int(pid_text) != os.getpid()):
            return None
        return int(usec_text)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to talk to (we run under ``Type=notify``)."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """``WatchdogSec=`` in seconds when the watchdog is armed for us; ping at half of it."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 1_000_000

    # -- the messages --------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) finished: ``READY=1``."""
        return self.notify("READY=1", *self._status_field(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload began: ``RELOADING=1`` + ``MONOTONIC_USEC``; send ``ready()`` when done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status_field(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began: ``STOPPING=1``."""
        return self.notify("STOPPING=1", *self._status_field(status))

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self.notify(*self._status_field(text))

    def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec=``: ``WATCHDOG=1``."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time in the current start/stop phase (e.g. a long drain)."""
        if not math.isfinite(seconds):
            return False
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def notify(self, *fields: str) -> bool:
        """Send raw ``KEY=VALUE`` fields as one datagram; False if disabled or it failed."""
        if self._address is None or not fields:
            return False
        try:
            payload = "\n".join(fields).encode()
            # a fresh socket per message, as sd_notify() does: messages are rare, and nothing
            # is left open to leak, to inherit across fork/exec, or to close on shutdown
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(self._timeout)
                sent = sock.sendto(payload, self._address)
        except (OSError, ValueError):  # no listener, queue full, path too long, bad text
            return False
        return sent == len(payload)

    @staticmethod
    def _status_field(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        # one assignment per line: a newline inside the value would start a new field
        return ("STATUS=" + " ".join(text.splitlines()),)
