"""CheckpointManager: retention, best tracking, skipped saves, restart, copies, exports."""

import json
import os
import shutil
import subprocess
import threading
import time

import pytest
import torch
from faults import ENOSPC, FaultyOS, always
from safetensors.torch import load_file

import fastckpt
from fastckpt import commit, transfer, writer
from fastckpt.catalog import INDEX_NAME
from fastckpt.retention import RetentionPolicy

WAIT = 60  # seconds: the bound on every wait


@pytest.fixture
def engine():
    with fastckpt.Checkpointer(workers=2, staging_budget=16 << 20) as c:
        yield c


@pytest.fixture
def manager(tmp_path, engine):
    """Factory: a manager over ``tmp_path/root`` with the given policy, closed at the end."""
    made = []

    def make(root=None, **policy):
        m = fastckpt.CheckpointManager(root or tmp_path / "root", checkpointer=engine, **policy)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def state(step):
    return {"model": {"w": torch.full((4,), float(step))}, "step": step}


def save_all(m, losses, **kwargs):
    """Save step -> loss for each item, waiting for each commit and its housekeeping."""
    for step, loss in losses.items():
        handle = m.save(step, state(step), metrics={"val_loss": loss}, **kwargs)
        if handle is not None:
            handle.wait(timeout=WAIT)
    m.wait(timeout=WAIT)


def steps(m):
    return [i.step for i in m.list()]


def on_disk(m):
    """Checkpoint directories under the root (hidden temporary siblings excluded)."""
    return sorted(e for e in os.listdir(m.root) if e.startswith("step_"))


# -- retention -------------------------------------------------------------------


def test_no_policy_keeps_everything(manager):
    m = manager()
    save_all(m, {1: 0.5, 2: 0.4, 3: 0.3})
    assert steps(m) == [1, 2, 3]


def test_keep_last(manager):
    m = manager(keep_last=2)
    save_all(m, {s: 1.0 for s in range(1, 6)})
    assert steps(m) == [4, 5]
    assert on_disk(m) == ["step_00000004", "step_00000005"]


@pytest.mark.parametrize("mode, best", [("min", [2, 4]), ("max", [3, 5])])
def test_keep_best_min_and_max(manager, mode, best):
    m = manager(keep_best=2, mode=mode)
    save_all(m, {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.2, 5: 0.8, 6: 0.4})
    assert steps(m) == sorted({*best, 6})  # the latest is always kept
    assert m.best().step == best[0]
    assert m.latest().step == 6


def test_keep_every_steps(manager):
    m = manager(keep_last=1, keep_every=4)
    save_all(m, {s: 1.0 for s in range(1, 11)})
    assert steps(m) == [4, 8, 10]


def test_keep_tag(manager):
    m = manager(keep_last=1)
    save_all(m, {1: 1.0})
    m.save(2, state(2), tags=["keep"]).wait(timeout=WAIT)
    save_all(m, {3: 1.0, 4: 1.0})
    assert steps(m) == [2, 4]
    assert m.list()[0].tags == ("keep",)


def test_all_rules_combined(manager):
    m = manager(keep_last=2, keep_best=1, keep_every=5)
    losses = {s: 1.0 / s for s in range(1, 13)}  # improving, except ...
    losses[3] = 0.01  # ... step 3 is the best
    for s, loss in losses.items():
        m.save(s, state(s), metrics={"val_loss": loss}, tags=("keep",) if s == 7 else ())
    m.wait(timeout=WAIT)
    assert steps(m) == [3, 5, 7, 10, 11, 12]
    flags = {i.step: (i.is_best, i.is_latest) for i in m.list()}
    assert flags[3] == (True, False) and flags[12] == (False, True)


def test_keep_every_seconds_spacing():
    class E:
        def __init__(self, step, time):
            self.step, self.time, self.metrics, self.tags = step, time, {}, ()

    p = RetentionPolicy(keep_last=1, keep_every_seconds=10)
    entries = [E(1, 0.0), E(2, 6.0), E(3, 12.0), E(4, 15.0), E(5, 23.0)]
    assert p.keep(entries) == {1, 3, 5}


