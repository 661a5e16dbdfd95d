"""Damaged checkpoints: verify reports, load(verify=True) raises, nothing loads silently wrong."""

import gc
import json
import os
import random
import re
import sys
import threading

import pytest
import torch
from conftest import data_start, edit_manifest, flip_bit, shards

import fastckpt
from fastckpt import manifest, reader
from fastckpt.manifest import MANIFEST_NAME


@pytest.fixture
def saved(ckpt):
    obj = {"a": torch.randn(1000), "b": torch.arange(300, dtype=torch.int32)}
    with fastckpt.Checkpointer(shard_size=2000) as c:  # two shards
        c.save(obj, ckpt).wait(timeout=60)
    return ckpt, obj


def expect_damage(path, match):
    report = fastckpt.verify(path)
    assert not report.ok and any(match in p for p in report.problems), report.problems
    with pytest.raises(fastckpt.CorruptCheckpointError):
        fastckpt.load(path, verify=True)


def test_clean_checkpoint_verifies(saved):
    path, _ = saved
    report = fastckpt.verify(path)
    assert report.ok and report.problems == [] and report.nbytes > 0


def test_random_bit_flips_in_data_are_detected(saved):
    path, _ = saved
    rng = random.Random(0)
    for _ in range(20):
        f = rng.choice(shards(path))
        off = rng.randrange(data_start(f), os.path.getsize(f))
        bit = rng.randrange(8)
        flip_bit(f, off, bit)
        expect_damage(path, "checksum mismatch")
        flip_bit(f, off, bit)
        assert fastckpt.verify(path).ok


def test_bit_flip_in_header_is_detected(saved):
    path, _ = saved
    f = shards(path)[0]
    flip_bit(f, 20, 1)
    report = fastckpt.verify(path)
    assert not report.ok, report.problems
    with pytest.raises(fastckpt.CorruptCheckpointError):
        fastckpt.load(path)  # even without verify: the header no longer matches


def test_header_padding_flip_is_detected(saved):
    path, _ = saved
    f = shards(path)[0]
    flip_bit(f, data_start(f) - 1, 0)  # a padding space becomes '!': still "valid" JSON?
    assert not fastckpt.verify(path).ok


def test_truncated_shard(saved):
    path, _ = saved
    f = shards(path)[1]
    os.truncate(f, os.path.getsize(f) - 10)
    expect_damage(path, "size")
    with pytest.raises(fastckpt.CorruptCheckpointError, match=os.path.basename(f)):
        fastckpt.load(path)


def test_missing_shard(saved):
    path, _ = saved
    os.remove(shards(path)[0])
    expect_damage(path, "missing")


def test_swapped_shards(saved):
    path, _ = saved
    a, b = shards(path)
    os.rename(a, a + ".tmp")
    os.rename(b, a)
    os.rename(a + ".tmp", b)
    report = fastckpt.verify(path)
    assert not report.ok
    with pytest.raises(fastckpt.CorruptCheckpointError):
        fastckpt.load(path)


def test_zeroed_range(saved):
    path, _ = saved
    f = shards(path)[0]
    with open(f, "r+b") as fh:
        fh.seek(data_start(f) + 16)
        fh.write(bytes(64))
    expect_damage(path, "checksum mismatch")


def test_manifest_not_json(saved):
    path, _ = saved
    with open(os.path.join(path, MANIFEST_NAME), "w") as f:
        f.write("{not json")
    with pytest.raises(fastckpt.CorruptCheckpointError, match="not valid JSON"):
        fastckpt.load(path)
    assert gc.isenabled()  # paused while the manifest was decoded, on again after the error
    assert not fastckpt.verify(path).ok


def test_manifest_reads_on_many_threads_leave_the_gc_on(saved):
    """The collector's pause is shared by threads: a reader entering while another
    leaves must not leave it off. With a thread switch near every bytecode, a pause
    that each reader takes on its own is left off in about one round in fifty."""
    path, _ = saved

    def read_many():
        manifest.read(str(path), lazy=True)
        for _ in range(200):
            with manifest._collector_paused():
                pass

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(500):
            threads = [threading.Thread(target=read_many) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert gc.isenabled()
    finally:
        sys.setswitchinterval(interval)
        gc.enable()


def test_manifest_read_leaves_a_disabled_gc_disabled(saved):
    path, _ = saved
    gc.disable()
    try:
        fastckpt.load(path)
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["shards"][0].update(file="../../etc/passwd"), "bad shard file name"),
        (lambda d: d["shards"][0].update(file="/abs/shard-00001-of-00002.safetensors"),
         "bad shard file name"),
        (lambda d: d["tensors"]["a"].update(shape=[10**12]), "cannot hold"),
        (lambda d: d["tensors"]["a"].update(offsets=[0, 8]), "cannot hold"),
        (lambda d: d["tensors"]["a"].update(dtype="evil"), "unknown dtype"),
        (lambda d: d["tensors"]["a"].update(shard=9), "bad shard index"),
        (lambda d: d["refs"].append({"tensor": "nope"}), "bad tensor reference"),
        (lambda d: d["tree"].update({"$dict": [["x", {"$tensor": 99}]]}), "tensor #99"),
        (lambda d: d["tree"].update({"$dict": [["x", {"$pickle": "..."}]]}), "unknown tree tag"),
        (lambda d: d.update(format="other"), "not a fastckpt manifest"),
    ],
)
def test_lying_manifest(saved, edit, match):
    """A manifest sealed with a fresh checksum over bad content: load refuses it and
    verify reports the same problem, the trees included."""
    path, _ = saved
    edit_manifest(path, edit)
    with pytest.raises(fastckpt.CorruptCheckpointError, match=match):
        fastckpt.load(path)
    report = fastckpt.verify(path)
    assert any(re.search(match, p) for p in report.problems), report.problems


