"""Retention: which checkpoints a manager keeps, and which one is best.

A pure function of the committed checkpoints, so it can be re-evaluated after any
change (a new save, a hand-deleted directory, a restart) and always agrees with
what is on disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Protocol

from .errors import InvalidArgumentError

KEEP_TAG = "keep"


class Entry(Protocol):
    step: int
    time: float
    metrics: dict[str, Any]
    tags: tuple[str, ...]


def metric_value(metrics: dict[str, Any], name: str) -> Real | None:
    """``metrics[name]`` as a number to rank by, or None when it is missing, not a
    real number, or NaN. An int stays an int: one too large for a float (a Python
    int has no bound) still compares exactly with floats, where converting it
    would raise ``OverflowError``."""
    v = metrics.get(name)
    if isinstance(v, bool) or not isinstance(v, Real) or v != v:  # v != v: NaN
        return None
    return int(v) if isinstance(v, Integral) else float(v)


def rank(entries: Iterable[Entry], metric: str, mode: str) -> list[Entry]:
    """Entries holding ``metric`` (see :func:`metric_value`), best first by ``mode``
    (``"min"`` or ``"max"``); among equals the later step first, an entry without a
    step counting as step 0, then the earlier listed."""
    entries = list(entries)
    # Negated rather than scaled by -1.0, which would turn a huge int into a float.
    scored = [(v if mode == "min" else -v, -(e.step or 0), i) for i, e in enumerate(entries)
              if (v := metric_value(e.metrics, metric)) is not None]
    return [entries[i] for *_, i in sorted(scored)]


def _positive(name: str, v: Any, kind: type = int) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, kind) or v <= 0):
        raise InvalidArgumentError(f"{name} must be a positive {kind.__name__} or None, got {v!r}")


@dataclass(frozen=True)
class RetentionPolicy:
    """The retention rules of a :class:`~fastckpt.CheckpointManager`.

    Pruning happens only when ``keep_last`` or ``keep_best`` is set; the other rules
    protect checkpoints from it. A checkpoint is kept when any rule keeps it:

    - the latest checkpoint, always (training must be able to resume);
    - the ``keep_last`` most recent steps;
    - the ``keep_best`` best by ``metric`` (``mode`` ``"min"`` or ``"max"``);
    - every step that is a multiple of ``keep_every``;
    - the first checkpoint, then each one at least ``keep_every_seconds`` after the
      previous one this rule kept;
    - anything tagged ``"keep"``.
    """

    keep_last: int | None = None
    keep_best: int | None = None
    metric: str = "val_loss"
    mode: str = "min"
    keep_every: int | None = None
    keep_every_seconds: float | None = None

    def __post_init__(self) -> None:
        _positive("keep_last", self.keep_last)
        _positive("keep_best", self.keep_best)
        _positive("keep_every", self.keep_every)
        _positive("keep_every_seconds", self.keep_every_seconds, Real)
        if self.mode not in ("min", "max"):
            raise InvalidArgumentError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if not isinstance(self.metric, str):
            raise InvalidArgumentError(f"metric must be a str, got {self.metric!r}")

    def value(self, metrics: dict[str, Any]) -> Real | None:
        """The ranking metric (see :func:`metric_value`), or None when it is missing,
        not a real number, or NaN (such a checkpoint is never ranked, so never
        "best")."""
        return metric_value(metrics, self.metric)

    def ranked(self, entries: Iterable[Entry]) -> list[Entry]:
        """Entries holding the metric, best first; among equals the later step first."""
        return rank(entries, self.metric, self.mode)

    def improves(self, value: Real, entries: Iterable[Entry]) -> bool:
        """True if ``value`` is strictly better than every ranked entry's."""
        ranked = self.ranked(entries)
        if not ranked:
            return True
        best = self.value(ranked[0].metrics)
        return value < best if self.mode == "min" else value > best

    def keep(self, entries: Sequence[Entry]) -> set[int]:
        """Steps to keep among ``entries`` (all of them when nothing prunes)."""
        by_step = sorted(entries, key=lambda e: e.step)
        if self.keep_last is None and self.keep_best is None:
            return {e.step for e in by_step}
        kept = {e.step for e in by_step[-(self.keep_last or 1):]}
        if self.keep_best:
            kept |= {e.step for e in self.ranked(by_step)[: self.keep_best]}
        if self.keep_every:
            kept |= {e.step for e in by_step if e.step % self.keep_every == 0}
        kept |= self._spaced(by_step)
        kept |= {e.step for e in by_step if KEEP_TAG in e.tags}
        return kept

    def _spaced(self, by_step: Sequence[Entry]) -> set[int]:
        if not self.keep_every_seconds:
            return set()
        kept, anchor = set(), None
        for e in by_step:
            if anchor is None or e.time - anchor >= self.keep_every_seconds:
                kept.add(e.step)
                anchor = e.time
        return kept
