"""pymmproxy.instancelock: flock-based single instance, across processes and crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymmproxy import instancelock
from pymmproxy.errors import PymmproxyError, UsageError
from pymmproxy.instancelock import InstanceLock, acquire, holder_pid, lock_dirs

ROOT = Path(__file__).resolve().parents[2]


def held(name: str, dirs: list[Path] | None = None) -> InstanceLock:
    lock = acquire(name, dirs=dirs)
    assert lock is not None
    return lock


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pymmproxy.instancelock import acquire
    lock = acquire(sys.argv[1], dirs=[Path(p) for p in sys.argv[2:]])
    print("held" if lock else "busy", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A separate process holding the lock of instance ``vps01-ssh`` in ``tmp_path/run``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, "vps01-ssh", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "held\n"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


def test_lock_held_by_other_process_then_freed_by_sigkill(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    dirs = [tmp_path / "run"]
    assert acquire("vps01-ssh", dirs=dirs) is None
    assert holder_pid("vps01-ssh", dirs=dirs) == holder.pid
    assert (tmp_path / "run" / "vps01-ssh.lock").read_text() == f"{holder.pid}\n"
    other = acquire("vps01-web", dirs=dirs)  # other names are independent
    assert other is not None
    other.release()

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert holder_pid("vps01-ssh", dirs=dirs) is None  # the stale pid in the file is ignored
    with held("vps01-ssh", dirs=dirs) as lock:
        assert lock.held
        assert lock.path.read_text() == f"{os.getpid()}\n"
        assert holder_pid("vps01-ssh", dirs=dirs) == os.getpid()
    assert not lock.held
    assert lock.path.read_text() == ""  # released: pid erased, file kept
    assert holder_pid("vps01-ssh", dirs=dirs) is None


def test_lock_in_another_candidate_dir_counts(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    # We would use "mine" (first usable), but the holder's lock in "run" is live.
    dirs = [tmp_path / "mine", tmp_path / "run"]
    assert acquire("vps01-ssh", dirs=dirs) is None
    assert holder_pid("vps01-ssh", dirs=dirs) == holder.pid
    assert (tmp_path / "mine" / "vps01-ssh.lock").read_text() == ""
    holder.kill()
    holder.wait()
    lock = acquire("vps01-ssh", dirs=dirs)
    assert lock is not None
    assert lock.path == tmp_path / "mine" / "vps01-ssh.lock"
    lock.release()


def test_same_process_cannot_lock_twice(tmp_path: Path) -> None:
    first = acquire("a", dirs=[tmp_path])
    assert first is not None
    assert acquire("a", dirs=[tmp_path]) is None
    first.release()
    first.release()  # idempotent
    second = acquire("a", dirs=[tmp_path])
    assert second is not None
    assert repr(second) == f"InstanceLock('a', '{tmp_path}/a.lock', held)"
    second.release()
    assert repr(second).endswith("released)")


def test_stale_longer_pid_is_overwritten(tmp_path: Path) -> None:
    (tmp_path / "a.lock").write_text("123456789\ngarbage\n")
    with held("a", dirs=[tmp_path]) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"


def test_directory_selection(tmp_path: Path) -> None:
    unusable = tmp_path / "no" / "such" / "parent"
    lock = acquire("a", dirs=[unusable, tmp_path / "new"])
    assert lock is not None
    assert lock.path == tmp_path / "new" / "a.lock"
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o755 & ~_umask()
    lock.release()
    with pytest.raises(PymmproxyError, match="no usable directory for instance locks"):
        acquire("a", dirs=[unusable])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_unsafe_directories_are_skipped(tmp_path: Path) -> None:
    world = tmp_path / "world"
    world.mkdir()
    world.chmod(0o777)
    (tmp_path / "target").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    afile = tmp_path / "afile"
    afile.write_text("")
    lock = acquire("a", dirs=[world, link, afile, tmp_path / "ok"])
    assert lock is not None
    assert lock.path.parent == tmp_path / "ok"
    lock.release()


def test_lock_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PymmproxyError, match=r"cannot open lock file .*a.lock"):
        acquire("a", dirs=[tmp_path])
    assert not (tmp_path / "elsewhere").exists()
    assert holder_pid("a", dirs=[tmp_path]) is None


def test_bad_names() -> None:
    for name in ("", "../x", "a/b", "-a"):
        with pytest.raises(UsageError):
            acquire(name, dirs=[])
        with pytest.raises(UsageError):
            holder_pid(name, dirs=[])


def test_unreadable_pid_reads_as_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instancelock, "_RETRY_DELAY", 0.0)
    with held("a", dirs=[tmp_path]) as lock:
        os.truncate(lock.path, 0)  # as if probed between locking and writing the pid
        assert holder_pid("a", dirs=[tmp_path]) == 0
        lock.path.chmod(0)
        if os.geteuid() != 0:  # root reads anything
            assert holder_pid("a", dirs=[tmp_path]) == 0


def test_read_pid_error_is_zero(tmp_path: Path) -> None:
    assert instancelock._read_pid(tmp_path / "missing") == 0


def test_lock_dirs() -> None:
    uid = os.getuid()
    dirs = lock_dirs({"XDG_RUNTIME_DIR": f"/run/user/{uid}"})
    assert dirs[:2] == [Path("/run/pymmproxy"), Path(f"/run/user/{uid}/pymmproxy")]
    assert dirs[2].name == f"pymmproxy-{uid}"
    assert lock_dirs({"XDG_RUNTIME_DIR": ""}) == [dirs[0], dirs[2]]


def test_default_dirs_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instancelock, "lock_dirs", lambda: [tmp_path / "d"])
    with held("a") as lock:
        assert lock.path == tmp_path / "d" / "a.lock"
        assert holder_pid("a") == os.getpid()


def test_release_frees_the_lock_a_forked_child_shares(tmp_path: Path) -> None:
    """``serve`` with workers: the workers inherit the parent's lock descriptors, so a
    release must unlock, not only close (else the lock lives as long as any worker)."""
    dirs = [tmp_path / "run"]
    lock = held("vps01-web", dirs)
    fd = lock._fd
    assert fd is not None
    child = subprocess.Popen(["sleep", "30"], pass_fds=(fd,))
    try:
        lock.release()
        again = acquire("vps01-web", dirs=dirs)
        assert again is not None, "the child kept the released lock"
        again.release()
    finally:
        child.kill()
        child.wait()
