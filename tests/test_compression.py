"""Compressed checkpoints: transparent round trips through every read path, still
valid safetensors, and damage to payloads or chunk tables caught by key."""

import glob
import os

import pytest
import safetensors.torch
import torch
from conftest import assert_same, edit_manifest

import fastckpt


def weights():
    g = torch.Generator().manual_seed(0)
    return {
        "w_bf16": (torch.randn(512, 300, generator=g) * 0.02).to(torch.bfloat16),
        "w_f32": torch.randn(200, 256, generator=g) * 0.02,
        "ids": torch.randint(0, 50, (40000,), generator=g),
        "tiny": torch.randn(7),  # left raw
        "big": torch.randn(3 << 20, generator=g) * 1e-3,  # spans staging blocks
        "zeros": torch.zeros(100_000),
        "meta": {"step": 3, "t": (1, 2)},
    }


@pytest.fixture
def saved(ckpt):
    obj = weights()
    with fastckpt.Checkpointer(compression="zstd", staging_budget=4 << 20,
                               shard_size=2 << 20) as c:
        r = c.save(obj, ckpt).wait(timeout=120)
    return ckpt, obj, r


def test_auto_compression_round_trips(ckpt):
    """compression="auto" stores each chunk compressed or raw, as the encoders keep up;
    either way every read path gives the exact state back and verify passes."""
    obj = weights()
    with fastckpt.Checkpointer(compression="auto", staging_budget=4 << 20,
                               shard_size=2 << 20) as c:
        c.save(obj, ckpt).wait(timeout=120)
    m = fastckpt.manifest.read(ckpt)
    assert m.tensor("big").codec is not None and m.tensor("tiny").codec is None
    assert m.disk_bytes <= m.nbytes
    for mmap in (True, False):
        assert_same(obj, fastckpt.load(ckpt, mmap=mmap, verify=True))
    assert fastckpt.verify(ckpt).ok


@pytest.mark.parametrize("compression", ["zstd", "auto"])
def test_compressed_tensors_after_odd_sized_raw_ones(ckpt, compression):
    """Raw tensors of odd byte sizes lie before the compressed ones: each compressed
    tensor, contiguous or not, must still be staged and cut into blocks of whole
    elements (small staging blocks make the cuts fall inside tensors)."""
    g = torch.Generator().manual_seed(1)
    obj = {"flag": torch.ones(3, dtype=torch.bool), "n": torch.ones(5, dtype=torch.int16),
           "w": torch.randn(1 << 20, generator=g),
           "t": torch.randn(300, 200, generator=g).t(),
           "h": torch.randn(700_001, generator=g).to(torch.bfloat16)}
    with fastckpt.Checkpointer(compression=compression, staging_budget=2 << 20) as c:
        c.save(obj, ckpt).wait(timeout=120)
    assert fastckpt.manifest.read(ckpt).tensor("w").codec is not None
    for mmap in (True, False):
        assert_same(obj, fastckpt.load(ckpt, mmap=mmap, verify=True))


