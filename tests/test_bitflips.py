"""Corruption: random single-bit flips, truncation, zeroed ranges, swapped shards and
edited manifests are all reported by ``verify`` and refused by ``load(verify=True)``.

Flips are made in place and undone, so thousands of them cost one checkpoint.
"""

import os
import pathlib
import random
import shutil

import pytest
import torch
from conftest import assert_same, data_start, edit_manifest, flip_bit, shards

import fastckpt
from fastckpt.errors import CorruptCheckpointError
from fastckpt.manifest import MANIFEST_NAME

SHARD_FLIPS = {"quick": 300, "long": 3000}
MANIFEST_FLIPS = {"quick": 150, "long": 1000}


def make_state():
    g = torch.Generator().manual_seed(0)
    # Equal-sized shards (same names' lengths, dtypes and shapes), so that swapping two
    # keeps every file size right and only the contents can tell.
    tensors = {}
    for s in "abc":
        tensors[f"{s}f"] = torch.randn(2048, generator=g)
        tensors[f"{s}i"] = torch.randint(-(2**40), 2**40, (1024,), generator=g)
    return {"step": 1234, "lr": 0.25, "model": tensors, "names": ["x", "y"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bitflips") / "ckpt")
    obj = make_state()
    with fastckpt.Checkpointer(shard_size=16 << 10) as c:
        c.save(obj, path, metadata={"epoch": 3}).wait(timeout=60)
    assert len(shards(path)) == 3 and len({os.path.getsize(f) for f in shards(path)}) == 1
    return path, obj


def detected(path):
    """Whether verify reports the damage and load(verify=True) refuses it. Any other
    exception than a CheckpointError fails the test."""
    reported = not fastckpt.verify(path).ok
    try:
        fastckpt.load(path, verify=True)
    except fastckpt.CheckpointError:
        return reported
    return False


def loads_unverified(path):
    try:
        fastckpt.load(path, verify=False)
    except fastckpt.CheckpointError:
        return False
    return True


def test_single_bit_flips_in_shards(saved, profile, figures):
    path, _ = saved
    rng = random.Random(f"shards/{profile}")
    files = shards(path)
    for _ in range(SHARD_FLIPS[profile]):
        f = rng.choice(files)
        region = rng.choice(("header", "data"))
        lo, hi = (0, data_start(f)) if region == "header" else (data_start(f), os.path.getsize(f))
        offset, bit = rng.randrange(lo, hi), rng.randrange(8)
        flip_bit(f, offset, bit)
        try:
            assert detected(path), f"flip of bit {bit} at {offset} in {f} went unnoticed"
            # For the record: what a load without checksums lets through.
            figures[f"bitflips.shard_{region}.passed_verify_false"] += loads_unverified(path)
        finally:
            flip_bit(f, offset, bit)
        figures[f"bitflips.shard_{region}.detected"] += 1
    assert fastckpt.verify(path).ok  # every flip was undone


def manifest_outcome(path, obj):
    """How a damaged manifest fares: "detected" (verify reports it and load refuses),
    "unverified" (load refuses but verify passes), or, when load accepts it,
    "harmless" (the same state loads) or "silently_wrong"."""
    reported = not fastckpt.verify(path).ok
    try:
        out = fastckpt.load(path, verify=True)
    except fastckpt.CheckpointError:
        return "detected" if reported else "unverified"
    try:
        assert_same(out, obj)
    except AssertionError:
        return "silently_wrong"
    return "harmless"


def test_single_bit_flips_in_manifest(saved, profile, figures):
    path, obj = saved
    rng = random.Random(f"manifest/{profile}")
    m = os.path.join(path, MANIFEST_NAME)
    missed = []
    for _ in range(MANIFEST_FLIPS[profile]):
        offset, bit = rng.randrange(os.path.getsize(m)), rng.randrange(8)
        flip_bit(m, offset, bit)
        try:
            outcome = manifest_outcome(path, obj)
            # For the record: the manifest's own digest is checked on every read.
            figures["bitflips.manifest.passed_verify_false"] += loads_unverified(path)
        finally:
            flip_bit(m, offset, bit)
        figures[f"bitflips.manifest.{outcome}"] += 1
        if outcome != "detected":
            missed.append((offset, bit, outcome))
    assert fastckpt.verify(path).ok
    assert not missed, f"{len(missed)} manifest flips went unnoticed, e.g. {missed[:5]}"


# -- coarser damage, on a fresh copy each --------------------------------------------


@pytest.fixture
def fresh(saved, tmp_path):
    path, obj = saved
    dst = str(tmp_path / "ckpt")
    shutil.copytree(path, dst)
    return dst, obj


def expect_refused(path, figures, kind):
    assert detected(path), kind
    figures[f"corruption.{kind}.detected"] += 1


def test_truncation_anywhere(fresh, figures):
    path, _ = fresh
    f = shards(path)[1]
    full = pathlib.Path(f).read_bytes()
    for size in sorted({0, 7, 8, 9, data_start(f) - 1, data_start(f), len(full) - 1}
                       | set(random.Random(1).sample(range(len(full)), 20))):
        os.truncate(f, size)
        expect_refused(path, figures, "truncate")
        with pytest.raises(CorruptCheckpointError):
            fastckpt.load(path, verify=False)  # the size alone gives it away
        with open(f, "wb") as fh:
            fh.write(full)


def test_zeroed_ranges(fresh, figures):
    path, _ = fresh
    rng = random.Random(2)
    for f in shards(path):
        full = pathlib.Path(f).read_bytes()
        for _ in range(10):
            start = rng.randrange(len(full) - 1)
            stop = min(len(full), start + rng.choice((1, 8, 512, 4096)))
            if not any(full[start:stop]):
                continue  # already zero: nothing damaged
            with open(f, "r+b") as fh:
                fh.seek(start)
                fh.write(bytes(stop - start))
            expect_refused(path, figures, "zeroed_range")
            with open(f, "wb") as fh:
                fh.write(full)


def test_swapped_equal_size_shards(fresh, figures):
    path, _ = fresh
    a, b = shards(path)[:2]
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)
    expect_refused(path, figures, "swapped_shards")
    with pytest.raises(CorruptCheckpointError, match="disagree"):
        fastckpt.load(path, verify=False)  # the headers name other tensors


def _zero_digest(entry):
    entry["checksum"] = "0" * len(entry["checksum"])


# Edits that the data's own digests expose even when the manifest is sealed again.
DATA_EDITS = {
    "tensor checksum": lambda d: _zero_digest(d["tensors"]["model/bf"]),
    "shard checksum": lambda d: _zero_digest(d["shards"][2]),
    "size": lambda d: d["shards"][0].update(size=d["shards"][0]["size"] + 1),
    "dtype": lambda d: d["tensors"]["model/af"].update(dtype="int32"),
    "shape": lambda d: d["tensors"]["model/af"].update(shape=[1024, 2]),
    "checksum kind": lambda d: d.update(checksum="sha256"),
}
# Edits only the manifest's own digest can expose.
TREE_EDITS = {
    "tree value": lambda d: d["tree"]["$dict"][0].__setitem__(1, 4321),
    "tensor references": lambda d: d["refs"].reverse(),
    "metadata": lambda d: d["metadata"]["$dict"][0].__setitem__(1, 4),
}


@pytest.mark.parametrize("name", list(DATA_EDITS) + list(TREE_EDITS))
def test_edited_manifest(fresh, figures, name):
    """Damage on disk: the manifest no longer matches its manifest_checksum."""
    path, _ = fresh
    edit_manifest(path, {**DATA_EDITS, **TREE_EDITS}[name], reseal=False)
    expect_refused(path, figures, "edited_manifest")


@pytest.mark.parametrize("name", list(DATA_EDITS))
def test_edited_and_resealed_manifest(fresh, figures, name):
    """A writer that recomputes manifest_checksum over wrong entries is still caught."""
    path, _ = fresh
    edit_manifest(path, DATA_EDITS[name])
    expect_refused(path, figures, "resealed_manifest")
