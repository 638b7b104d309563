"""Suite-wide fixtures."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymmproxy import instancelock


def _lock_files() -> set[Path]:
    found: set[Path] = set()
    for directory in instancelock.lock_dirs():
        with contextlib.suppress(OSError):
            found.update(directory.glob("*.lock"))
    return found


@pytest.fixture(autouse=True, scope="session")
def _remove_our_lock_files() -> Iterator[None]:
    """Instance lock files are never deleted by design (see ``pymmproxy.instancelock``); the
    ones this run created are removed at its end, each only while nobody holds it."""
    before = _lock_files()
    yield
    for path in sorted(_lock_files() - before):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a live process owns it
            path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(fd)
