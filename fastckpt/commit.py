"""Atomic commit of a checkpoint directory, and clean-up after crashed saves.

A save writes into a hidden sibling ``.<name>.fastckpt-tmp-<owner>-<id>``; the commit
writes the manifest last, fsyncs, and moves the directory into place. Replacing an
existing checkpoint uses ``renameat2(RENAME_EXCHANGE)`` so that ``path`` names a
complete checkpoint at every instant. Where the filesystem lacks it, the old one is
first renamed to ``.<name>.fastckpt-old-<owner>-<id>``; if a crash falls between the
two renames, :func:`recover` moves it back.

``<owner>`` is ``<pid>.<host>``: a pid means something only on its own host, and a
checkpoint directory on a shared filesystem is seen from many hosts. A process
judges only its own host's siblings (and those of older releases, named by the pid
alone); another host's are left to that host.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from typing import Any

import psutil

from .errors import CheckpointError
from .manifest import MANIFEST_NAME, seal
from .writer import write_all

TMP_TAG = ".fastckpt-tmp-"
OLD_TAG = ".fastckpt-old-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _split(path: str) -> tuple[str, str]:
    path = os.path.abspath(path)
    return os.path.dirname(path), os.path.basename(path)


@functools.cache
def _host() -> str:
    # A digest keeps the name short and free of the separators a host name may hold.
    return hashlib.blake2s(socket.gethostname().encode(), digest_size=4).hexdigest()


def owner() -> str:
    """This process, as sibling names record their owner: ``<pid>.<host>``."""
    return f"{os.getpid()}.{_host()}"


def token() -> str:
    """A fresh name part for a sibling owned by this process: ``<owner>-<id>``."""
    return f"{owner()}-{uuid.uuid4().hex[:12]}"


def sibling(path: str, tag: str) -> str:
    """A fresh hidden sibling of ``path`` owned by this process."""
    parent, name = _split(path)
    return os.path.join(parent, f".{name}{tag}{token()}")


def _is_dead(entry: str, prefix: str) -> bool:
    """Whether the process named in a sibling's name is known to be gone. One on
    another host cannot be told from here; an unreadable name has no owner."""
    pid, _, host = entry[len(prefix):].split("-", 1)[0].partition(".")
    if host and host != _host():
        return False
    try:
        n = int(pid)
    except ValueError:
        return True
    return n != os.getpid() and not psutil.pid_exists(n)


def _leftovers(path: str, tag: str) -> list[str]:
    """Siblings with ``tag`` whose owning process is gone."""
    parent, name = _split(path)
    prefix = f".{name}{tag}"
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    return [os.path.join(parent, e) for e in entries
            if e.startswith(prefix) and _is_dead(e, prefix)]


def recover(path: str) -> None:
    """Undo a crash between the two renames of a non-atomic replace, then remove the
    temporary directories of saves whose process died."""
    if not os.path.lexists(path):
        olds = [o for o in _leftovers(path, OLD_TAG) if is_checkpoint(o)]
        if olds:
            newest = max(olds, key=os.path.getmtime)
            os.rename(newest, path)
            fsync_dir(os.path.dirname(os.path.abspath(path)))
    for d in _leftovers(path, TMP_TAG) + _leftovers(path, OLD_TAG):
        remove_dir(d, ignore_errors=True)


def remove_dir(path: str, ignore_errors: bool = False) -> None:
    """Delete a checkpoint directory taken away from its name. One that was a
    symbolic link to a directory elsewhere loses only the link: what it points to is
    not ours to delete (and ``shutil.rmtree`` refuses links)."""
    if not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
    elif ignore_errors:
        with contextlib.suppress(OSError):
            os.unlink(path)
    else:
        os.unlink(path)


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST_NAME))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: str, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_replaceable(path: str) -> None:
    """Refuse to save over anything but a fastckpt checkpoint or an empty directory,
    so that a mistyped path can never destroy unrelated data."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        if is_checkpoint(path) or not os.listdir(path):
            return
        raise CheckpointError(f"{path} exists and is not a fastckpt checkpoint; not replacing it")
    raise CheckpointError(f"{path} exists and is not a directory; not replacing it")


def commit(tmp: str, path: str, doc: dict,
           dispose: Callable[[str], Any] = shutil.rmtree) -> None:
    """Write the manifest document ``doc`` into ``tmp`` and make it ``path`` atomically
    and durably (see :func:`publish` for ``dispose``)."""
    write_file_durably(os.path.join(tmp, MANIFEST_NAME), seal(doc))
    fsync_dir(tmp)
    publish(tmp, path, dispose)


def publish(tmp: str, path: str, dispose: Callable[[str], Any] = shutil.rmtree) -> None:
    """Move the complete, fsynced directory ``tmp`` to ``path`` atomically and durably,
    replacing a checkpoint (or an empty directory) there.

    The replaced checkpoint is taken away from ``path`` first; once the new one is
    durable, ``dispose`` gets the directory now holding it (a hidden sibling that
    :func:`recover` cleans if this process dies first). Removing it is no part of
    making the new checkpoint durable, so a caller may leave that for later."""
    parent = os.path.dirname(os.path.abspath(path))
    check_replaceable(path)
    replaced = None
    if not os.path.lexists(path):
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        replaced = tmp  # now holds the previous checkpoint
    else:
        old = _replace_by_two_renames(tmp, path)
        fsync_dir(parent)
        # Out of reach of recover() and readers, which would take an -old- sibling
        # for a checkpoint to restore even while it is being deleted.
        replaced = sibling(path, TMP_TAG)
        os.rename(old, replaced)
    fsync_dir(parent)
    if replaced is not None:
        dispose(replaced)


def _replace_by_two_renames(tmp: str, path: str) -> str:
    """Move ``path`` aside and ``tmp`` into its place; returns where the old one is."""
    old = sibling(path, OLD_TAG)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        # Put the previous checkpoint back under its own name: a failed save must
        # leave it where load() looks. recover() covers a crash at this point.
        os.rename(old, path)
        raise
    return old


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths; False where the OS or filesystem cannot."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


_libc = ctypes.CDLL(None, use_errno=True)