def test_deletion_only_after_commit(manager, monkeypatch):
    m = manager(keep_last=1)
    save_all(m, {1: 1.0})
    gate = threading.Event()
    real = commit.write_file_durably

    def held(path, data):  # the manifest write: the commit waits for the gate
        assert gate.wait(timeout=WAIT)
        real(path, data)

    monkeypatch.setattr(commit, "write_file_durably", held)
    handle = m.save(2, state(2), metrics={"val_loss": 1.0})
    try:
        assert not handle.done()
        assert steps(m) == [1] and on_disk(m) == ["step_00000001"]
    finally:
        gate.set()
    handle.wait(timeout=WAIT)
    m.wait(timeout=WAIT)
    assert steps(m) == [2]


def test_failed_save_deletes_nothing(manager, monkeypatch):
    m = manager(keep_last=1)
    save_all(m, {1: 1.0})
    monkeypatch.setattr(writer, "os", FaultyOS(write=(ENOSPC, always)))
    handle = m.save(2, state(2))
    with pytest.raises(fastckpt.CheckpointWriteError):
        handle.wait(timeout=WAIT)
    m.wait(timeout=WAIT)
    monkeypatch.undo()
    assert steps(m) == [1] and on_disk(m) == ["step_00000001"]
    m.save(3, state(3)).wait(timeout=WAIT)
    m.wait(timeout=WAIT)
    assert steps(m) == [3]


def test_failure_not_swallowed_by_housekeeping(manager, monkeypatch):
    m = manager(keep_last=1)
    monkeypatch.setattr(writer, "os", FaultyOS(write=(ENOSPC, always)))
    m.save(1, state(1))
    m.wait(timeout=WAIT)  # housekeeping has seen the failure
    monkeypatch.undo()
    with pytest.raises(fastckpt.CheckpointWriteError):
        m.save(2, state(2))  # the engine still reports it


# -- skipped saves -----------------------------------------------------------------


def test_save_interval_steps(manager):
    m = manager(save_interval_steps=10)
    assert m.save(5, state(5)) is None
    m.save(10, state(10)).wait(timeout=WAIT)
    m.save(15, state(15), force=True).wait(timeout=WAIT)
    assert steps(m) == [10, 15]


def test_save_best_only(manager):
    m = manager(save_best_only=True, mode="max", metric="acc")
    results = [m.save(s, state(s), metrics={"acc": a}) for s, a in
               [(1, 0.5), (2, 0.4), (3, 0.7), (4, 0.7), (5, float("nan"))]]
    assert [r is not None for r in results] == [True, False, True, False, False]
    m.wait(timeout=WAIT)
    assert steps(m) == [1, 3]
    assert m.best().step == 3


# -- bad input ---------------------------------------------------------------------


def test_missing_metric_is_an_error_at_save_time(manager):
    m = manager(keep_best=1)
    with pytest.raises(fastckpt.MetricError, match="val_loss"):
        m.save(1, state(1), metrics={"loss": 0.3})
    with pytest.raises(fastckpt.MetricError, match="real number"):
        m.save(1, state(1), metrics={"val_loss": "low"})
    assert steps(m) == []


def test_unranked_checkpoints_are_never_best(manager):
    m = manager()
    save_all(m, {1: float("nan")})
    m.save(2, state(2), metrics={"other": 1.0}).wait(timeout=WAIT)
    assert m.best() is None
    with pytest.raises(fastckpt.CheckpointNotFoundError, match="best"):
        m.restore("best")
    save_all(m, {3: 0.5})
    assert m.best().step == 3


def test_step_saved_twice(manager):
    m = manager()
    save_all(m, {1: 0.5})
    with pytest.raises(fastckpt.StepExistsError, match="force=True"):
        m.save(1, state(1))
    m.save(1, state(100), metrics={"val_loss": 0.1}, force=True).wait(timeout=WAIT)
    assert m.restore(1)["step"] == 100
    assert m.list()[0].metrics == {"val_loss": 0.1}


def test_step_in_flight_cannot_be_saved_again(manager, monkeypatch):
    m = manager()
    gate = threading.Event()
    real = commit.write_file_durably
    monkeypatch.setattr(commit, "write_file_durably",
                        lambda p, d: (gate.wait(timeout=WAIT), real(p, d)))
    handle = m.save(1, state(1))
    try:
        with pytest.raises(fastckpt.StepExistsError, match="being saved"):
            m.save(1, state(1), force=True)
    finally:
        gate.set()
    handle.wait(timeout=WAIT)


