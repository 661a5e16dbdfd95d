"""The catalog of a manager's root: which committed checkpoints it holds, and what
each one says about itself.

The checkpoints are the source of truth: every scan lists the root and stats each
manifest. ``fastckpt-index.json`` only caches what was read from manifests, keyed
by the manifest's (inode, mtime, size), so an entry that is missing, stale or
damaged is simply read again from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any

from . import checksum as ck
from . import commit
from . import manifest as mf
from .errors import CheckpointError, CheckpointNotFoundError
from .tree import flatten, unflatten

log = logging.getLogger("fastckpt")

INDEX_NAME = "fastckpt-index.json"
_INDEX_FORMAT = "fastckpt-index"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Hidden siblings of a step directory left by a save (or removal) that crashed.
_LEFTOVER = re.compile(
    rf"^\.(step_\d+)(?:{re.escape(commit.TMP_TAG)}|{re.escape(commit.OLD_TAG)})"
)


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint of a :class:`~fastckpt.CheckpointManager`.

    ``step`` is None only for a checkpoint saved without one, outside a manager.
    ``time`` is when ``save()`` was called (seconds since the epoch); ``size`` the
    bytes on disk; ``checksum`` a digest over the shard checksums (None when saved
    without checksums) that identifies the stored tensors.
    """

    step: int | None
    path: str
    time: float
    metrics: dict[str, Any]
    tags: tuple[str, ...]
    description: str
    size: int
    checksum: str | None
    is_best: bool = False
    is_latest: bool = False


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def filed_step(name: str) -> int | None:
    """The step a manager files the directory ``name`` under, or None when it is not
    a manager's step directory. Only the canonical name counts, so that no two
    directories claim a step; the name wins over any step in the metadata."""
    m = _STEP_DIR.match(name)
    if not m or step_name(int(m.group(1))) != name:
        return None
    return int(m.group(1))


def read_info(path: str, step: int | None = None) -> CheckpointInfo:
    """Describe the committed checkpoint at ``path`` from its manifest.

    ``step`` is the step it is filed under (by default the one in its metadata).
    Checkpoints saved without a manager still describe themselves: metrics, tags and
    description are then empty and the time is the commit time, which also stands
    in for a ``time`` in the metadata that is not a finite number of seconds.
    """
    m = mf.read(path)
    md = m.metadata
    if step is None:
        step = md.get("step") if type(md.get("step")) is int else None
    manifest_size = os.path.getsize(os.path.join(path, mf.MANIFEST_NAME))
    digests = [s.checksum for s in m.shards]
    checksum = ck.digest(m.checksum, "".join(digests).encode()) if m.checksum else None
    metrics = md.get("metrics")
    tags = md.get("tags")
    return CheckpointInfo(
        step=step,
        path=path,
        time=_seconds(md.get("time"), _seconds(m.raw.get("created"), 0.0)),
        metrics=dict(metrics) if isinstance(metrics, dict) else {},
        tags=tuple(t for t in tags if isinstance(t, str)) if isinstance(tags, list) else (),
        description=str(md.get("description", "")),
        size=sum(s.size for s in m.shards) + manifest_size,
        checksum=checksum,
    )


def _seconds(t: Any, default: float) -> float:
    """``t`` as seconds since the epoch, or ``default`` when it is not a finite real
    number (user metadata may hold anything under "time")."""
    if isinstance(t, bool) or not isinstance(t, Real):
        return default
    try:
        t = float(t)
    except OverflowError:  # an int beyond any float
        return default
    return t if math.isfinite(t) else default


def _stamp(manifest: str) -> list[int] | None:
    try:
        st = os.stat(manifest)
    except OSError:
        return None
    return [st.st_ino, st.st_mtime_ns, st.st_size]


class Catalog:
    """Committed checkpoints under ``root`` (``root/step_<n>/``), by step.

    ``write_index=False`` for a reader that shares the root with the one process
    that maintains it (the other ranks of a group): it never writes the index.
    """

    def __init__(self, root: str, write_index: bool = True) -> None:
        self.root = root
        self.index_path = os.path.join(root, INDEX_NAME)
        self.write_index = write_index
        self._cache: dict[str, tuple[list[int], CheckpointInfo]] = self._read_index()

    def path(self, step: int) -> str:
        return os.path.join(self.root, step_name(step))

    def clean(self) -> None:
        """Undo or remove what crashed saves (of any dead process) left behind."""
        names = set()
        for entry in self._listdir():
            if _STEP_DIR.match(entry):
                names.add(entry)
            elif m := _LEFTOVER.match(entry):
                names.add(m.group(1))
        for name in names:
            commit.recover(os.path.join(self.root, name))
        for f in commit._leftovers(self.index_path, commit.TMP_TAG):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)

    def scan(self) -> dict[int, CheckpointInfo]:
        """Every committed checkpoint now on disk. A checkpoint whose manifest cannot
        be read is left out (with a warning) rather than failing the whole scan."""
        found: dict[str, tuple[list[int], CheckpointInfo]] = {}
        for entry in self._listdir():
            step = filed_step(entry)
            if step is None:
                continue
            path = os.path.join(self.root, entry)
            stamp = _stamp(os.path.join(path, mf.MANIFEST_NAME))
            if stamp is None:
                continue
            cached = self._cache.get(entry)
            if cached is not None and cached[0] == stamp:
                found[entry] = cached
                continue
            try:
                found[entry] = (stamp, read_info(path, step))
            except FileNotFoundError:
                continue  # removed since it was listed (by the rank that applies retention)
            except (CheckpointError, ValueError, TypeError) as e:
                log.warning("skipping unreadable checkpoint %s: %s", path, e)
        if {k: v[0] for k, v in found.items()} != {k: v[0] for k, v in self._cache.items()}:
            self._cache = found
            if self.write_index:
                self._write_index()
        return {info.step: info for _, info in found.values()}

    def _listdir(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{self.root} no longer exists") from None

    def _read_index(self) -> dict[str, tuple[list[int], CheckpointInfo]]:
        try:
            with open(self.index_path, "rb") as f:
                doc = json.load(f)
            if doc.get("format") != _INDEX_FORMAT:
                return {}
            entries = unflatten(doc["entries"], _no_tensor)
            return {
                name: (stamp, CheckpointInfo(**info, path=os.path.join(self.root, name)))
                for name, stamp, info in entries
            }
        except (OSError, ValueError, TypeError, KeyError, AttributeError, CheckpointError):
            return {}  # missing or damaged: every entry is read from its checkpoint

    def _write_index(self) -> None:
        entries = []
        for name, (stamp, info) in sorted(self._cache.items()):
            fields = asdict(info)
            for k in ("path", "is_best", "is_latest"):
                del fields[k]
            entries.append([name, stamp, fields])
        doc = {"format": _INDEX_FORMAT, "entries": flatten(entries).tree}
        tmp = commit.sibling(self.index_path, commit.TMP_TAG)
        # A cache: an atomic rename suffices, no fsync; a torn index is rebuilt.
        try:
            with open(tmp, "wb") as f:
                f.write(mf.encode(doc))
            os.replace(tmp, self.index_path)
        except OSError as e:
            log.warning("cannot write %s: %s", self.index_path, e)
            if os.path.exists(tmp):
                os.remove(tmp)


def _no_tensor(index: int, tag: str) -> Any:
    raise CheckpointError("the index refers to a tensor")
