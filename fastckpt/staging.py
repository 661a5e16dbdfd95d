"""Staging: snapshot tensors into reusable (pinned when CUDA is present) buffers.

This is the only part of a save that runs on the caller's thread besides planning.
Each shard's data section is cut into blocks of at most ``block_bytes``; a block is
filled with the bytes of the tensors it covers and handed to the shard's writer,
which returns the buffer to the pool once it is on disk. The pool never holds
more than its budget, so a state larger than the budget is staged in pieces while
the writers drain the earlier ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from . import fileio
from .plan import ShardPlan, Stored

MIN_CAPACITY = 1 << 20
# Whole blocks go to the disk with O_DIRECT from where they lie.
ALIGN = fileio.DIRECT_ALIGN


def _capacity(nbytes: int, cap_max: int) -> int:
    cap = MIN_CAPACITY
    while cap < nbytes:
        cap <<= 1
    return max(nbytes, min(cap, cap_max))


class StagingPool:
    """Buffers reused across saves, bounded in total by ``budget`` bytes.

    Buffers come in power-of-two size classes so that repeated saves of the same
    state find exactly the buffers they used last time (pinned allocation is slow).
    """

    def __init__(self, budget: int, pin: bool) -> None:
        self.budget = budget
        self.block_bytes = max(ALIGN, min(64 << 20, budget) // ALIGN * ALIGN)
        self.pin = pin
        self._cv = threading.Condition()
        self._free: dict[int, list[torch.Tensor]] = {}
        self._allocated = 0

    @property
    def allocated(self) -> int:
        """Bytes currently held by the pool (free or in use)."""
        return self._allocated

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes``; waits while the budget is exhausted."""
        cap = _capacity(nbytes, self.block_bytes)
        with self._cv:
            while True:
                free = self._free.get(cap)
                if free:
                    return free.pop()
                if self._allocated + cap <= self.budget:
                    self._allocated += cap
                    break
                if not self._drop_one_free():
                    self._cv.wait()
        try:
            return _aligned_empty(cap, self.pin)
        except BaseException:
            with self._cv:
                self._allocated -= cap
                self._cv.notify_all()
            raise

    def fits(self, shards: list[ShardPlan]) -> bool:
        """Whether every block of ``shards`` can be held at once within the budget."""
        need = 0
        for shard in shards:
            full, tail = divmod(shard.data_bytes, self.block_bytes)
            need += full * self.block_bytes + (_capacity(tail, self.block_bytes) if tail else 0)
        return need <= self.budget

    def _drop_one_free(self) -> bool:
        # Free buffers of another size class stand in the way: release one.
        for cap, bufs in self._free.items():
            if bufs:
                bufs.pop()
                self._allocated -= cap
                return True
        return False

    def release(self, buf: torch.Tensor) -> None:
        with self._cv:
            self._free.setdefault(buf.numel(), []).append(buf)
            self._cv.notify_all()

    def clear(self) -> None:
        """Drop every free buffer (in-use ones return and stay until the next clear)."""
        with self._cv:
            while self._drop_one_free():
                pass


def _aligned_empty(nbytes: int, pin: bool) -> torch.Tensor:
    """An uninitialised uint8 buffer starting on a page boundary, as O_DIRECT writes
    from it need. Pinned memory already is; CPU memory comes from
    :func:`fileio.io_buffer`, on huge pages where the kernel allows."""
    if pin:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return torch.frombuffer(fileio.io_buffer(nbytes), dtype=torch.uint8)


@dataclass
class Block:
    """A filled staging buffer: ``pieces`` are (stored, src_start, src_stop, dst_offset)."""

    buf: torch.Tensor
    nbytes: int
    pieces: list[tuple[Stored, int, int, int]] = field(default_factory=list)
    events: list[torch.cuda.Event] = field(default_factory=list)

    def ready(self) -> memoryview:
        """Wait for any device-to-host copy into the block, then expose its bytes."""
        for ev in self.events:
            ev.synchronize()
        return memoryview(self.buf[: self.nbytes].numpy())


class Stager:
    """Copies stored tensors into pool blocks; GPU tensors go device-to-host on a side
    stream of their own device, ordered after the work already queued there."""

    def __init__(self, pool: StagingPool) -> None:
        self.pool = pool
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def stage_shard(self, shard: ShardPlan, emit: Callable[[Block], None]) -> None:
        """Fill blocks covering ``shard``'s data section in order, passing each to ``emit``."""
        total, offset, i = shard.data_bytes, 0, 0
        members = [s for s in shard.stored if s.nbytes]
        sources: dict[str, torch.Tensor] = {}
        while offset < total:
            n = min(self.pool.block_bytes, total - offset)
            block = Block(self.pool.acquire(n), n)
            try:
                while i < len(members) and members[i].start < offset + n:
                    s = members[i]
                    a, b = max(s.start, offset) - s.start, min(s.stop, offset + n) - s.start
                    self._copy(s, a, b, block, s.start + a - offset, sources)
                    if s.stop > offset + n:
                        break  # the tensor continues in the next block
                    i += 1
                block.events = self._record(block)
            except BaseException:
                self.pool.release(block.buf)
                raise
            emit(block)
            offset += n

    def _copy(self, s: Stored, a: int, b: int, block: Block, dst: int, sources: dict) -> None:
        src = s.source
        out = block.buf[dst : dst + (b - a)]
        cuda = src.device.type == "cuda"
        with torch.cuda.stream(self._stream(src.device)) if cuda else nullcontext():
            if not src.is_contiguous() and a == 0 and b == s.nbytes:
                out.view(src.dtype).view(src.shape).copy_(src, non_blocking=cuda)
            else:
                flat = _flat_bytes(s, sources)
                out.copy_(flat[a:b], non_blocking=cuda)
        block.pieces.append((s, a, b, dst))

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        # The copy must see every kernel the caller queued before save().
        stream.wait_stream(torch.cuda.current_stream(device))
        return stream

    def _record(self, block: Block) -> list:
        devices = {s.source.device for s, *_ in block.pieces if s.source.device.type == "cuda"}
        events = []
        for dev in devices:
            ev = torch.cuda.Event()
            ev.record(self._streams[dev])
            events.append(ev)
        return events

    def synchronize(self) -> None:
        """Block until every copy issued so far is complete (the snapshot point)."""
        for stream in self._streams.values():
            stream.synchronize()


def _flat_bytes(s: Stored, cache: dict) -> torch.Tensor:
    flat = cache.get(s.name)
    if flat is None:
        # A non-contiguous tensor split across blocks is made contiguous once.
        src = s.source if s.source.is_contiguous() else s.source.contiguous()
        flat = src.reshape(-1).view(torch.uint8)
        cache[s.name] = flat
    return flat
