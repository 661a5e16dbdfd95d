"""``TrainingState``: everything a training run needs to resume bit-exactly where it
stopped, as a plain state dict that fastckpt stores without pickle.

Mid-epoch resume: a data loader that can save its position (``state_dict()`` /
``load_state_dict()`` on the loader, its sampler, batch sampler or dataset, as
torchdata's ``StatefulDataLoader`` has) is saved and restored as is. Any other loader
is replayed: the state records every RNG at the start of the epoch and the number of
batches drawn since, and on resume the epoch's iterator is rebuilt from those RNG
states and the batches already trained on are drawn again and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from . import rng
from .errors import CheckpointError, InvalidArgumentError

log = logging.getLogger("fastckpt")

_FORMAT = "fastckpt.TrainingState"
_END = object()
# The parts that differ between the ranks of a distributed run: each rank draws its
# own random numbers and walks its own share of the data.
RANK_KEYS = ("rng", "epoch_start_rng", "loader", "batch_index")


@dataclasses.dataclass(eq=False)
class TrainingState:
    """The resumable state of a training run.

    Args:
        model, ema_model: modules whose ``state_dict()`` is saved (the EMA one is
            optional, e.g. a ``torch.optim.swa_utils.AveragedModel``).
        optimizers, schedulers: lists of optimizers and LR schedulers.
        scaler: an AMP ``torch.amp.GradScaler``.
        loader: the data loader :meth:`iterate` walks (its position is saved).
        generators: extra ``np.random.Generator`` / ``torch.Generator`` objects to
            save besides the global Python, NumPy, torch and CUDA generators (those
            of ``loader`` and its sampler are found on their own).
        config: the run's configuration (dict, dataclass or ``argparse.Namespace``),
            saved as a dict for the record.
        epoch, step: current epoch and global step (``step`` is the caller's to
            advance; ``epoch`` advances when :meth:`iterate` finishes an epoch).
        metrics_history: a list of metric dicts, saved as is.

    Example::

        ts = TrainingState(model=model, optimizers=[opt], schedulers=[sched],
                           loader=loader, config=cfg)
        if manager.latest() is not None:
            ts.load_state_dict(manager.restore())
        while ts.epoch < epochs:
            for x, y in ts.iterate():
                ...  # forward, backward, optimizer step
                ts.step += 1
                if ts.step % 100 == 0:
                    manager.save(ts.step, ts.state_dict(), metrics={"loss": loss.item()})
    """

    model: torch.nn.Module | None = None
    ema_model: torch.nn.Module | None = None
    optimizers: list[Any] = dataclasses.field(default_factory=list)
    schedulers: list[Any] = dataclasses.field(default_factory=list)
    scaler: Any = None
    loader: Any = None
    generators: list[Any] = dataclasses.field(default_factory=list)
    config: Any = None
    epoch: int = 0
    step: int = 0
    metrics_history: list[Any] = dataclasses.field(default_factory=list)
    batch_index: int = 0  # batches drawn in the current epoch
    _epoch_start_rng: dict | None = dataclasses.field(default=None, init=False, repr=False)
    _resume: tuple[dict, dict] | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.optimizers = _as_list(self.optimizers)
        self.schedulers = _as_list(self.schedulers)
        self.generators = _as_list(self.generators)

    # -- saving -------------------------------------------------------------------

    def state_dict(self, rank_state: bool = True) -> dict[str, Any]:
        """Everything to resume from, as tensors and plain values.

        With ``rank_state=False`` the state leaves out this process's own part
        (:meth:`rank_state_dict`): what the ranks of a distributed run share, to be
        saved as the replicated state with the rank's own part as ``per_rank``.
        """
        state = {
            "format": _FORMAT,
            "model": _module_state(self.model),
            "ema_model": _module_state(self.ema_model),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "metrics_history": list(self.metrics_history),
            "config": config_dict(self.config),
        }
        if rank_state:
            state.update(self.rank_state_dict())
        return state

    def rank_state_dict(self) -> dict[str, Any]:
        """This process's own part of the state (keys :data:`RANK_KEYS`): every RNG
        (also at the start of the epoch) and the data loader's position.

        Between :meth:`load_state_dict` and the next :meth:`iterate` it is the loaded
        resume point itself, so that a checkpoint taken then (say, just after a
        restart) resumes the same epoch at the same batch.
        """
        if self._resume is not None:
            # iterate() has yet to replay the epoch: these RNG states, not the
            # generators' current ones, are where training goes on from.
            start, now = self._resume
        else:
            start, now = self._epoch_start_rng, rng.capture(self._generators())
        return {
            "rng": now,
            "epoch_start_rng": start,
            "loader": [p.state_dict() for p in _stateful_parts(self.loader)],
            "batch_index": self.batch_index,
        }

    # -- restoring ----------------------------------------------------------------

    def load_state_dict(self, state: Mapping[str, Any],
                        rank_state: Mapping[str, Any] | None = None) -> None:
        """Restore everything :meth:`state_dict` saved into the objects this state
        holds. A loader position is applied by the next :meth:`iterate`.

        ``rank_state`` is this process's own part (:meth:`rank_state_dict`) when it
        was saved apart from ``state``; it takes precedence over one in ``state``.
        """
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise CheckpointError("the checkpoint does not hold a TrainingState")
        own = _rank_part(state, rank_state)
        _load_module(self.model, state["model"], "model")
        _load_module(self.ema_model, state["ema_model"], "ema_model")
        _load_each(self.optimizers, state["optimizers"], "optimizers")
        _load_each(self.schedulers, state["schedulers"], "schedulers")
        if self.scaler is not None:
            if state["scaler"] is None:
                raise CheckpointError("the checkpoint holds no GradScaler state")
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.metrics_history = list(state["metrics_history"])
        self._take_config(state["config"])
        self.batch_index = own["batch_index"]
        rng.restore(own["rng"], self._generators())
        _load_each(_stateful_parts(self.loader), own["loader"], "data loader states")
        self._epoch_start_rng = None
        start = own["epoch_start_rng"]
        self._resume = (start, own["rng"]) if start is not None else None

    def _take_config(self, saved: Any) -> None:
        if self.config is None:
            self.config = saved
        elif saved is not None and config_dict(self.config) != saved:
            log.warning("the run's config differs from the checkpoint's")

    # -- iterating ----------------------------------------------------------------

    def iterate(self, loader: Any = None) -> Iterator[Any]:
        """Yield the batches of the current epoch from ``loader`` (default: the
        state's), counting them, then advance ``epoch``. Right after
        :meth:`load_state_dict` it continues the epoch where the checkpoint was taken.
        """
        if loader is not None:
            self.loader = loader
        if self.loader is None:
            raise InvalidArgumentError("TrainingState.iterate() needs a loader")
        resume, self._resume = self._resume, None
        gens = self._generators()
        skip = 0
        if resume is not None:
            rng.restore(resume[0], gens)  # replay the epoch's start...
            if not _stateful_parts(self.loader):
                skip = self.batch_index
                log.warning(
                    "resuming epoch %d at batch %d by drawing and skipping the "
                    "batches before it (%s has no state_dict(); a stateful loader such as "
                    "torchdata's StatefulDataLoader avoids this)",
                    self.epoch, skip, type(self.loader).__name__,
                )
        else:
            self.batch_index = 0
        self._epoch_start_rng = rng.capture(gens)
        it = iter(self.loader)
        for _ in range(skip):
            if next(it, _END) is _END:
                break
        if resume is not None:
            rng.restore(resume[1], gens)  # ...then continue from the checkpoint's RNGs
        for batch in it:
            self.batch_index += 1
            yield batch
        self.epoch += 1
        self.batch_index = 0
        self._epoch_start_rng = None

    def _generators(self) -> list[Any]:
        found = list(self.generators)
        holders = [self.loader, getattr(self.loader, "sampler", None)]
        holders.append(getattr(getattr(self.loader, "batch_sampler", None), "sampler", None))
        for h in holders:
            g = getattr(h, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not f for f in found):
                found.append(g)
        return found


def _rank_part(state: Mapping[str, Any], rank_state: Mapping[str, Any] | None
               ) -> Mapping[str, Any]:
    """The rank's own part of a saved state: ``rank_state``, else ``state``'s."""
    if rank_state is not None:
        if not isinstance(rank_state, Mapping) or any(k not in rank_state for k in RANK_KEYS):
            raise InvalidArgumentError(
                f"rank_state must be a TrainingState.rank_state_dict() (keys {RANK_KEYS})"
            )
        return rank_state
    if any(k not in state for k in RANK_KEYS):
        raise CheckpointError(
            "the checkpoint holds the TrainingState without this rank's own part (RNGs, "
            "data-loader position): pass it as rank_state= (e.g. "
            "manager.restore_rank_state()); a rank the checkpoint holds no part for (saved "
            "by fewer ranks) may pass rank_state=ts.rank_state_dict() to keep its own RNGs "
            "and start the current epoch over"
        )
    return state


def check_shared(state: Any) -> None:
    """Refuse a whole TrainingState as the replicated state of a multi-rank save:
    only one rank's RNGs and loader position would be kept, and every rank would
    resume from them."""
    if (isinstance(state, Mapping) and state.get("format") == _FORMAT
            and any(k in state for k in RANK_KEYS)):
        raise InvalidArgumentError(
            "a TrainingState's RNGs and data-loader position differ between ranks: save "
            "ts.state_dict(rank_state=False) with per_rank=ts.rank_state_dict()"
        )


def config_dict(config: Any) -> dict | None:
    """A run configuration as a plain dict (from a dict, dataclass or Namespace)."""
    if config is None:
        return None
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, argparse.Namespace):
        return dict(vars(config))
    raise InvalidArgumentError(
        f"config must be a dict, dataclass or argparse.Namespace, got {type(config).__name__}"
    )


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _module_state(m: torch.nn.Module | None) -> dict | None:
    return m.state_dict() if m is not None else None


def _load_module(m: torch.nn.Module | None, saved: Any, name: str) -> None:
    if m is None:
        if saved is not None:
            log.warning("the checkpoint's %s is not restored (none given)", name)
        return
    if saved is None:
        raise CheckpointError(f"the checkpoint holds no {name}")
    m.load_state_dict(saved)


def _load_each(objs: Sequence[Any], saved: Sequence[Any], name: str) -> None:
    if len(objs) != len(saved):
        raise CheckpointError(f"the checkpoint holds {len(saved)} {name}, {len(objs)} given")
    for obj, s in zip(objs, saved, strict=True):
        obj.load_state_dict(s)


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def _stateful_parts(loader: Any) -> list[Any]:
    """The objects that keep the loader's position themselves, if any."""
    if loader is None:
        return []
    if _is_stateful(loader):
        return [loader]
    parts: list[Any] = []
    for name in ("batch_sampler", "sampler", "dataset"):
        p = getattr(loader, name, None)
        if _is_stateful(p) and all(p is not q for q in parts):
            parts.append(p)
    return parts
