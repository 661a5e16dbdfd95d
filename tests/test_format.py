"""Format versioning: older manifests are upgraded through ``manifest.MIGRATIONS``.

Format 1 is the first format, so these tests play a future release whose current
format is 2 (or 3) and read today's format-1 checkpoints with it.
"""

import pytest
import torch

import fastckpt
from fastckpt import manifest as mf


@pytest.fixture
def saved(ckpt):
    obj = {"w": torch.arange(6.0)}
    fastckpt.save(obj, ckpt, metadata={"step": 1}).wait(timeout=60)
    return ckpt, obj


def test_older_format_is_migrated_step_by_step(saved, monkeypatch):
    path, obj = saved
    seen = []

    def one_to_two(doc):
        seen.append(doc["format_version"])
        doc["metadata"] = {"$dict": [["upgraded", True]]}
        return doc

    monkeypatch.setattr(mf, "FORMAT_VERSION", 2)
    monkeypatch.setitem(mf.MIGRATIONS, 1, one_to_two)
    m = mf.read(path)
    assert seen == [1]
    assert m.raw["format_version"] == 2 and m.metadata == {"upgraded": True}
    assert torch.equal(fastckpt.load(path)["w"], obj["w"])


def test_missing_migration_is_incompatible(saved, monkeypatch):
    path, _ = saved
    monkeypatch.setattr(mf, "FORMAT_VERSION", 3)
    monkeypatch.setitem(mf.MIGRATIONS, 1, lambda doc: doc)
    with pytest.raises(fastckpt.IncompatibleCheckpointError, match="format_version 2"):
        fastckpt.load(path)

