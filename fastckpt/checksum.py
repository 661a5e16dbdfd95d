"""Checksums: xxh3-64 by default (tens of GB/s), SHA-256 for a cryptographic digest.

A shard's checksum is a digest over its header bytes followed by the digests of its
tensors, in file order, so every byte on disk is covered while each byte is hashed
only once.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import xxhash

from .errors import CheckpointError

KINDS = ("xxh3", "sha256")


class Hasher(Protocol):
    def update(self, data, /) -> None: ...  # noqa: E704
    def hexdigest(self) -> str: ...  # noqa: E704


def check_kind(kind: str | None) -> str | None:
    """Validate a ``checksum=`` option (``None`` turns checksums off)."""
    if kind is not None and kind not in KINDS:
        raise CheckpointError(f"unknown checksum {kind!r}; choose one of {KINDS} or None")
    return kind


def new_hasher(kind: str) -> Hasher:
    """A fresh streaming hasher of the given kind."""
    if kind == "xxh3":
        return xxhash.xxh3_64()
    if kind == "sha256":
        return hashlib.sha256()
    raise CheckpointError(f"unknown checksum {kind!r} in manifest")


def digest(kind: str, data) -> str:
    """Hex digest of one buffer."""
    h = new_hasher(kind)
    h.update(data)
    return h.hexdigest()


def shard_digest(kind: str, header: bytes, tensor_digests: list[str]) -> str:
    """The shard checksum: header bytes, then each tensor digest (ASCII hex) in file order."""
    h = new_hasher(kind)
    h.update(header)
    for d in tensor_digests:
        h.update(d.encode("ascii"))
    return h.hexdigest()
