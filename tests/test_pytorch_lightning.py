"""The standalone ``pytorch_lightning`` namespace: Trainer, checkpoints, LightningCLI, ``check_gradients``.

Findings pinned here: ``pytorch_lightning.Trainer`` runs ``lightning_gradguard.GradGuard`` (a
``lightning.pytorch`` callback) when it comes in a list, but not alone (``callbacks=GradGuard()``),
and ``pytorch_lightning.cli.LightningCLI`` refuses it; ``lightning_gradguard.pl.GradGuard``
subclasses both ``Callback`` classes and is accepted everywhere.
"""

from __future__ import annotations

import sys

import lightning.pytorch
import pytest
import torch
from torch import nn

from helpers import DigitsMLP, digits_loader
from helpers import trainer as lightning_trainer
from lightning_gradguard import GradGuard as CoreGuard
from lightning_gradguard import GradientHealthError

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.cli import LightningCLI  # noqa: E402

from lightning_gradguard.pl import GradGuard  # noqa: E402
from lightning_gradguard.testing import check_gradients  # noqa: E402


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when given ``args`` while ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


class PLDigits(pl.LightningModule):
    """DigitsMLP's architecture (same parameter names) in the pytorch_lightning namespace, with optional faults."""

    def __init__(self, depth: int = 2, hidden: int = 32, activation: str = "tanh", lr: float = 0.01,
                 nan_at: int = -1) -> None:
        super().__init__()
        act = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[activation]
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), act()]
            width = hidden
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)
        self.lr, self.nan_at = lr, nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_after_backward(self):
        if self.global_step == self.nan_at:
            self.net[2].weight.grad[0, 0] = float("nan")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self):
        return digits_loader()


def pl_trainer(**kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_steps=10)
    return pl.Trainer(**{**defaults, **kwargs})


def test_pl_trainer_runs_the_lightning_guard_as_is():
    guard = CoreGuard()
    assert not isinstance(guard, pl.Callback)
    pl_trainer(callbacks=[guard]).fit(PLDigits(nan_at=4))
    assert [(e.step, e.kind, e.actions) for e in guard.events] == [(4, "nonfinite", ("skip", "alert"))]
    assert guard._watches[0].counts == {**guard._watches[0].counts, "steps": 10, "skipped": 1}


def test_pl_trainer_wraps_only_its_own_callbacks_in_a_list():
    with pytest.raises(TypeError, match="'GradGuard' object is not iterable"):
        pl_trainer(callbacks=CoreGuard())  # a single callback, not in a list
    guard = GradGuard()
    pl_trainer(callbacks=guard, max_steps=2).fit(PLDigits())
    assert guard._watches[0].counts["steps"] == 2


def test_pl_lightning_cli_refuses_the_lightning_guard(capsys):
    with pytest.raises(SystemExit):
        LightningCLI(PLDigits, run=False, save_config_callback=None,
                     args=["--trainer.callbacks+=lightning_gradguard.GradGuard"])
    assert "Import path does not correspond to a subclass of Callback" in capsys.readouterr().err


def test_pl_guard_belongs_to_both_namespaces():
    guard = GradGuard(on_vanishing="raise")
    assert isinstance(guard, pl.Callback) and isinstance(guard, lightning.pytorch.Callback)
    assert isinstance(guard, CoreGuard)
    assert guard.state_key == CoreGuard().state_key == "GradGuard{'prefix': 'grad/'}"
    assert guard.on_vanishing == ("raise",)


def test_pl_fit_checkpoint_and_resume_keep_the_guards_state(tmp_path):
    guard = GradGuard()
    t = pl_trainer(callbacks=[guard], max_steps=8)
    t.fit(PLDigits(nan_at=3))
    path = tmp_path / "pl.ckpt"
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"][guard.state_key]
    assert state["events"][0]["step"] == 3

    resumed = GradGuard()
    pl_trainer(callbacks=[resumed], max_steps=12).fit(PLDigits(), ckpt_path=path)
    assert [repr(e) for e in resumed.events] == [repr(e) for e in guard.events]  # repr: nan == nan
    assert resumed._watches[0].counts["steps"] == 12 and resumed._watches[0].counts["skipped"] == 1
    assert resumed._watches[0].detector.steps == 12


def test_a_lightning_checkpoint_resumes_under_pytorch_lightning(tmp_path):
    guard = CoreGuard()
    t = lightning_trainer(callbacks=[guard], max_steps=6)
    t.fit(DigitsMLP(), digits_loader())
    path = tmp_path / "lightning.ckpt"
    t.save_checkpoint(path)

    resumed = GradGuard()
    pl_trainer(callbacks=[resumed], max_steps=9).fit(PLDigits(), ckpt_path=path)
    assert resumed._watches[0].counts["steps"] == 9 and resumed._watches[0].detector.steps == 9


def test_pl_lightning_cli_builds_the_pl_guard_from_yaml_and_flags(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_steps: 4\n  logger: false\n  enable_checkpointing: false\n  enable_progress_bar: false\n"
        "  callbacks:\n"
        "    - class_path: lightning_gradguard.pl.GradGuard\n"
        "      init_args: {on_vanishing: raise, vanish_patience: 12}\n"
    )
    cli = LightningCLI(PLDigits, run=False, save_config_callback=None,
                       args=["--config", str(config), "--trainer.callbacks.init_args.on_exploding=[skip,alert]"])
    (guard,) = [c for c in cli.trainer.callbacks if isinstance(c, GradGuard)]
    assert guard.on_vanishing == ("raise",) and guard.on_exploding == ("skip", "alert")
    assert guard.config.vanish_patience == 12
    cli.trainer.fit(cli.model)
    assert guard._watches[0].counts["steps"] == 4


def test_check_gradients_on_a_pytorch_lightning_module():
    report = check_gradients(PLDigits(), max_steps=20)  # the module's own train_dataloader
    assert report.healthy and report.steps == 20
    with pytest.raises(GradientHealthError, match="vanishing at step 14"):
        check_gradients(PLDigits(depth=20, activation="sigmoid", lr=0.1))
