"""fastckpt: asynchronous, high-throughput checkpoints for PyTorch.

``save`` returns as soon as the state is snapshotted; compression, checksums and
the durable, atomic write happen in the background. ``load`` maps shards back in
place. Checkpoints are directories of plain safetensors shards plus a JSON
manifest; nothing is ever pickled.

For training runs, :class:`CheckpointManager` keeps a directory of checkpoints
(one per step, with retention rules and best-checkpoint tracking) and
:class:`TrainingState` captures everything needed to resume bit-exactly (models,
optimizers, schedulers, AMP scaler, RNGs, data-loader position).
"""

from __future__ import annotations

__version__ = "0.1.0"

import asyncio
import atexit
import os
import threading
from collections.abc import Mapping
from typing import Any

from . import dist
from .catalog import CheckpointInfo
from .checkpointer import Checkpointer, PathLike, SaveHandle, SaveResult
from .convert import import_torch
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    InvalidArgumentError,
    MetricError,
    StepExistsError,
    UnsupportedTypeError,
)
from .fileio import native_available
from .manager import CheckpointManager
from .reader import CheckpointReader, VerifyReport
from .reader import load as _load
from .reader import verify as _verify
from .restore import LoadReport, load_into
from .training import TrainingState

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointWriteError",
    "Checkpointer",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "LoadReport",
    "InvalidArgumentError",
    "MetricError",
    "SaveHandle",
    "SaveResult",
    "StepExistsError",
    "TrainingState",
    "UnsupportedTypeError",
    "VerifyReport",
    "aload",
    "import_torch",
    "dist",
    "load",
    "load_into",
    "native_available",
    "open",
    "save",
    "verify",
]

_default: Checkpointer | None = None
_default_lock = threading.Lock()


def default_checkpointer() -> Checkpointer:
    """The engine used by the module-level functions, created on first use and
    closed (waiting for in-flight saves) when the interpreter exits."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Checkpointer()
            atexit.register(_default.close)
        return _default


def save(obj: Any, path: PathLike, *, metadata: Mapping[str, Any] | None = None,
         **options: Any) -> SaveHandle:
    """Drop-in for ``torch.save(obj, path)`` that does not wait for the disk.

    ``obj`` is any nesting of dict / list / tuple holding tensors and plain values
    (int, float, bool, None, str, bytes, torch.dtype, torch.Size, numpy arrays and
    scalars). Returns a :class:`SaveHandle` once every tensor is snapshotted; call
    ``.wait()`` for the durable :class:`SaveResult`. ``path`` becomes a directory of
    safetensors shards plus ``fastckpt.json``, replaced atomically if it exists.
    ``options``: ``checksum``, ``shard_size``, ``compression``, and under
    ``torch.distributed`` ``per_rank`` and ``process_group`` (see
    :meth:`Checkpointer.save` and docs/DISTRIBUTED.md: with a group, every rank
    calls ``save``).

    Example::

        handle = fastckpt.save({"model": model.state_dict(), "step": 10}, "ckpt/step_10")
        ...  # keep training
        handle.wait()
    """
    return default_checkpointer().save(obj, path, metadata=metadata, **options)


def load(path: PathLike, map_location: Any = "cpu", mmap: bool = True,
         verify: bool = False) -> Any:
    """Load a checkpoint saved by :func:`save`, returning the same structure.

    ``map_location``: a device (``"cpu"``, ``"cuda:0"``), ``None`` to restore each
    tensor to the device it was saved from, or a dict mapping saved devices to new
    ones (like ``torch.load``). ``mmap=True`` maps uncompressed tensors zero-copy
    (pages are read on first touch); ``mmap=False`` reads them into fresh memory.
    ``verify=True`` checks every checksum and raises
    :class:`CorruptCheckpointError` on any mismatch. Tensors that shared storage
    when saved share it again.
    """
    return _load(path, map_location=map_location, mmap=mmap, verify=verify)


def verify(path: PathLike) -> VerifyReport:
    """Check a checkpoint's files against its manifest and checksums.

    Returns a :class:`VerifyReport`; ``report.ok`` is False and ``report.problems``
    lists each problem (naming file and tensor) when anything is wrong.
    """
    return _verify(path, workers=min(8, os.cpu_count() or 2))


def open(path: PathLike, mmap: bool = True, verify: bool = False) -> CheckpointReader:  # noqa: A001
    """Open a checkpoint for lazy access without reading its tensors.

    ``reader.keys()`` lists the key paths of the saved tensors, ``reader[key]`` reads
    one (verified against its checksum when ``verify=True``), ``reader.metadata`` is
    the user metadata and ``reader.load()`` the whole object::

        with fastckpt.open("ckpt/step_10") as r:
            emb = r["model/embed.weight"]
    """
    return CheckpointReader(path, mmap=mmap, verify=verify)


async def aload(path: PathLike, map_location: Any = "cpu", mmap: bool = True,
                verify: bool = False) -> Any:
    """:func:`load` for asyncio programs: the reads run on worker threads, so the
    event loop keeps serving while a checkpoint loads."""
    return await asyncio.to_thread(load, path, map_location, mmap, verify)
