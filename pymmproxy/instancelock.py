"""One running process per instance: a non-blocking ``flock`` on ``NAME.lock``.

The kernel drops a flock when its holder exits, however it dies, so a lock is never stale
after a crash. The file holds the holder's pid for humans; liveness is judged by the lock,
never by the pid. Lock files are never deleted: unlinking a flock file lets a process that
opened the old inode and one that creates a new file both "hold" the lock.

Lock directories, the first usable one wins: ``/run/pymmproxy``,
``$XDG_RUNTIME_DIR/pymmproxy``, ``<tmp>/pymmproxy-UID``. A root daemon and an unprivileged one
would pick different directories, so :func:`acquire` also refuses while any other candidate
directory holds a live lock for the same name, and :func:`holder_pid` looks in all of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from pymmproxy.conffiles import valid_instance_name
from pymmproxy.errors import PymmproxyError, UsageError

RUN_DIR = Path("/run/pymmproxy")
_ATTEMPTS = 5  # a holder_pid() probe holds a shared lock for microseconds: retry past it
_RETRY_DELAY = 0.01
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def lock_dirs(env: Mapping[str, str] = os.environ) -> list[Path]:
    """The candidate lock directories, in order of preference."""
    dirs = [RUN_DIR]
    if env.get("XDG_RUNTIME_DIR"):
        dirs.append(Path(env["XDG_RUNTIME_DIR"]) / "pymmproxy")
    dirs.append(Path(tempfile.gettempdir()) / f"pymmproxy-{os.getuid()}")
    return dirs


def _usable(directory: Path) -> bool:
    """Create ``directory`` (0755) if missing; whether it is a safe, writable place for locks.

    Safe means a real directory (not a symlink) owned by us or root and not world-writable,
    so nobody else can pre-create it in a shared /tmp.
    """
    try:
        directory.mkdir(mode=0o755, exist_ok=True)
        st = directory.lstat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IWOTH:
        return False
    return st.st_uid in (0, os.getuid()) and os.access(directory, os.W_OK)


def _held(path: Path) -> bool:
    """Whether a live process holds the lock on ``path`` (probed with a shared lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's shared lock
    return False


def _read_pid(path: Path) -> int:
    """The pid in a held lock file; 0 if it stays unreadable (the holder writes it just after
    locking, so a few short retries cover that window)."""
    for attempt in range(_ATTEMPTS):
        try:
            first = path.read_text(encoding="ascii", errors="replace").partition("\n")[0]
        except OSError:
            return 0
        if first.isdigit():
            return int(first)
        if attempt + 1 < _ATTEMPTS:
            time.sleep(_RETRY_DELAY)
    return 0


class InstanceLock:
    """A held instance lock; released by :meth:`release`, ``with``, or process exit."""

    __slots__ = ("_fd", "name", "path")

    def __init__(self, name: str, path: Path, fd: int) -> None:
        self.name = name
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent); the pid is erased first, the file stays.

        Unlocked explicitly, not just closed: forked workers share the descriptor's lock,
        and a close alone would leave it held for as long as any of them lives.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> InstanceLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"InstanceLock({self.name!r}, {str(self.path)!r}, {state})"


def _candidates(name: str, dirs: Sequence[Path] | None) -> list[Path]:
    if not valid_instance_name(name):
        raise UsageError(f"bad instance name {name!r}")
    return list(lock_dirs() if dirs is None else dirs)


def acquire(name: str, *, dirs: Sequence[Path] | None = None) -> InstanceLock | None:
    """Lock instance ``name``; None if another live process already runs it.

    ``dirs`` overrides :func:`lock_dirs` (for tests). Raises :class:`PymmproxyError` when no
    candidate directory is usable.
    """
    candidates = _candidates(name, dirs)
    directory = next((d for d in candidates if _usable(d)), None)
    if directory is None:
        tried = ", ".join(map(str, candidates))
        raise PymmproxyError(f"no usable directory for instance locks (tried {tried})")
    path = directory / f"{name}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o644)
    except OSError as e:
        raise PymmproxyError(f"cannot open lock file {path}: {e.strerror}") from None
    for attempt in range(_ATTEMPTS):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt + 1 < _ATTEMPTS:
                time.sleep(_RETRY_DELAY)
    else:
        os.close(fd)
        return None
    lock = InstanceLock(name, path, fd)
    data = f"{os.getpid()}\n".encode()
    os.pwrite(fd, data, 0)  # overwrite, then trim: a stale pid is replaced, never emptied first
    os.ftruncate(fd, len(data))
    if any(_held(d / path.name) for d in candidates if d != directory):
        lock.release()
        return None
    return lock


def require(name: str) -> InstanceLock:
    """:func:`acquire`, or PymmproxyError naming the holder's pid if another process runs
    instance ``name``."""
    lock = acquire(name)
    if lock is None:
        pid = holder_pid(name)
        raise PymmproxyError(f"instance {name} is already running{f' (pid {pid})' if pid else ''}")
    return lock


def holder_pid(name: str, *, dirs: Sequence[Path] | None = None) -> int | None:
    """The pid of the live process holding ``name``'s lock, None if nobody holds it.

    Returns 0 if the lock is held but its pid cannot be read.
    """
    for directory in _candidates(name, dirs):
        path = directory / f"{name}.lock"
        if _held(path):
            return _read_pid(path)
    return None
