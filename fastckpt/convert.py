"""Converting checkpoints of other formats into fastckpt checkpoints."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch

from .checkpointer import Checkpointer, PathLike, SaveResult
from .errors import CheckpointError, CheckpointNotFoundError, UnsupportedTypeError


def import_torch(src_file: PathLike, dest_dir: PathLike, *,
                 metadata: Mapping[str, Any] | None = None,
                 checkpointer: Checkpointer | None = None) -> SaveResult:
    """Convert a ``torch.save`` file into a fastckpt checkpoint at ``dest_dir``.

    The file is read with ``torch.load(weights_only=True)`` only, so it can hold
    tensors, containers and plain values but never runs code; anything else is
    refused with :class:`UnsupportedTypeError`. Blocks until the new checkpoint is
    committed and returns its :class:`SaveResult`. ``metadata`` is stored with it,
    plus ``imported_from`` (the source file).
    """
    src = os.path.abspath(os.fspath(src_file))
    if not os.path.isfile(src):
        raise CheckpointNotFoundError(f"{src}: no such file")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsupportedTypeError(
            f"{src} holds objects that torch.load(weights_only=True) refuses: {e}"
        ) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{src} is not a readable torch.save file: {e}") from e
    from . import default_checkpointer  # the package imports this module first

    engine = checkpointer or default_checkpointer()
    meta = {**(metadata or {}), "imported_from": src}
    return engine.save(obj, dest_dir, metadata=meta).wait()