def test_step_is_free_once_its_handle_is_done(manager):
    m = manager()
    # Holding the manager's lock keeps its housekeeping from running after each commit:
    # what a caller may meet right after wait() returns.
    with m._lock:
        m.save(1, state(1)).wait(timeout=WAIT)
        m.save(1, state(10), force=True).wait(timeout=WAIT)
        m.delete(1)
    m.wait(timeout=WAIT)
    assert steps(m) == [] and on_disk(m) == []


def test_root_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a directory")
    with pytest.raises(fastckpt.CheckpointError, match="not a directory"):
        fastckpt.CheckpointManager(f)


@pytest.mark.parametrize(
    "kwargs", [{"keep_last": 0}, {"keep_best": -1}, {"mode": "up"}, {"keep_every": 1.5},
               {"save_interval_steps": 0}]
)
def test_bad_policy(tmp_path, kwargs):
    with pytest.raises(fastckpt.InvalidArgumentError):
        fastckpt.CheckpointManager(tmp_path, **kwargs)


def test_bad_step(manager):
    m = manager()
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(fastckpt.InvalidArgumentError):
            m.save(bad, state(0))


def test_bad_metrics_and_tags(manager):
    m = manager()
    with pytest.raises(fastckpt.InvalidArgumentError, match="metrics must be a mapping"):
        m.save(1, state(1), metrics="val_loss")
    with pytest.raises(fastckpt.InvalidArgumentError, match="tags must be strings"):
        m.save(1, state(1), tags=None)
    assert on_disk(m) == []


def test_huge_int_metric_ranks_exactly(tmp_path, manager):
    save_all(manager(), {1: 10**400, 2: 0.5, 3: 10**400 + 1})
    # Reopened (ranking on start) and ranked both ways: no OverflowError.
    assert manager().best().step == 2
    m = manager(mode="max", keep_best=1)
    assert (m.best().step, m.summary()["latest"]) == (3, 3)
    save_all(m, {4: 10**400 + 2})
    assert steps(m) == [4]


# -- restart, crash leftovers, hand edits -----------------------------------------------


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait(timeout=WAIT)
    return p.pid


def test_restart_cleans_leftovers_and_rebuilds_index(tmp_path, manager):
    root = tmp_path / "root"
    m = manager(root)
    save_all(m, {1: 0.3, 2: 0.2})
    stale_index = (root / INDEX_NAME).read_bytes()
    save_all(m, {3: 0.1})
    m.save(1, state(1), metrics={"val_loss": 0.05}, force=True).wait(timeout=WAIT)
    m.close()
    pid = dead_pid()
    crashed = root / f".step_00000004{commit.TMP_TAG}{pid}-0123456789ab"
    crashed.mkdir()
    (crashed / "shard-00001-of-00001.safetensors").write_bytes(b"\0" * 64)
    # A crash between the two renames of a replace: step 2 exists only under its -old- name.
    os.rename(root / "step_00000002", root / f".step_00000002{commit.OLD_TAG}{pid}-0123456789ab")
    (root / f".{INDEX_NAME}{commit.TMP_TAG}{pid}-0123456789ab").write_bytes(b"{")
    (root / INDEX_NAME).write_bytes(stale_index)

    m2 = manager(root)
    assert sorted(os.listdir(root)) == [INDEX_NAME, "step_00000001", "step_00000002",
                                        "step_00000003"]
    assert {i.step: i.metrics["val_loss"] for i in m2.list()} == {1: 0.05, 2: 0.2, 3: 0.1}
    assert m2.best().step == 1 and m2.latest().step == 3
    index = json.loads((root / INDEX_NAME).read_text())
    assert [e[0] for e in index["entries"]] == ["step_00000001", "step_00000002", "step_00000003"]