def _swap_offsets(doc):
    a, b = doc["tensors"]["a"], doc["tensors"]["b"]
    a["offsets"], b["offsets"] = b["offsets"], a["offsets"]


@pytest.mark.parametrize("edit, like", [
    (lambda d: d["tensors"]["a"].update(dtype="int32"), torch.zeros(16, dtype=torch.int32)),
    (lambda d: d["tensors"]["a"].update(shape=[4, 4]), torch.zeros(4, 4)),
    (_swap_offsets, torch.zeros(16)),
])
def test_lying_manifest_read_lazily(ckpt, edit, like):
    """A sealed manifest that lies about a tensor within its shard's bounds: the lazy
    paths (open, load_into) check the shard's own header entry too, as load does."""
    fastckpt.save({"a": torch.randn(16), "b": torch.arange(16, dtype=torch.int32)},
                  ckpt).wait(timeout=60)
    edit_manifest(ckpt, edit)
    for verify in (False, True):
        with fastckpt.open(ckpt, verify=verify) as r, \
                pytest.raises(fastckpt.CorruptCheckpointError, match="'a' disagrees"):
            r["a"]
    with pytest.raises(fastckpt.CorruptCheckpointError, match="'a' disagrees"):
        fastckpt.load_into(ckpt, {"a": like}, strict=False)
    with pytest.raises(fastckpt.CorruptCheckpointError):
        fastckpt.load(ckpt)


def test_shard_header_entry_nested_elsewhere_is_not_taken(ckpt):
    """The manifest's entry for 'a' copied into __metadata__ while the header's own
    entry says otherwise: the lazy read must not take the nested copy for it."""
    fastckpt.save({"a": torch.randn(16), "b": torch.arange(16, dtype=torch.int32)},
                  ckpt).wait(timeout=60)
    f = shards(ckpt)[0]
    with open(f, "rb") as fh:
        raw = fh.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["a"] = dict(header["a"])
    header["a"]["dtype"] = "I32"
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    with open(f, "wb") as fh:
        fh.write(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    edit_manifest(ckpt, lambda d: d["shards"][0].update(size=os.path.getsize(f)))
    with fastckpt.open(ckpt) as r, pytest.raises(fastckpt.CorruptCheckpointError, match="'a'"):
        r["a"]


def test_lying_manifest_read_lazily_after_many_reads(ckpt):
    """Past reader.HEADER_SEARCHES reads from one shard its header is parsed instead of
    searched: a lie is still caught."""
    n = reader.HEADER_SEARCHES + 8
    fastckpt.save({f"t{i:03d}": torch.full((4,), float(i)) for i in range(n)},
                  ckpt).wait(timeout=60)
    edit_manifest(ckpt, lambda d: d["tensors"][f"t{n - 1:03d}"].update(shape=[2, 2]))
    with fastckpt.open(ckpt) as r:
        for i in range(n - 1):
            assert r[f"t{i:03d}"][0] == i
        with pytest.raises(fastckpt.CorruptCheckpointError, match="disagrees"):
            r[f"t{n - 1:03d}"]


@pytest.mark.parametrize("view", [
    {"shape": [1], "stride": [2**63]},
    {"shape": [0, 2**63], "stride": [1, 1]},
    {"offset": 2**63, "shape": [0], "stride": [1]},
])
def test_view_beyond_int64_is_refused(ckpt, view):
    w = torch.randn(4, 4)
    fastckpt.save({"w": w, "row": w[1]}, ckpt).wait(timeout=60)
    edit_manifest(ckpt, lambda d: d["refs"][1]["view"].update(view))
    with fastckpt.open(ckpt) as r, pytest.raises(fastckpt.CorruptCheckpointError, match="bad view"):
        r["row"]
    with pytest.raises(fastckpt.CorruptCheckpointError, match="bad view"):
        fastckpt.load(ckpt)


def test_lying_header_offsets(saved):
    path, _ = saved
    f = shards(path)[0]
    with open(f, "rb") as fh:
        raw = fh.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    body = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(body) == n
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(body)
    with pytest.raises(fastckpt.CorruptCheckpointError, match="disagrees"):
        fastckpt.load(path)


def test_absurd_header_length(saved):
    path, _ = saved
    f = shards(path)[0]
    with open(f, "r+b") as fh:
        fh.write((2**62).to_bytes(8, "little"))
    with pytest.raises(fastckpt.CorruptCheckpointError, match="header length"):
        fastckpt.load(path)


def test_newer_format_version(saved):
    path, _ = saved
    edit_manifest(path, lambda d: d.update(format_version=99))
    with pytest.raises(fastckpt.IncompatibleCheckpointError, match="99"):
        fastckpt.load(path)


def test_uncommitted_directory(tmp_path):
    d = tmp_path / "half"
    d.mkdir()
    (d / "shard-00001-of-00001.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(fastckpt.CheckpointNotFoundError, match="not a committed"):
        fastckpt.load(d)
    with pytest.raises(fastckpt.CheckpointNotFoundError):
        fastckpt.load(tmp_path / "missing")
