"""``CheckpointManager``: a directory of checkpoints, one per training step, with
retention rules, best-checkpoint tracking, restore, export and import.

Everything the manager knows comes from the committed checkpoints themselves (their
manifests carry step, metrics, tags, description and time), so it agrees with the
disk after a crash, a restart or a directory deleted by hand. Old checkpoints are
removed on a background thread once a new one has committed, never on the caller's.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any

from . import export, reader, transfer
from .catalog import Catalog, CheckpointInfo, read_info
from .checkpointer import Checkpointer, PathLike, SaveHandle
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    MetricError,
    StepExistsError,
)
from .retention import RetentionPolicy

log = logging.getLogger("fastckpt")


class CheckpointManager:
    """Checkpoints of one training run under ``root`` (``root/step_00001000/``, ...).

    Retention (combinable; see ``docs/MANAGER.md``): ``keep_last=N`` most recent,
    ``keep_best=K`` ranked by ``metric`` with ``mode`` ``"min"`` or ``"max"``,
    ``keep_every=N`` steps and ``keep_every_seconds=T`` kept forever, and anything
    tagged ``"keep"``. The latest checkpoint is always kept. Nothing is deleted
    unless ``keep_last`` or ``keep_best`` is set.

    Saving: ``save_interval_steps=N`` saves only steps that are multiples of N;
    ``save_best_only`` saves only when ``metric`` improves on the best so far. A
    skipped save returns None; ``force=True`` overrides both.

    ``backup_dir`` keeps verified copies of the best checkpoints (the ``keep_best``
    best, or the single best) in a second directory. ``checkpointer`` is the engine
    to save with (by default the manager owns one).

    On start, leftovers of crashed saves under ``root`` are cleaned up. Use as a
    context manager, or call :meth:`close` to wait for saves and their housekeeping.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        metric: str = "val_loss",
        mode: str = "min",
        keep_every: int | None = None,
        keep_every_seconds: float | None = None,
        save_interval_steps: int | None = None,
        save_best_only: bool = False,
        backup_dir: PathLike | None = None,
        checkpointer: Checkpointer | None = None,
    ) -> None:
        self.policy = RetentionPolicy(
            keep_last, keep_best, metric, mode, keep_every, keep_every_seconds
        )
        if save_interval_steps is not None:
            _check_step(save_interval_steps, "save_interval_steps", minimum=1)
        self.save_interval_steps = save_interval_steps
        self.save_best_only = bool(save_best_only)
        self.root = _open_root(root)
        self._catalog = Catalog(self.root)
        self._catalog.clean()
        self._backups = None
        if backup_dir is not None:
            self._backups = Catalog(_open_root(backup_dir))
            self._backups.clean()
        self._owns_checkpointer = checkpointer is None
        self._ckpt = checkpointer or Checkpointer()
        self._lock = threading.RLock()
        self._pending: dict[int, CheckpointInfo] = {}  # saves (and imports) in flight
        self._jobs: list[cf.Future] = []
        self._housekeeper = cf.ThreadPoolExecutor(1, thread_name_prefix="fastckpt-manager")
        self._closed = False
        latest = self.latest()
        log.info("%s: latest committed step %s", self.root, latest and latest.step)

    # -- saving -------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        description: str = "",
        force: bool = False,
    ) -> SaveHandle | None:
        """Save ``state`` as the checkpoint of ``step``, like :func:`fastckpt.save`.

        Returns the :class:`SaveHandle` once the state is snapshotted, or None when
        ``save_interval_steps`` / ``save_best_only`` skip this step. Raises
        :class:`StepExistsError` if the step is already saved (``force=True``
        replaces it, atomically) or being saved, and :class:`MetricError` if the
        policy ranks by a metric missing from ``metrics``. Once the save commits,
        checkpoints the policy no longer keeps are removed in the background.
        """
        step = _check_step(step, "step")
        metrics = _check_metrics(metrics)
        tags = _check_tags(tags)
        with self._lock:
            if self._closed:
                raise CheckpointError("this CheckpointManager is closed")
            self._check_metric(metrics)
            committed = self._catalog.scan()
            if not force and self._skip(step, metrics, committed):
                return None
            self._check_free(step, committed, force)
            info = CheckpointInfo(
                step, self._catalog.path(step), time.time(), metrics, tags,
                str(description), 0, None,
            )
            meta = {
                "step": step,
                "time": info.time,
                "metrics": metrics,
                "tags": list(tags),
                "description": info.description,
            }
            handle = self._ckpt.save(state, info.path, metadata=meta)
            self._pending[step] = info
            job: cf.Future = cf.Future()
            self._jobs = [j for j in self._jobs if not j.done()] + [job]
        handle.add_done_callback(
            lambda err: self._housekeeper.submit(self._after_save, step, err, job)
        )
        return handle

    def _check_metric(self, metrics: dict) -> None:
        if not (self.policy.keep_best or self.save_best_only):
            return
        name = self.policy.metric
        if name not in metrics:
            raise MetricError(
                f"metrics {sorted(metrics)} lack {name!r}, which this manager ranks "
                "checkpoints by (keep_best / save_best_only)"
            )
        v = metrics[name]
        if isinstance(v, bool) or not isinstance(v, Real):
            raise MetricError(f"metric {name!r} must be a real number, got {v!r}")

    def _skip(self, step: int, metrics: dict, committed: dict[int, CheckpointInfo]) -> bool:
        if self.save_interval_steps and step % self.save_interval_steps:
            return True
        if self.save_best_only:
            value = self.policy.value(metrics)
            entries = [*committed.values(), *self._pending.values()]
            return value is None or not self.policy.improves(value, entries)
        return False

    def _check_free(self, step: int, committed: dict, force: bool) -> None:
        if step in self._pending:
            raise StepExistsError(f"step {step} is being saved in {self.root}")
        if step in committed and not force:
            raise StepExistsError(
                f"step {step} is already saved in {self.root}; pass force=True to replace it"
            )

    def _after_save(self, step: int, error: BaseException | None, job: cf.Future) -> None:
        # On the housekeeping thread. A failed save deletes nothing; its error
        # reaches the caller through the handle and the next save().
        try:
            with self._lock:
                self._pending.pop(step, None)
            if error is None:
                self._prune()
                self._sync_backups()
        except Exception as e:
            log.error("housekeeping after step %d in %s failed: %s", step, self.root, e,
                      exc_info=True)
        finally:
            job.set_result(None)

    def _prune(self) -> None:
        with self._lock:
            committed = self._catalog.scan()
            keep = self.policy.keep(list(committed.values()))
            # A step being re-saved (force=True) is left to its save's atomic replace.
            doomed = [s for s in sorted(committed) if s not in keep and s not in self._pending]
            trash = [transfer.detach(committed[s].path) for s in doomed]
            self._catalog.scan()
        for s, t in zip(doomed, trash, strict=True):
            shutil.rmtree(t)
            log.info("removed step %d from %s (retention)", s, self.root)

    def _sync_backups(self) -> None:
        if self._backups is None:
            return
        with self._lock:
            ranked = self.policy.ranked(self._catalog.scan().values())
        want = {i.step: i for i in ranked[: self.policy.keep_best or 1]}
        have = self._backups.scan()
        for step, info in want.items():
            if step not in have or have[step].checksum != info.checksum:
                transfer.copy_checkpoint(info.path, self._backups.path(step))
        for step in set(have) - set(want):
            transfer.remove_checkpoint(have[step].path)
        self._backups.scan()

    # -- queries ------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest step first (saves in flight are not
        listed). Rescans the root, so directories removed by hand drop out."""
        with self._lock:
            infos = self._catalog.scan()
        ranked = self.policy.ranked(infos.values())
        best = ranked[0].step if ranked else None
        latest = max(infos, default=None)
        return [
            dataclasses.replace(infos[s], is_best=s == best, is_latest=s == latest)
            for s in sorted(infos)
        ]

    def latest(self) -> CheckpointInfo | None:
        """The committed checkpoint of the highest step, or None."""
        return next((i for i in self.list() if i.is_latest), None)

    def best(self) -> CheckpointInfo | None:
        """The committed checkpoint with the best ``metric``, or None when none has it
        (checkpoints without the metric, or with NaN, are never best)."""
        return next((i for i in self.list() if i.is_best), None)

    def summary(self) -> dict[str, Any]:
        """Count, total size in bytes, latest and best step of the checkpoints."""
        infos = self.list()
        return {
            "root": self.root,
            "count": len(infos),
            "total_size": sum(i.size for i in infos),
            "latest": next((i.step for i in infos if i.is_latest), None),
            "best": next((i.step for i in infos if i.is_best), None),
            "metric": self.policy.metric,
            "mode": self.policy.mode,
        }

    def compare(self, steps: Iterable[int]) -> dict[str, dict[int, Any]]:
        """Metrics side by side: ``{metric: {step: value}}`` over the given steps
        (None where a checkpoint lacks that metric)."""
        infos = [self._find(s) for s in steps]
        names = list(dict.fromkeys(k for i in infos for k in i.metrics))
        return {n: {i.step: i.metrics.get(n) for i in infos} for n in names}

    def _find(self, which: int | str) -> CheckpointInfo:
        """The committed checkpoint named by ``"latest"``, ``"best"`` or a step."""
        if which in ("latest", "best"):
            info = self.latest() if which == "latest" else self.best()
            if info is None:
                raise CheckpointNotFoundError(f"no {which} checkpoint in {self.root}")
            return info
        step = _check_step(which, "step")
        for info in self.list():
            if info.step == step:
                return info
        raise CheckpointNotFoundError(f"no committed checkpoint of step {step} in {self.root}")

    # -- restore, delete ----------------------------------------------------------

    def restore(self, which: int | str = "latest", **load_kwargs: Any) -> Any:
        """Load the checkpoint ``"latest"``, ``"best"`` or of a given step;
        ``load_kwargs`` (``map_location``, ``mmap``, ``verify``) go to
        :func:`fastckpt.load`."""
        return self._ckpt.load(self._find(which).path, **load_kwargs)

    def delete(self, step: int) -> None:
        """Remove the checkpoint of ``step`` (its name disappears atomically)."""
        with self._lock:
            if step in self._pending:
                raise CheckpointError(f"step {step} is being saved in {self.root}")
            trash = transfer.detach(self._find(step).path)
            self._catalog.scan()
        shutil.rmtree(trash)

    # -- copies -------------------------------------------------------------------

    def export(self, step: int | str, dest: PathLike) -> str:
        """Copy checkpoint ``step`` (or ``"latest"`` / ``"best"``) to the directory
        ``dest``, verified before it is renamed into place. Returns ``dest``."""
        return transfer.copy_checkpoint(self._find(step).path, os.fspath(dest))

    def import_(self, src: PathLike, step: int | None = None, force: bool = False
                ) -> CheckpointInfo:
        """Copy the checkpoint at ``src`` into this manager as ``step`` (by default the
        step in its metadata), verified before it appears. Retention is not applied
        to imports. Raises :class:`StepExistsError` unless the step is free or
        ``force=True``."""
        src_info = read_info(reader.resolve(os.fspath(src)))
        step = src_info.step if step is None else _check_step(step, "step")
        if step is None:
            raise InvalidArgumentError(f"{src} records no step; pass step=")
        with self._lock:
            self._check_free(step, self._catalog.scan(), force)
            self._pending[step] = src_info
        try:
            transfer.copy_checkpoint(src_info.path, self._catalog.path(step))
        finally:
            with self._lock:
                self._pending.pop(step, None)
        return self._find(step)

    def export_for_inference(self, step: int | str, dest: PathLike, use_ema: bool = False,
                             max_shard_size: int = 5 << 30) -> str:
        """Write checkpoint ``step``'s model weights as a Hugging Face style folder
        (``model.safetensors`` or shards plus ``model.safetensors.index.json``,
        ``training_metadata.json``, ``README.md``). The weights are
        ``state["model"]`` (``state["ema_model"]`` with ``use_ema``) as
        :class:`~fastckpt.TrainingState` saves them. Returns ``dest``."""
        return export.export_for_inference(
            self._find(step).path, os.fspath(dest), use_ema=use_ema,
            max_shard_size=max_shard_size,
        )

    # -- lifecycle ----------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every save made so far has committed (or failed) and its
        housekeeping (removals, backups) is done; raises ``TimeoutError`` after
        ``timeout`` s. Save failures are raised by their handles, not here."""
        with self._lock:
            jobs = list(self._jobs)
        _, pending = cf.wait(jobs, timeout=timeout)
        if pending:
            raise TimeoutError(f"{len(pending)} saves in {self.root} still running")

    def close(self) -> None:
        """Wait for saves and housekeeping, then stop (closing an owned engine)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.wait()
        self._housekeeper.shutdown(wait=True)
        if self._owns_checkpointer:
            self._ckpt.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _open_root(root: PathLike) -> str:
    root = os.path.abspath(os.fspath(root))
    if os.path.lexists(root) and not os.path.isdir(root):
        raise CheckpointError(f"{root} exists and is not a directory")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {root}: {e}") from e
    return root


def _check_step(step: Any, name: str, minimum: int = 0) -> int:
    if isinstance(step, bool) or not isinstance(step, Integral) or step < minimum:
        raise InvalidArgumentError(f"{name} must be an int >= {minimum}, got {step!r}")
    return int(step)


def _check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    metrics = dict(metrics or {})
    bad = [k for k in metrics if not isinstance(k, str)]
    if bad:
        raise InvalidArgumentError(f"metric names must be str, got {bad[:3]}")
    return metrics


def _check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    tags = (tags,) if isinstance(tags, str) else tuple(tags)
    if not all(isinstance(t, str) for t in tags):
        raise InvalidArgumentError(f"tags must be strings, got {tags!r}")
    return tags