def test_missing_or_damaged_index_is_rebuilt(tmp_path, manager):
    root = tmp_path / "root"
    m = manager(root)
    save_all(m, {1: 0.3, 2: 0.2})
    m.close()
    (root / INDEX_NAME).write_text("garbage")
    assert steps(manager(root)) == [1, 2]
    os.remove(root / INDEX_NAME)
    assert manager(root).best().step == 2
    assert (root / INDEX_NAME).exists()


def test_symlinked_step_loses_only_its_link(tmp_path, manager):
    outside = tmp_path / "outside"
    fastckpt.save(state(1), outside, metadata={"step": 1}).wait(timeout=WAIT)
    root = tmp_path / "root"
    root.mkdir()
    for step in (1, 2):
        os.symlink(outside, root / f"step_{step:08d}")
    m = manager(root, keep_last=1)
    assert steps(m) == [1, 2]
    m.delete(2)
    save_all(m, {3: 0.1})  # retention removes step 1
    assert sorted(os.listdir(root)) == [INDEX_NAME, "step_00000003"]  # no hidden leftover
    assert fastckpt.verify(outside).ok


def test_restart_removes_a_leftover_link(tmp_path, manager):
    outside = tmp_path / "outside"
    fastckpt.save(state(1), outside).wait(timeout=WAIT)
    root = tmp_path / "root"
    root.mkdir()
    # What removing a symlinked step leaves when its process dies halfway.
    os.symlink(outside, root / f".step_00000001{commit.TMP_TAG}{dead_pid()}-0123456789ab")
    manager(root)
    assert os.listdir(root) == []
    assert fastckpt.verify(outside).ok


def test_checkpoint_deleted_by_hand(manager):
    m = manager(keep_last=3)
    save_all(m, {1: 0.1, 2: 0.2, 3: 0.3})
    shutil.rmtree(os.path.join(m.root, "step_00000001"))  # the best
    shutil.rmtree(os.path.join(m.root, "step_00000003"))  # the latest
    assert steps(m) == [2]
    assert m.latest().step == 2 and m.best().step == 2
    assert m.restore()["step"] == 2
    with pytest.raises(fastckpt.CheckpointNotFoundError):
        m.restore(3)
    with pytest.raises(fastckpt.CheckpointNotFoundError):
        m.delete(1)
    save_all(m, {4: 0.4})
    assert steps(m) == [2, 4]


def test_delete(manager):
    m = manager()
    save_all(m, {1: 0.1, 2: 0.2})
    m.delete(1)
    assert steps(m) == [2] and on_disk(m) == ["step_00000002"]


# -- queries -----------------------------------------------------------------------


def test_list_summary_compare(manager):
    m = manager(metric="acc", mode="max")
    m.save(1, state(1), metrics={"acc": 0.5, "loss": 2.0}, description="first").wait(
        timeout=WAIT)
    m.save(2, state(2), metrics={"acc": 0.7}, tags=("keep", "final")).wait(timeout=WAIT)
    first, second = m.list()
    assert (first.step, first.description, first.tags) == (1, "first", ())
    assert second.tags == ("keep", "final") and second.is_best and second.is_latest
    assert first.size > 0 and first.checksum and first.checksum != second.checksum
    assert first.time <= second.time
    summary = m.summary()
    assert summary["count"] == 2 and summary["latest"] == 2 and summary["best"] == 2
    assert summary["total_size"] == first.size + second.size
    assert m.compare([1, 2]) == {"acc": {1: 0.5, 2: 0.7}, "loss": {1: 2.0, 2: None}}
    with pytest.raises(fastckpt.CheckpointNotFoundError):
        m.compare([1, 9])


def test_restore_forwards_load_options(manager):
    m = manager()
    save_all(m, {1: 0.1, 2: 0.2})
    assert m.restore(1, mmap=False, verify=True)["step"] == 1
    assert m.restore("best")["step"] == 1
    assert m.restore()["step"] == 2


def test_restore_rank_state_and_restore_into(manager):
    m = manager()
    m.save(1, state(1), per_rank={"rng": torch.arange(3)}).wait(timeout=WAIT)
    m.save(2, state(2)).wait(timeout=WAIT)
    assert torch.equal(m.restore_rank_state(1)["rng"], torch.arange(3))
    assert m.restore_rank_state() is None  # step 2 has no per-rank state
    target = {"model": {"w": torch.zeros(4)}}
    assert m.restore_into(target, 1, strict=False).loaded == 1
    assert torch.equal(target["model"]["w"], state(1)["model"]["w"])
    with pytest.raises(fastckpt.CheckpointNotFoundError):
        m.restore_rank_state(3)


