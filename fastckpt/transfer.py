"""Moving whole checkpoints: verified copies, and removal that never leaves a
half-deleted checkpoint under its name."""

from __future__ import annotations

import os
import shutil

from . import commit, reader
from . import manifest as mf
from .errors import CheckpointError, CheckpointWriteError, CorruptCheckpointError


def copy_checkpoint(src: str, dest: str) -> str:
    """Copy the committed checkpoint at ``src`` to ``dest`` and return ``dest``.

    The copy is made in a temporary sibling of ``dest``, every checksum is verified
    there, and only then is it renamed into place (atomically replacing a checkpoint
    already at ``dest``). Raises :class:`CorruptCheckpointError` if the copy does not
    verify; nothing is left at ``dest`` then.
    """
    src = reader.resolve(src)
    m = mf.read(src)
    if m.checksum is None:
        raise CheckpointError(f"{src} was saved without checksums; a copy cannot be verified")
    dest = os.path.abspath(os.fspath(dest))
    commit.check_replaceable(dest)
    tmp = commit.sibling(dest, commit.TMP_TAG)
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        commit.recover(dest)
        os.mkdir(tmp, 0o755)
        # The manifest last: the copy is a checkpoint only once it is complete.
        for name in [s.file for s in m.shards] + [mf.MANIFEST_NAME]:
            _copy_file(os.path.join(src, name), os.path.join(tmp, name))
        commit.fsync_dir(tmp)
        report = reader.verify(tmp)
        if not report.ok:
            raise CorruptCheckpointError(
                f"copy of {src} does not verify: " + "; ".join(report.problems[:3])
            )
        commit.publish(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"copying {src} to {dest} failed: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def detach(path: str) -> str:
    """Take the checkpoint directory ``path`` away from its name, atomically, and
    return where it now is: a temporary sibling for the caller to remove
    (:func:`commit.remove_dir`). A
    crash before that leaves no damaged checkpoint under the name, only a leftover
    that ``Catalog.clean`` removes once this process is gone."""
    trash = commit.sibling(path, commit.TMP_TAG)
    os.rename(path, trash)
    return trash


def remove_checkpoint(path: str) -> None:
    """Delete the checkpoint directory ``path`` (see :func:`detach`)."""
    commit.remove_dir(detach(path))


def _copy_file(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
