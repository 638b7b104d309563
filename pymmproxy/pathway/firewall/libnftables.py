"""A minimal typed ctypes binding of ``libnftables.so.1`` (Debian: ``libnftables1``).

Only the JSON command interface is used: one ``{"nftables": [...]}`` document per call,
which libnftables applies as a single atomic netlink batch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
from functools import cache
from types import TracebackType
from typing import Any

from pymmproxy.errors import PathwayError

SONAME = "libnftables.so.1"
NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_HANDLE = 1 << 3
NFT_CTX_OUTPUT_JSON = 1 << 4
_DENIED_TEXT = os.strerror(errno.EPERM)  # only EPERM is a missing CAP_NET_ADMIN
_ABSENT_TEXT = os.strerror(errno.ENOENT)


class NftError(PathwayError):
    """libnftables rejected a command; ``text`` is its error output, first line only."""

    def __init__(self, text: str) -> None:
        self.text = text.strip().splitlines()[0] if text.strip() else "unknown error"
        super().__init__(f"nftables: {self.text}")

    @property
    def absent(self) -> bool:
        """The object named by the command does not exist."""
        return _ABSENT_TEXT in self.text


@cache
def _load() -> ctypes.CDLL | None:
    for name in (SONAME, ctypes.util.find_library("nftables")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        _declare(lib)
        return lib
    return None


def _declare(lib: ctypes.CDLL) -> None:
    ptr, cstr = ctypes.c_void_p, ctypes.c_char_p
    signatures: dict[str, tuple[list[Any], Any]] = {
        "nft_ctx_new": ([ctypes.c_uint32], ptr),
        "nft_ctx_free": ([ptr], None),
        "nft_ctx_buffer_output": ([ptr], ctypes.c_int),
        "nft_ctx_buffer_error": ([ptr], ctypes.c_int),
        "nft_ctx_get_output_buffer": ([ptr], cstr),
        "nft_ctx_get_error_buffer": ([ptr], cstr),
        "nft_ctx_output_get_flags": ([ptr], ctypes.c_uint),
        "nft_ctx_output_set_flags": ([ptr, ctypes.c_uint], None),
        "nft_run_cmd_from_buffer": ([ptr, cstr], ctypes.c_int),
    }
    for fname, (argtypes, restype) in signatures.items():
        func = getattr(lib, fname)
        func.argtypes = argtypes
        func.restype = restype


def libnftables_available() -> bool:
    """Whether ``libnftables.so.1`` can be loaded."""
    return _load() is not None


class Nftables:
    """One libnftables context with JSON in and out (use as a context manager)."""

    def __init__(self) -> None:
        lib = _load()
        if lib is None:
            raise PathwayError(
                f"{SONAME} not found (install libnftables1, or use --backend legacy)"
            )
        self._lib = lib
        self._ctx: int | None = lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not self._ctx:
            raise PathwayError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        flags = lib.nft_ctx_output_get_flags(self._ctx)
        lib.nft_ctx_output_set_flags(self._ctx, flags | NFT_CTX_OUTPUT_JSON | NFT_CTX_OUTPUT_HANDLE)

    def __enter__(self) -> Nftables:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run ``{"nftables": commands}`` atomically; returns the output's ``nftables`` list.

        Raises :class:`PermissionError` without CAP_NET_ADMIN, :class:`NftError` otherwise.
        """
        if not self._ctx:
            raise PathwayError("libnftables context is closed")
        document = json.dumps({"nftables": commands}).encode()
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, document)
        out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
        err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            if _DENIED_TEXT in err:
                raise PermissionError(errno.EPERM, err.strip())
            raise NftError(err)
        if not out.strip():
            return []
        parsed = json.loads(out)
        items = parsed.get("nftables", []) if isinstance(parsed, dict) else []
        return [item for item in items if isinstance(item, dict)]