# -- copies ----------------------------------------------------------------------------


def test_export_and_import_are_verified(tmp_path, manager):
    m = manager()
    save_all(m, {1: 0.1, 2: 0.2})
    dest = m.export(2, tmp_path / "exported")
    assert fastckpt.verify(dest).ok
    assert torch.equal(fastckpt.load(dest)["model"]["w"], state(2)["model"]["w"])

    other = manager(tmp_path / "other")
    info = other.import_(dest)
    assert (info.step, info.metrics) == (2, {"val_loss": 0.2})
    with pytest.raises(fastckpt.StepExistsError):
        other.import_(dest)
    assert other.import_(dest, step=7).step == 7
    assert steps(other) == [2, 7]


def test_import_checks_the_recorded_step_before_copying(tmp_path, manager):
    m = manager()
    for i, recorded in enumerate((-5, "7", None)):
        src = tmp_path / f"src{i}"
        fastckpt.save(state(1), src, metadata={"step": recorded}).wait(timeout=WAIT)
        with pytest.raises(fastckpt.InvalidArgumentError, match="src"):
            m.import_(src)
    assert os.listdir(m.root) == []  # no stray directory


def test_metadata_time_that_is_not_a_number(tmp_path, manager):
    src = tmp_path / "src"
    fastckpt.save(state(5), src, metadata={"step": 5, "time": "2024-01-01"}).wait(timeout=WAIT)
    before = time.time()
    m = manager()
    assert m.import_(src).step == 5
    [info] = m.list()
    assert isinstance(info.time, float) and before - 60 < info.time <= time.time()


def test_copies_to_a_path_under_a_file(tmp_path, manager):
    m = manager()
    save_all(m, {1: 0.1})
    (tmp_path / "file").write_text("x")
    with pytest.raises(fastckpt.CheckpointWriteError, match="file"):
        m.export(1, tmp_path / "file" / "dest")
    with pytest.raises(fastckpt.CheckpointWriteError, match="file"):
        m.export_for_inference(1, tmp_path / "file" / "dest")
    assert (tmp_path / "file").read_text() == "x"


def test_export_of_a_damaged_checkpoint_fails_cleanly(tmp_path, manager):
    m = manager()
    save_all(m, {1: 0.1})
    shard = os.path.join(m.root, "step_00000001", "shard-00001-of-00001.safetensors")
    with open(shard, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(fastckpt.CorruptCheckpointError, match="does not verify"):
        m.export(1, tmp_path / "exported")
    assert os.listdir(tmp_path) == ["root"]  # no copy and no leftover


def test_backup_dir_mirrors_the_best(tmp_path, manager):
    backup = tmp_path / "backup"
    m = manager(keep_last=1, keep_best=2, backup_dir=backup)
    save_all(m, {1: 0.5, 2: 0.3, 3: 0.9, 4: 0.1})
    assert sorted(e for e in os.listdir(backup) if e != INDEX_NAME) == [
        "step_00000002", "step_00000004"]
    for name in ("step_00000002", "step_00000004"):
        assert fastckpt.verify(backup / name).ok


@pytest.mark.parametrize("where", ["same", "slash", "link", "step"])
def test_backup_dir_apart_from_root(tmp_path, manager, where):
    root = tmp_path / "run"
    save_all(manager(root), {1: 0.5})
    os.symlink(root, tmp_path / "link")
    backup = {"same": root, "slash": f"{root}/", "link": tmp_path / "link",
              "step": root / "step_00000009"}[where]
    with pytest.raises(fastckpt.InvalidArgumentError, match="backup_dir"):
        fastckpt.CheckpointManager(root, keep_best=1, backup_dir=backup)
    assert sorted(os.listdir(root)) == [INDEX_NAME, "step_00000001"]


def test_backup_of_a_step_deleted_meanwhile_is_skipped(tmp_path, manager, monkeypatch, caplog):
    """A step deleted between housekeeping's scan and its backup copy (delete() is
    allowed once the save's handle is done): the other backups are still made."""
    backup = tmp_path / "backup"
    m = manager(keep_best=2, backup_dir=backup)
    real = transfer.copy_checkpoint

    def deleted_meanwhile(src, dest):
        if src.endswith("step_00000002"):
            shutil.rmtree(src)
        return real(src, dest)

    monkeypatch.setattr(transfer, "copy_checkpoint", deleted_meanwhile)
    with caplog.at_level("WARNING", logger="fastckpt"):
        save_all(m, {1: 0.5})
        save_all(m, {2: 0.3}, force=True)
    assert "backup of step 2" in caplog.text
    assert sorted(e for e in os.listdir(backup) if e.startswith("step_")) == ["step_00000001"]


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_backup_dir_nested_in_or_around_the_root(tmp_path, manager, where):
    root = tmp_path / "run"
    backup = {"inside": root / "best", "outside": tmp_path}[where]
    m = manager(root, keep_last=1, keep_best=2, backup_dir=backup)
    save_all(m, {1: 0.5, 2: 0.3, 3: 0.9, 4: 0.1})
    assert [i.step for i in m.list()] == [2, 4]  # the two best, the latest among them
    assert sorted(e for e in os.listdir(backup) if e.startswith("step_")) == [
        "step_00000002", "step_00000004"]


# -- export for inference -----------------------------------------------------------


def read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return f.read()


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 4)


