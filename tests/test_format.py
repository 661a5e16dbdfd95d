"""Format versioning (older manifests are upgraded through ``manifest.MIGRATIONS``)
and conversion of plain ``torch.save`` files.

Format 1 is the first format, so the migration tests play a future release whose
current format is 2 (or 3) and read today's format-1 checkpoints with it.
"""

import collections

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


def test_import_torch(tmp_path):
    obj = {"model": collections.OrderedDict(w=torch.randn(3, 2), b=torch.zeros(2)),
           "step": 7, "betas": (0.9, 0.99), "names": ["a", "b"]}
    src = tmp_path / "model.pt"
    torch.save(obj, src)
    result = fastckpt.import_torch(src, tmp_path / "ckpt", metadata={"note": "converted"})
    assert result.num_tensors == 2
    out = fastckpt.load(tmp_path / "ckpt", verify=True)
    assert out["step"] == 7 and out["betas"] == (0.9, 0.99) and out["names"] == ["a", "b"]
    assert all(torch.equal(out["model"][k], obj["model"][k]) for k in obj["model"])
    meta = mf.read(str(tmp_path / "ckpt")).metadata
    assert meta == {"note": "converted", "imported_from": str(src)}


def _legacy_uint16(path):
    torch.save(torch.ones(2, dtype=torch.uint16), path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("write", [
    lambda p: p.write_text("hello"),
    _legacy_uint16,
])
def test_import_torch_of_an_unreadable_file(tmp_path, write):
    src = tmp_path / "x.pt"
    write(src)
    with pytest.raises(fastckpt.CheckpointError, match="not a readable torch.save file"):
        fastckpt.import_torch(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


class Custom:
    pass


def test_import_torch_refuses_code(tmp_path):
    src = tmp_path / "evil.pt"
    torch.save({"obj": Custom()}, src)
    with pytest.raises(fastckpt.UnsupportedTypeError, match="weights_only"):
        fastckpt.import_torch(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(fastckpt.CheckpointNotFoundError):
        fastckpt.import_torch(tmp_path / "missing.pt", tmp_path / "ckpt")
