"""TrainingState: every part of a training run survives a save and load exactly."""

import dataclasses
import logging
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastckpt
from fastckpt import TrainingState

WAIT = 60


def roundtrip(ts, path):
    """Save ``ts`` through fastckpt (real files) and load the state back."""
    fastckpt.save(ts.state_dict(), path).wait(timeout=WAIT)
    return fastckpt.load(path)


def draws(np_gen, torch_gen):
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        np.random.randn(2).tolist(),  # the legacy Gaussian cache
        np_gen.integers(0, 1 << 62, size=3).tolist(),
        torch.rand(3).tolist(),
        torch.randint(0, 1 << 30, (3,), generator=torch_gen).tolist(),
    )


def test_rng_states_restored_exactly(ckpt):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np_gen, torch_gen = np.random.default_rng(4), torch.Generator().manual_seed(5)
    np.random.randn()  # leave a cached Gaussian in the legacy state
    ts = TrainingState(generators=[np_gen, torch_gen])
    saved = roundtrip(ts, ckpt)
    expected = draws(np_gen, torch_gen)
    draws(np_gen, torch_gen)  # move every generator on
    ts.load_state_dict(saved)
    assert draws(np_gen, torch_gen) == expected


@pytest.mark.cuda
def test_cuda_rng_states_restored_exactly(ckpt):
    torch.cuda.manual_seed_all(6)
    saved = roundtrip(TrainingState(), ckpt)
    devices = range(torch.cuda.device_count())
    expected = [torch.rand(3, device=f"cuda:{i}").tolist() for i in devices]
    TrainingState().load_state_dict(saved)
    assert [torch.rand(3, device=f"cuda:{i}").tolist() for i in devices] == expected


def test_generator_count_mismatch(ckpt):
    saved = roundtrip(TrainingState(generators=[torch.Generator()]), ckpt)
    with pytest.raises(fastckpt.CheckpointError, match="1 extra generators, 0 were given"):
        TrainingState().load_state_dict(saved)


