"""The content hash of a repository: chunk ids and stream digests.

A repository names its hash in ``config.json`` (``"hash"``), chosen once by
``init``: ``blake3`` for repositories created now, ``sha256`` for older ones
or when asked for (``init --hash sha256``).  Both are 256-bit cryptographic
hashes; BLAKE3 hashes 1.5 to 4 times as fast as SHA-256 does even with the
CPU's SHA extensions, and every byte of a snapshot is hashed twice (its
chunk's id and its stream's digest).

A stream digest is written ``"<hash>:<hex>"``; a repository's manifests hold
only digests of its own hash (checked when a manifest is read).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

#: hashes a repository may use, the default first
ALGORITHMS = ("blake3", "sha256")
DEFAULT = "blake3"


def constructor(name: str) -> Callable[..., Any]:
    """``f(data=b"")``: a new hash object (``update``, ``digest``, ``hexdigest``, ``copy``)."""
    if name == "sha256":
        return hashlib.sha256
    if name == "blake3":
        from blake3 import blake3
        return blake3
    raise ValueError(f"unknown hash {name!r} (known: {', '.join(ALGORITHMS)})")


def new(name: str, data: bytes = b"") -> Any:
    return constructor(name)(data)


def digest_string(name: str, h: Any) -> str:
    return f"{name}:{h.hexdigest()}"
