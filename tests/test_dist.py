"""Multi-rank saves over real gloo process groups (one process per rank), and the
single-process parts of fastckpt.dist."""

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import assert_same

import fastckpt
from fastckpt import dist, manifest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")


def launch(scenario, world, d, timeout=120, **env):
    """Run ``scenario`` on ``world`` ranks; returns each rank's (exit code, output)."""
    os.makedirs(d, exist_ok=True)
    store = os.path.join(d, "store")
    if os.path.exists(store):
        os.remove(store)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    procs = [subprocess.Popen([sys.executable, WORKER, scenario, str(r), str(world), str(d)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            text = p.communicate(timeout=max(1, deadline - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{scenario}: a rank hung")
        out.append((p.returncode, text.decode(errors="replace")))
    return out


def check(results, dead=()):
    for r, (code, text) in enumerate(results):
        if r in dead:
            assert code == -9, text
        else:
            assert code == 0, f"rank {r} failed:\n{text}"


@pytest.fixture(scope="module")
def saved2(tmp_path_factory):
    """A checkpoint saved by two ranks (after a series of failing saves)."""
    d = tmp_path_factory.mktemp("dist")
    check(launch("save2", 2, d))
    return d


def test_two_ranks_save_one_checkpoint(saved2):
    path = saved2 / "ckpt"
    out = fastckpt.load(path, verify=True)  # one process reads the whole state
    import dist_worker as w

    assert out["step"] == 5
    assert_same(out["model"], w.model_state())
    assert torch.equal(out["emb"], w.full_table())
    m = manifest.read(str(path))
    assert len(m.ranks) == 2
    names = set(m.tensors)
    assert {"emb@rank0", "emb@rank1", "@rank0/rng", "@rank1/rng"} <= names
    # Replicated tensors are stored once, and both ranks wrote some of them.
    assert sum(n.startswith("model/") for n in names) == 4
    assert {m.shards[t.shard].file for t in m.tensors.values()} == {s.file for s in m.shards}
    with fastckpt.open(path) as r:
        assert r.world_size == 2
        assert r.rank_state(1)["pos"] == 10
        assert torch.equal(r["@rank1/rng"], torch.ones(3))
        assert torch.equal(r["emb"], w.full_table())


def test_resume_on_four_ranks_and_save_again(saved2):
    check(launch("resume4", 4, saved2))
    out = fastckpt.load(saved2 / "ckpt4", verify=True)
    big = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out["big"], big) and out["step"] == 7
    assert [dist.load_rank_state(saved2 / "ckpt4", r)["r"].item() for r in range(4)] == [0, 1, 2, 3]
    assert dist.load_rank_state(saved2 / "ckpt4", 4) is None


@pytest.mark.parametrize("victim", [2, 0])
def test_rank_killed_mid_save(tmp_path, victim):
    t0 = time.monotonic()
    check(launch("kill", 3, tmp_path, timeout=90, KILL_RANK=str(victim)), dead={victim})
    assert time.monotonic() - t0 < 60
    path = tmp_path / "ckpt"
    assert fastckpt.load(path, verify=True)["step"] == 1
    # A dead rank 0 leaves the shared directory; the next save to the path removes it.
    fastckpt.save({"step": 2}, path).wait(60)
    fastckpt.default_checkpointer().wait_all(60)  # and removes the one it replaced
    assert not [e for e in os.listdir(tmp_path) if "fastckpt" in e]


def test_dtensor_save_and_reshard_native_and_dcp(tmp_path):
    pytest.importorskip("torch.distributed.tensor", reason="DTensor needs torch.distributed")
    check(launch("dtensor", 2, tmp_path))
    full = torch.arange(8 * 5, dtype=torch.float32).reshape(8, 5)
    for name, scale in (("dt", 1), ("dcp", 2)):  # both load whole in one process
        assert fastckpt.verify(tmp_path / name).ok
        out = fastckpt.load(tmp_path / name)
        assert torch.equal(out["w"], full * scale) and torch.equal(out["r"], full[0] * scale)


@pytest.fixture(scope="module")
def managed2(tmp_path_factory):
    """A CheckpointManager run by two ranks (see dist_worker.scenario_manager)."""
    d = tmp_path_factory.mktemp("managed")
    check(launch("manager", 2, d))
    return d


def run_dirs(root):
    return sorted(e for e in os.listdir(root) if e != "fastckpt-index.json")


def test_manager_on_two_ranks(managed2):
    root = managed2 / "run"
    assert run_dirs(root) == ["step_00000004", "step_00000006", "step_00000007"]
    with fastckpt.open(root / "step_00000007", verify=True) as r:
        assert r.world_size == 2 and r.metadata["metrics"] == {"loss": 0.05}
    assert run_dirs(managed2 / "best") == ["step_00000001", "step_00000003"]


def test_manager_on_four_ranks(tmp_path):
    check(launch("manager", 4, tmp_path))
    assert run_dirs(tmp_path / "run") == ["step_00000004", "step_00000006", "step_00000007"]
    with fastckpt.open(tmp_path / "run" / "step_00000007") as r:
        assert r.world_size == 4


def test_manager_resume_on_four_ranks(managed2):
    check(launch("manager_resume", 4, managed2))
    root = managed2 / "run"
    assert run_dirs(root) == ["step_00000004", "step_00000007", "step_00000009"]
    with fastckpt.open(root / "step_00000009", verify=True) as r:
        assert r.world_size == 4 and r.metadata["step"] == 9


def test_training_state_of_a_ddp_run_resumes_exactly(tmp_path):
    check(launch("train", 2, tmp_path))
    with fastckpt.open(tmp_path / "run" / "step_00000005") as r:
        states = [r.rank_state(k) for k in range(2)]
    assert states[0]["rng"]["python"] != states[1]["rng"]["python"]
    assert all(s["batch_index"] == 2 for s in states)


# -- single process ---------------------------------------------------------------------


def test_per_rank_without_group(ckpt):
    fastckpt.save({"w": torch.ones(3)}, ckpt, per_rank={"rng": torch.zeros(2)}).wait(60)
    assert torch.equal(fastckpt.load(ckpt)["w"], torch.ones(3))
    assert torch.equal(dist.load_rank_state(ckpt)["rng"], torch.zeros(2))
    assert dist.load_rank_state(ckpt, 1) is None


def test_incomplete_sharded_tensor_is_not_committed(ckpt):
    full = torch.randn(7, 5)
    with pytest.raises(fastckpt.CheckpointWriteError, match="do not tile"):
        fastckpt.save({"x": dist.Sharded.chunk(full, 1, 0, 3)}, ckpt, per_rank={}).wait(60)
    assert not os.path.exists(ckpt)
    assert not os.listdir(os.path.dirname(ckpt))


@pytest.mark.parametrize("dim", [0, 1])
def test_reshard_in_one_process(ckpt, dim):
    full = torch.randn(7, 5)
    fastckpt.save({"x": dist.Sharded.chunk(full, dim, 0, 1)}, ckpt, per_rank={}).wait(60)
    for world in (2, 3, 4):
        for r in range(world):
            target = {"x": dist.Sharded.chunk(torch.zeros(7, 5), 1 - dim, r, world)}
            assert dist.load_into(ckpt, target).ok
            assert torch.equal(target["x"].local,
                               dist.Sharded.chunk(full, 1 - dim, r, world).local)


def test_spec_of_a_tensor_saved_in_pieces(ckpt):
    fastckpt.save({"x": dist.Sharded.chunk(torch.randn(7, 5, dtype=torch.float64), 0, 0, 1),
                   "y": torch.ones(2, dtype=torch.int8)}, ckpt, per_rank={}).wait(60)
    with fastckpt.open(ckpt) as r:
        assert r.spec("x") == ("float64", (7, 5)) and r.spec("y") == ("int8", (2,))


def test_keys_that_look_like_rank_names(tmp_path):
    """Keys spelling the names of per-rank state or of blocks ("@rank0", "x@rank0")
    get stored apart from them, not in their place."""
    a, b = tmp_path / "a", tmp_path / "b"
    fastckpt.save({"@rank0": {"rng": torch.ones(3)}}, a, per_rank={"rng": torch.zeros(3)}).wait(60)
    assert fastckpt.verify(a).ok
    assert torch.equal(dist.load_rank_state(a, 0)["rng"], torch.zeros(3))
    assert torch.equal(fastckpt.load(a)["@rank0"]["rng"], torch.ones(3))
    fastckpt.save({"x": dist.Sharded.chunk(torch.ones(4), 0, 0, 1), "x@rank0": torch.zeros(4)},
                  b, per_rank={}).wait(60)
    assert fastckpt.verify(b).ok
    out = fastckpt.load(b)
    assert torch.equal(out["x"], torch.ones(4)) and torch.equal(out["x@rank0"], torch.zeros(4))


@pytest.mark.parametrize("offsets", [(6, 0), (-1, 0), (0,)])
def test_target_block_outside_the_saved_tensor(ckpt, offsets):
    fastckpt.save({"x": torch.arange(35.0).reshape(7, 5)}, ckpt).wait(60)
    block = torch.full((3, 5), -1.0)
    target = {"x": dist.Sharded(block, offsets, (7, 5))}
    with pytest.raises(fastckpt.CheckpointError, match="lies outside"):
        dist.load_into(ckpt, target)
    assert (block == -1).all()
    report = dist.load_into(ckpt, target, strict=False)
    assert "lies outside" in str(report) and (block == -1).all()


def test_pieces_must_tile(ckpt):
    full = torch.randn(4, 2)
    fastckpt.save({"x": dist.Sharded.chunk(full, 0, 0, 1)}, ckpt, per_rank={}).wait(60)
    m = manifest.read(str(ckpt))
    doc = m.raw
    ref = next(r for r in doc["refs"] if "pieces" in r)
    ref["pieces"].append(dict(ref["pieces"][0]))  # the same block twice
    with pytest.raises(fastckpt.CorruptCheckpointError, match="tile"):
        manifest.parse(doc)
    ref["pieces"] = [{"tensor": ref["pieces"][0]["tensor"], "offset": [1, 0]}]
    with pytest.raises(fastckpt.CorruptCheckpointError, match="does not fit"):
        manifest.parse(doc)


def test_owners_balance_bytes():
    from fastckpt.plan import Stored

    stored = [Stored(f"t{i}", torch.empty(n)) for i, n in enumerate([100, 60, 50, 40, 10, 0, 0])]
    owner = dist._owners(stored, 2)
    load = [sum(s.nbytes for s in stored if owner[s.name] == r) for r in range(2)]
    assert sum(load) == 1040 and max(load) - min(load) <= 100  # within one small tensor


def test_tiles():
    assert manifest.tiles([([0, 0], (2, 3)), ([2, 0], (1, 3))], [3, 3])
    assert not manifest.tiles([([0, 0], (2, 3)), ([1, 0], (2, 3))], [3, 3])  # overlap
    assert not manifest.tiles([([0, 0], (2, 3))], [3, 3])  # hole
    grid = [([i, j], (2, 2)) for i in (0, 2) for j in (0, 2)]
    assert manifest.tiles(grid, [4, 4])
    assert not manifest.tiles(grid[:3] + [([1, 1], (2, 2))], [4, 4])
