"""Snapshots of every random number generator a training run draws from, as plain
values and tensors (no pickle): Python ``random``, NumPy's legacy global state,
torch's CPU generator, every CUDA device's generator, and any extra
``np.random.Generator`` / ``torch.Generator`` objects passed in."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, InvalidArgumentError

log = logging.getLogger("fastckpt")


def capture(generators: Sequence[Any] = ()) -> dict[str, Any]:
    """The current state of every generator (``generators`` in the order given)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [_generator_state(g) for g in generators],
    }


def restore(snapshot: dict[str, Any], generators: Sequence[Any] = ()) -> None:
    """Put every generator back into the state :func:`capture` recorded."""
    saved = snapshot["generators"]
    if len(saved) != len(generators):
        raise CheckpointError(
            f"the checkpoint holds {len(saved)} extra generators, {len(generators)} were given"
        )
    random.setstate(snapshot["python"])
    np.random.set_state(snapshot["numpy"])
    torch.set_rng_state(snapshot["torch"])
    _restore_cuda(snapshot["cuda"])
    for g, s in zip(generators, saved, strict=True):
        _set_generator_state(g, s)


def _restore_cuda(states: list[torch.Tensor]) -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if states and len(states) != count:
        log.warning(
            "the checkpoint holds RNG states of %d CUDA devices, this process "
            "sees %d; restoring the first %d", len(states), count, min(count, len(states)),
        )
    for i, state in enumerate(states[:count]):
        torch.cuda.set_rng_state(state, i)


def _kind(g: Any) -> str:
    if isinstance(g, np.random.Generator):
        return "numpy"
    if isinstance(g, torch.Generator):
        return "torch"
    raise InvalidArgumentError(
        f"cannot capture a {type(g).__name__}: pass np.random.Generator or torch.Generator"
    )


def _generator_state(g: Any) -> dict[str, Any]:
    kind = _kind(g)
    state = g.bit_generator.state if kind == "numpy" else g.get_state()
    return {"kind": kind, "state": state}


def _set_generator_state(g: Any, saved: dict[str, Any]) -> None:
    kind = _kind(g)
    if kind != saved["kind"]:
        raise CheckpointError(f"a {saved['kind']} generator was saved, a {kind} one given")
    if kind == "numpy":
        g.bit_generator.state = saved["state"]
    else:
        g.set_state(saved["state"])
