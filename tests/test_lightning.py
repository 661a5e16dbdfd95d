"""PyTorch Lightning: ModelCheckpoint saves through FastCheckpointIO, and training
resumes from them."""

import os

import pytest
import torch

import fastckpt

pl = pytest.importorskip("lightning.pytorch", reason="needs lightning (fastckpt[lightning])")
from fastckpt.integrations.lightning import FastCheckpointIO  # noqa: E402


class Opaque:
    """A hyper-parameter value fastckpt's format cannot hold."""

    def __eq__(self, other):
        return isinstance(other, Opaque)


class Regression(pl.LightningModule):
    def __init__(self, lr=0.05, extra=None):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(data, batch_size=8)


def trainer(root, steps, io, **kw):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=2,
                                        monitor="step", mode="max")
    return pl.Trainer(default_root_dir=root, max_steps=steps, plugins=[io], callbacks=[ckpt],
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", **kw)


def test_model_checkpoint_and_resume(tmp_path):
    torch.manual_seed(0)
    model = Regression()
    t = trainer(tmp_path, 6, FastCheckpointIO())
    t.fit(model, loader())
    saved = sorted(e for e in os.listdir(tmp_path) if e.endswith(".ckpt"))
    assert saved == ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"]  # top 2 kept, older removed
    last = tmp_path / saved[-1]
    assert fastckpt.verify(last).ok
    state = fastckpt.load(last)
    assert state["global_step"] == 6
    assert torch.equal(state["state_dict"]["net.weight"], model.net.weight.detach())

    resumed = Regression()
    t2 = trainer(tmp_path / "resume", 8, FastCheckpointIO())
    t2.fit(resumed, loader(), ckpt_path=last)
    assert t2.global_step == 8
    opt = t2.optimizers[0].state_dict()["state"][0]
    assert opt["step"].item() == 8  # Adam's state came back and went on


def test_unsupported_hyperparameters_need_the_opt_in(tmp_path):
    model = Regression(extra=Opaque())
    with pytest.raises(fastckpt.UnsupportedTypeError, match="unsupported='pickle'"):
        trainer(tmp_path / "a", 2, FastCheckpointIO()).fit(model, loader())
    t = trainer(tmp_path / "b", 2, FastCheckpointIO(unsupported="pickle"))
    t.fit(model, loader())
    path = tmp_path / "b" / "epoch=0-step=2.ckpt"
    with pytest.raises(fastckpt.CheckpointError, match="pickled"):
        FastCheckpointIO().load_checkpoint(path)
    state = FastCheckpointIO(unsupported="pickle").load_checkpoint(path)
    assert state["hyper_parameters"]["extra"] == Opaque()


def test_unsupported_tensors_are_pickled_with_the_opt_in(tmp_path):
    c = torch.randn(3, dtype=torch.complex128)
    with pytest.raises(fastckpt.UnsupportedTypeError, match="unsupported='pickle'"):
        FastCheckpointIO().save_checkpoint({"state_dict": {"c": c}}, tmp_path / "a.ckpt")
    io = FastCheckpointIO(unsupported="pickle")
    io.save_checkpoint({"state_dict": {"c": c, "w": torch.ones(2)}}, tmp_path / "b.ckpt")
    state = io.load_checkpoint(tmp_path / "b.ckpt")
    io.teardown()
    assert torch.equal(state["state_dict"]["c"], c)
    assert torch.equal(state["state_dict"]["w"], torch.ones(2))
    with fastckpt.open(tmp_path / "b.ckpt") as r:
        assert "state_dict/w" in r  # stored as a tensor, not pickled
