"""What the parent of forked workers loaded at a SIGHUP, handed to every worker as is.

Without it each worker would read the config files again at its own moment: a file edited
between the parent's check and the workers' reads (or fixed after the parent refused it)
would have workers run different configs, or instances the parent never locked. The parent
loads once, checks, :meth:`Handoff.publish`-es the result, then signals the workers; each
worker :meth:`Handoff.take`-s exactly that.

The channel is a ``memfd`` made before the first fork, so every worker (also one forked
again later) shares it. A generation counter in front of the pickled value is odd while the
parent writes, as in a seqlock: a reader that sees an odd or changed counter reads again.
Only the parent and its own children can reach the descriptor, so unpickling trusts it.
"""

from __future__ import annotations

import os
import pickle
import struct
import time
from typing import Any

from pymmproxy.errors import PymmproxyError

_HEAD = struct.Struct("=QQ")  # generation (odd: being written), length of the pickle
_ATTEMPTS = 1000  # x 1 ms: the parent writes a few KB in microseconds


class Handoff:
    """One value at a time from the parent to its workers (see the module docstring)."""

    __slots__ = ("fd", "generation")

    def __init__(self) -> None:
        self.fd = os.memfd_create("pymmproxy-reload", os.MFD_CLOEXEC)
        self.generation = 0
        os.pwrite(self.fd, _HEAD.pack(0, 0), 0)

    def publish(self, value: object) -> None:
        """Replace the value (parent only). OSError (out of memory, say) leaves the header
        odd, so readers wait and then fail, until a later publish succeeds."""
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        writing = self.generation + 1  # odd: a reader now waits (the same odd number again
        os.pwrite(self.fd, _HEAD.pack(writing, 0), 0)  # after a publish that failed)
        os.ftruncate(self.fd, _HEAD.size + len(data))
        os.pwrite(self.fd, data, _HEAD.size)
        os.pwrite(self.fd, _HEAD.pack(writing + 1, len(data)), 0)
        self.generation = writing + 1

    def take(self) -> Any:  # noqa: ANN401 - what publish() was given
        """The value last published, None if none was yet (a SIGHUP sent to a worker
        directly); PymmproxyError if it never held still."""
        for _ in range(_ATTEMPTS):
            generation, length = _HEAD.unpack(os.pread(self.fd, _HEAD.size, 0))
            if generation == 0:
                return None
            if not generation % 2:
                data = os.pread(self.fd, length, _HEAD.size)
                if _HEAD.unpack(os.pread(self.fd, _HEAD.size, 0))[0] == generation:
                    return pickle.loads(data)  # noqa: S301 - our parent's bytes, see above
            time.sleep(0.001)
        raise PymmproxyError("reload: the parent's config kept changing; try again")

    def close(self) -> None:
        os.close(self.fd)
