"""PyTorch Lightning: non-blocking checkpoints through fastckpt.

``Trainer(plugins=[FastCheckpointIO()])`` makes every checkpoint Lightning writes
(``ModelCheckpoint``, ``trainer.save_checkpoint``) a fastckpt save: the training
step continues as soon as the state is snapshotted, the write and the atomic
commit run in the background. Each checkpoint path (``epoch=0-step=10.ckpt``)
becomes a checkpoint directory.

Lightning's checkpoint dict may hold values fastckpt's format refuses (arbitrary
objects among ``hyper_parameters`` or callback states). The policy is explicit:

- ``unsupported="error"`` (default): the save raises
  :class:`fastckpt.UnsupportedTypeError` naming the key path of the value;
- ``unsupported="pickle"``: such values (and only those) are pickled into bytes
  stored in the checkpoint, and unpickled on load by a ``FastCheckpointIO`` that
  also says ``unsupported="pickle"``, since unpickling runs code from the file. A
  plugin with the default policy refuses to load them.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections import OrderedDict
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from .. import reader
from ..checkpointer import Checkpointer, SaveHandle
from ..errors import CheckpointError, UnsupportedTypeError
from ..plan import check_tensor
from ..tree import flatten, key_path

PICKLED = "__fastckpt_pickled__"  # the one key of a dict standing for a pickled value
POLICIES = ("error", "pickle")


class FastCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` saving through a :class:`fastckpt.Checkpointer`.

    ``checkpointer``: the engine to use (default: one of its own, built from
    ``options`` such as ``compression="zstd"``). ``unsupported``: what to do with
    values fastckpt cannot store, see the module docstring. Failures of a background
    save are raised by the next save, by :meth:`teardown` (end of ``fit``) and by
    loading or removing that checkpoint.
    """

    def __init__(self, checkpointer: Checkpointer | None = None, *, unsupported: str = "error",
                 **options: Any) -> None:
        if unsupported not in POLICIES:
            raise ValueError(f"unsupported={unsupported!r}: choose one of {POLICIES}")
        self.unsupported = unsupported
        self._engine = checkpointer or Checkpointer(process_group=False, **options)
        self._handles: dict[str, SaveHandle] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("FastCheckpointIO takes no storage_options")
        path = os.path.abspath(os.fspath(path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = _encode(checkpoint, "") if self.unsupported == "pickle" else checkpoint
        try:
            self._handles[path] = self._engine.save(state, path)
        except UnsupportedTypeError as e:
            raise UnsupportedTypeError(f"{e}; FastCheckpointIO(unsupported='pickle') stores "
                                       "such values pickled (an explicit opt-in)") from e

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        path = os.path.abspath(os.fspath(path))
        self._wait(path)
        # Lightning's default map_location is a function keeping storages where torch.load
        # puts them: on the CPU, which is where fastckpt loads to as well.
        where = "cpu" if map_location is None or callable(map_location) else map_location
        state = reader.load(path, map_location=where)
        return _decode(state, self.unsupported == "pickle" and weights_only is not True)

    def remove_checkpoint(self, path: Any) -> None:
        path = os.path.abspath(os.fspath(path))
        self._wait(path)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)

    def teardown(self) -> None:
        """Wait for every save in flight, and for the removal of the checkpoints they
        replaced; raise the first failure."""
        handles, self._handles = list(self._handles.values()), {}
        for h in handles:
            h.wait()
        self._engine.wait_all()

    def _wait(self, path: str) -> None:
        handle = self._handles.pop(path, None)
        if handle is not None:
            handle.wait()


def _encode(obj: Any, path: str) -> Any:
    """``obj`` with every value fastckpt cannot store replaced by its pickle."""
    if isinstance(obj, dict):
        items = [(k, _encode(v, key_path(path, k))) for k, v in obj.items()]
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [_encode(v, key_path(path, i)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(_encode(v, key_path(path, i)) for i, v in enumerate(obj))
    try:
        flat = flatten(obj)
        for t, p in zip(flat.tensors, flat.paths, strict=True):
            check_tensor(t, key_path(path, p) if p else path)  # dtypes, layouts
    except UnsupportedTypeError:
        return {PICKLED: pickle.dumps(obj)}
    return obj


def _decode(obj: Any, allow: bool) -> Any:
    """Inverse of :func:`_encode`, refusing to unpickle unless ``allow``."""
    if isinstance(obj, dict):
        if len(obj) == 1 and isinstance(obj.get(PICKLED), bytes):
            if not allow:
                raise CheckpointError("the checkpoint holds pickled values; loading them runs "
                                      "code from the file: use "
                                      "FastCheckpointIO(unsupported='pickle') if you trust it")
            return pickle.loads(obj[PICKLED])  # noqa: S301 - explicit opt-in, documented
        return type(obj)((k, _decode(v, allow)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_decode(v, allow) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(_decode(v, allow) for v in obj)
    return obj