def test_round_trip_every_read_path(saved):
    path, obj, _ = saved
    for mmap in (True, False):
        assert_same(obj, fastckpt.load(path, mmap=mmap))
        assert_same(obj, fastckpt.load(path, mmap=mmap, verify=True))
    with fastckpt.open(path) as r:
        assert torch.equal(r["w_bf16"], obj["w_bf16"])
    target = {k: torch.empty_like(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    target["meta"] = {}
    assert fastckpt.load_into(path, target, strict=False).mismatched == []
    for k, v in target.items():
        if k != "meta":
            assert torch.equal(v, obj[k]), k
    assert fastckpt.verify(path).ok


def test_smaller_on_disk_and_recorded(saved):
    path, obj, _ = saved
    m = fastckpt.manifest.read(path)
    assert m.disk_bytes < 0.9 * m.nbytes
    assert m.tensor("zeros").codec is not None and m.tensor("tiny").codec is None
    assert m.tensor("zeros").stop - m.tensor("zeros").start < 4000


def test_compressed_shards_are_valid_safetensors(saved):
    path, obj, _ = saved
    m = fastckpt.manifest.read(path)
    seen = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        seen.update(safetensors.torch.load_file(f))
    for name, t in m.tensors.items():
        if t.codec is None:
            assert torch.equal(seen[name], obj[name])
        else:  # the payload, as bytes
            assert seen[name].dtype == torch.uint8 and seen[name].numel() == t.stop - t.start


def _payload_offset(path, name):
    m = fastckpt.manifest.read(path)
    t = m.tensor(name)
    f = os.path.join(path, m.shards[t.shard].file)
    with open(f, "rb") as fh:
        start = 8 + int.from_bytes(fh.read(8), "little")
    return f, start + t.start, t


def test_corrupt_payload_names_the_key(saved):
    path, _, _ = saved
    f, off, t = _payload_offset(path, "w_bf16")
    with open(f, "r+b") as fh:
        fh.seek(off + 40)
        b = fh.read(1)
        fh.seek(off + 40)
        fh.write(bytes([b[0] ^ 0x10]))
    report = fastckpt.verify(path)
    assert not report.ok and any("w_bf16" in p for p in report.problems)
    with pytest.raises(fastckpt.CorruptCheckpointError, match="w_bf16"):
        fastckpt.load(path, verify=True)
    # Without verify the decoder and the decoded-bytes checksum still catch it.
    with pytest.raises(fastckpt.CorruptCheckpointError, match="w_bf16"):
        fastckpt.load(path)


@pytest.mark.parametrize("edit", [
    lambda c: c["chunks"][0].update(raw=c["chunks"][0]["raw"] + 4),
    lambda c: c["chunks"][0].update(enc=c["chunks"][0]["enc"] - 1),
    lambda c: c["chunks"].append(dict(c["chunks"][-1])),
    lambda c: c["chunks"][0].update(raw=1 << 40),  # decompression bomb
    lambda c: c.update(codec="lz4"),
], ids=["raw+4", "enc-1", "extra-chunk", "bomb", "unknown-codec"])
def test_lying_chunk_table(saved, edit):
    path, _, _ = saved
    edit_manifest(path, lambda d: edit(d["tensors"]["zeros"]["codec"]))
    with pytest.raises(fastckpt.CorruptCheckpointError, match="zeros"):
        fastckpt.load(path)


def test_wrong_decoded_checksum_is_caught(saved):
    path, _, _ = saved
    edit_manifest(path, lambda d: d["tensors"]["ids"].update(raw_checksum="0" * 16))
    with pytest.raises(fastckpt.CorruptCheckpointError, match="decoded checksum mismatch.*ids"):
        fastckpt.load(path)


def test_per_save_override_and_levels(tmp_path):
    obj = {"x": torch.zeros(1 << 18)}
    with fastckpt.Checkpointer() as c:
        c.save(obj, tmp_path / "plain").wait(timeout=60)
        c.save(obj, tmp_path / "z", compression="zstd", compression_level=3).wait(timeout=60)
    assert fastckpt.manifest.read(tmp_path / "plain").tensor("x").codec is None
    assert fastckpt.manifest.read(tmp_path / "z").tensor("x").codec["level"] == 3
    assert torch.equal(fastckpt.load(tmp_path / "z")["x"], obj["x"])
    with pytest.raises(ValueError, match="unknown compression"):
        fastckpt.Checkpointer(compression="lz4")


def test_writer_starts_encoding_the_next_queued_block_first():
    """A compressed shard's writer queues the chunks of the next block already staged
    before it writes the current one (the encoders then run while it waits for the
    disk), and never waits for the stager while it holds a block: with a budget of one
    block, as in ``saved``, that would deadlock."""
    import queue
    from types import SimpleNamespace

    from fastckpt import writer

    started = []
    encoder = SimpleNamespace(start=lambda s, piece: started.append(s.name) or SimpleNamespace())

    def block(name):
        buf = torch.zeros(8, dtype=torch.uint8)
        stored = SimpleNamespace(name=name, compress=True)
        return SimpleNamespace(buf=buf, pieces=[(stored, 0, 8, 0)],
                               ready=lambda: memoryview(buf.numpy()))

    q = queue.Queue()
    q.put(block("a"))
    q.put(block("b"))
    jobs = writer._started(q, encoder)
    assert next(jobs).block.pieces[0][0].name == "a" and started == ["a", "b"]
    assert next(jobs).block.pieces[0][0].name == "b"  # nothing more queued: no wait
    q.put(block("c"))
    q.put(None)
    assert [j.block.pieces[0][0].name for j in jobs] == ["c"] and started == ["a", "b", "c"]