def make_run(seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opts = [torch.optim.Adam(model[0].parameters(), lr=0.01),
            torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)]
    scheds = [torch.optim.lr_scheduler.OneCycleLR(opts[0], max_lr=0.05, total_steps=50),
              torch.optim.lr_scheduler.StepLR(opts[1], step_size=3, gamma=0.5)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return TrainingState(model=model, optimizers=opts, schedulers=scheds, scaler=scaler)


def train_step(ts, x, y):
    loss = ((ts.model(x) - y) ** 2).mean()
    for o in ts.optimizers:
        o.zero_grad()
    ts.scaler.scale(loss).backward()
    for o in ts.optimizers:
        ts.scaler.step(o)
    ts.scaler.update()
    for s in ts.schedulers:
        s.step()
    ts.step += 1


def params(ts):
    return [p.detach().clone() for p in ts.model.parameters()]


def test_optimizers_schedulers_scaler_roundtrip(ckpt):
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    a = make_run()
    for _ in range(5):
        train_step(a, x, y)
    saved = roundtrip(a, ckpt)
    b = make_run(seed=99)  # different initial weights: everything must come from the state
    b.load_state_dict(saved)
    assert b.step == 5
    assert b.scaler.state_dict() == a.scaler.state_dict()
    assert b.scaler.get_scale() == a.scaler.get_scale() != 2.0**10  # it has grown
    for sa, sb in zip(a.schedulers, b.schedulers, strict=True):
        assert sb.state_dict() == sa.state_dict()
        assert sb.get_last_lr() == sa.get_last_lr()
    for _ in range(5):
        train_step(a, x, y)
        train_step(b, x, y)
    assert all(torch.equal(p, q) for p, q in zip(params(a), params(b), strict=True))


def test_ema_model_roundtrip(ckpt):
    a = make_run()
    ema = torch.optim.swa_utils.AveragedModel(a.model)
    ema.update_parameters(a.model)
    a.ema_model = ema
    saved = roundtrip(a, ckpt)
    b = make_run(seed=1)
    b.ema_model = torch.optim.swa_utils.AveragedModel(b.model)
    b.load_state_dict(saved)
    assert b.ema_model.n_averaged.item() == 1
    assert all(torch.equal(p, q) for p, q in
               zip(a.ema_model.parameters(), b.ema_model.parameters(), strict=True))


def test_component_count_mismatch(ckpt):
    saved = roundtrip(make_run(), ckpt)
    b = make_run()
    b.optimizers = b.optimizers[:1]
    with pytest.raises(fastckpt.CheckpointError, match="2 optimizers, 1 given"):
        b.load_state_dict(saved)


@dataclasses.dataclass
class Config:
    lr: float = 0.1
    layers: tuple = (4, 8, 1)


def test_config_and_counters(ckpt, caplog):
    ts = TrainingState(config=Config(), epoch=3, step=70,
                       metrics_history=[{"loss": 1.0}, {"loss": float("nan")}])
    saved = roundtrip(ts, ckpt)
    assert saved["config"] == {"lr": 0.1, "layers": (4, 8, 1)}
    fresh = TrainingState()
    fresh.load_state_dict(saved)
    assert (fresh.epoch, fresh.step, fresh.config) == (3, 70, saved["config"])
    assert fresh.metrics_history[0] == {"loss": 1.0}
    with caplog.at_level(logging.WARNING, logger="fastckpt"):
        TrainingState(config={"lr": 0.2}).load_state_dict(saved)
    assert "config differs" in caplog.text


def test_not_a_training_state():
    with pytest.raises(fastckpt.CheckpointError, match="TrainingState"):
        TrainingState().load_state_dict({"model": {}})


# -- data-loader position ------------------------------------------------------------


DATA = TensorDataset(torch.randn(40, 4), torch.randn(40, 1))  # 10 batches of 4


class StatefulSampler(torch.utils.data.Sampler):
    """A shuffling sampler that remembers its position (as torchdata's samplers do)."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed
                                                                               + self.epoch))
        while self.pos < self.n:
            self.pos += 1
            yield order[self.pos - 1].item()
        self.epoch, self.pos = self.epoch + 1, 0

    def __len__(self):
        return self.n

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]


def loader(stateful):
    if stateful:
        return DataLoader(DATA, batch_size=4, sampler=StatefulSampler(len(DATA), 7))
    return DataLoader(DATA, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7))


def run(ts, total, stop_at=None):
    """Train with dropout-free noise drawn from the global RNGs until ``total`` steps
    (or ``stop_at``, returning the state then)."""
    while ts.step < total:
        for x, y in ts.iterate():
            x = x + 0.01 * torch.randn_like(x) + 0.01 * np.random.rand() + 0.01 * random.random()
            train_step(ts, x, y)
            if ts.step == stop_at:
                return ts.state_dict()
            if ts.step >= total:
                break
    return None


@pytest.mark.parametrize("stateful", [False, True])
def test_mid_epoch_resume_is_exact(ckpt, stateful, caplog):
    reference = make_run()
    reference.loader = loader(stateful)
    run(reference, 27)

    first = make_run()
    first.loader = loader(stateful)
    fastckpt.save(run(first, 27, stop_at=13), ckpt).wait(timeout=WAIT)  # epoch 1, batch 3

    resumed = make_run(seed=5)  # other weights and RNG states, as in a fresh process
    resumed.loader = loader(stateful)
    with caplog.at_level(logging.WARNING, logger="fastckpt"):
        resumed.load_state_dict(fastckpt.load(ckpt))
        assert (resumed.epoch, resumed.batch_index) == (1, 3)
        run(resumed, 27)
    assert ("skipping the batches" in caplog.text) != stateful
    assert resumed.epoch == reference.epoch and resumed.batch_index == reference.batch_index
    assert all(torch.equal(p, q) for p, q in zip(params(reference), params(resumed), strict=True))


def test_rank_state_saved_apart_resumes_exactly(ckpt):
    reference = make_run()
    reference.loader = loader(False)
    run(reference, 27)

    first = make_run()
    first.loader = loader(False)
    run(first, 27, stop_at=13)
    shared = first.state_dict(rank_state=False)
    assert not set(fastckpt.training.RANK_KEYS) & set(shared)
    fastckpt.save(shared, ckpt, per_rank=first.rank_state_dict()).wait(timeout=WAIT)

    resumed = make_run(seed=5)
    resumed.loader = loader(False)
    resumed.load_state_dict(fastckpt.load(ckpt), rank_state=fastckpt.dist.load_rank_state(ckpt))
    assert (resumed.epoch, resumed.batch_index) == (1, 3)
    run(resumed, 27)
    assert all(torch.equal(p, q) for p, q in zip(params(reference), params(resumed), strict=True))


def test_rank_state_missing_or_malformed(ckpt):
    ts = make_run()
    ts.loader = loader(False)
    run(ts, 27, stop_at=13)
    fastckpt.save(ts.state_dict(rank_state=False), ckpt).wait(timeout=WAIT)
    shared = fastckpt.load(ckpt)
    with pytest.raises(fastckpt.CheckpointError, match="rank_state="):
        make_run().load_state_dict(shared)
    with pytest.raises(fastckpt.InvalidArgumentError, match="rank_state_dict"):
        make_run().load_state_dict(shared, rank_state={"rng": None})

    # A rank with no saved part keeps its own RNGs and starts the saved epoch over.
    fresh = make_run(seed=5)
    fresh.loader = loader(False)
    expected = draws(np.random.default_rng(0), torch.Generator())
    make_run(seed=5)  # reseed: the draws above moved the global generators on
    fresh.load_state_dict(shared, rank_state=fresh.rank_state_dict())
    assert (fresh.step, fresh.epoch, fresh.batch_index) == (13, 1, 0)
    assert draws(np.random.default_rng(0), torch.Generator()) == expected
