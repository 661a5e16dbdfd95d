"""The exception hierarchy: every failure fastckpt reports is a ``CheckpointError``."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by fastckpt."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path holds no committed checkpoint (missing, or a save never finished)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's bytes do not match what its manifest promises (bad checksum,
    truncated or malformed shard, lying header, invalid manifest)."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint was written by a format version this fastckpt cannot read."""


class CheckpointWriteError(CheckpointError):
    """A save failed in the background (or while committing); the OS error, if any,
    is chained as ``__cause__``. The previous checkpoint at the path is untouched."""


class UnsupportedTypeError(CheckpointError, TypeError):
    """``save()`` met a value it cannot store without pickle; names the key path."""


class InvalidArgumentError(CheckpointError, ValueError):
    """An argument is out of range or of the wrong kind (a negative step, an unknown
    retention mode, ...)."""


class StepExistsError(CheckpointError):
    """A checkpoint manager already holds (or is saving) this step; pass ``force=True``
    to replace it."""


class MetricError(InvalidArgumentError):
    """A checkpoint manager ranks checkpoints by a metric the save did not provide (or
    provided as something other than a real number)."""