def test_export_for_inference_single_file(tmp_path, manager):
    m = manager()
    net = Net()
    ts = fastckpt.TrainingState(model=net, config={"lr": 0.1, "layers": (16, 32, 4)})
    m.save(3, ts.state_dict(), metrics={"val_loss": 0.25}, description="smoke").wait(
        timeout=WAIT)
    dest = m.export_for_inference(3, tmp_path / "deploy")
    assert sorted(os.listdir(dest)) == ["README.md", "model.safetensors",
                                        "training_metadata.json"]
    weights = load_file(os.path.join(dest, "model.safetensors"))
    assert weights.keys() == net.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    meta = json.loads(read(dest, "training_metadata.json"))
    assert meta["step"] == 3 and meta["metrics"] == {"val_loss": 0.25}
    assert meta["config"] == {"lr": 0.1, "layers": [16, 32, 4]}
    assert meta["library"]["torch"] == torch.__version__
    assert "step 3" in read(dest, "README.md")
    with pytest.raises(fastckpt.CheckpointError, match="not an empty directory"):
        m.export_for_inference(3, dest)


def test_export_for_inference_sharded_and_ema(tmp_path, manager):
    m = manager()
    net = Net()
    ema = torch.optim.swa_utils.AveragedModel(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update_parameters(net)
    m.save(1, fastckpt.TrainingState(model=net, ema_model=ema).state_dict()).wait(timeout=WAIT)
    dest = m.export_for_inference("latest", tmp_path / "deploy", use_ema=True,
                                  max_shard_size=600)
    index = json.loads(read(dest, "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    loaded = {}
    for f in files:
        part = load_file(os.path.join(dest, f))
        assert all(index["weight_map"][k] == f for k in part)
        loaded.update(part)
    expected = {k[len("module."):]: v for k, v in ema.state_dict().items() if k != "n_averaged"}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in expected.values())


def test_export_for_inference_bad_shard_size(tmp_path, manager):
    m = manager()
    m.save(1, {"model": {"w": torch.ones(2)}}).wait(timeout=WAIT)
    for bad in (0, -1, "5GB"):
        with pytest.raises(fastckpt.InvalidArgumentError, match="max_shard_size"):
            m.export_for_inference(1, tmp_path / "deploy", max_shard_size=bad)
    assert not os.path.exists(tmp_path / "deploy")


def test_export_for_inference_without_weights(tmp_path, manager):
    m = manager()
    m.save(1, {"model": {"w": torch.ones(2)}, "other": 1}).wait(timeout=WAIT)
    with pytest.raises(fastckpt.CheckpointError, match="ema_model"):
        m.export_for_inference(1, tmp_path / "deploy", use_ema=True)
    assert not os.path.exists(tmp_path / "deploy")
