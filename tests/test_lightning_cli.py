"""LightningCLI builds the guard (and its record sink) from YAML and from the command line, then trains with it."""

from __future__ import annotations

import sys

import pytest

from helpers import DigitsMLP, digits_loader
from lightning_gradguard import GradGuard
from lightning_gradguard.record import RecordSink, read_record

jsonargparse = pytest.importorskip("jsonargparse")
from lightning.pytorch.cli import LightningCLI  # noqa: E402

CONFIG = """\
trainer:
  max_steps: 6
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_gradguard.GradGuard
      init_args:
        on_nonfinite: [skip, alert]
        on_exploding: [clip, alert]
        on_vanishing: raise
        vanish_patience: 20
        log_layers: all
        max_norm: 50.0
        sinks:
          - class_path: lightning_gradguard.record.RecordSink
            init_args:
              path: {record}
              every_n_steps: 2
"""


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when given ``args`` while ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


class CliModel(DigitsMLP):
    def train_dataloader(self):
        return digits_loader()


def _cli(*args: str) -> LightningCLI:
    return LightningCLI(CliModel, run=False, save_config_callback=None, args=list(args))


def test_guard_and_record_sink_from_yaml_then_fit(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(record=tmp_path / "rec"))
    # the command line overrides the YAML (the last callback's init_args)
    cli = _cli("--config", str(config), "--trainer.callbacks.init_args.top_k=3")
    (guard,) = [c for c in cli.trainer.callbacks if isinstance(c, GradGuard)]
    responses = (guard.on_nonfinite, guard.on_exploding, guard.on_vanishing)
    assert responses == (("skip", "alert"), ("clip", "alert"), ("raise",))
    assert guard.config.vanish_patience == 20 and guard.config.max_norm == 50.0
    assert guard.log_layers == "all" and guard.top_k == 3
    (sink,) = guard.sinks
    assert isinstance(sink, RecordSink) and sink.every_n_steps == 2

    cli.trainer.fit(cli.model)
    assert guard._watches[0].counts["steps"] == 6
    record = read_record(tmp_path / "rec")
    assert record.steps[0].tolist() == [0, 2, 4]
    assert record.header["config"]["vanish_patience"] == 20


def test_guard_from_the_command_line_alone():
    cli = _cli(
        "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=lightning_gradguard.GradGuard",
        "--trainer.callbacks.on_exploding=[skip,alert]",
        "--trainer.callbacks.vanish_patience=7",
        "--trainer.callbacks.wandb=false",
    )
    (guard,) = [c for c in cli.trainer.callbacks if isinstance(c, GradGuard)]
    assert guard.on_exploding == ("skip", "alert") and guard.config.vanish_patience == 7 and guard.wandb is False
    assert guard.on_nonfinite == ("skip", "alert")  # untouched defaults stay
    cli.trainer.fit(cli.model)
    assert guard._watches[0].counts["steps"] == 3


def test_bad_values_fail_with_the_guards_own_message(capsys):
    # a name outside the Literal: jsonargparse refuses it while parsing
    with pytest.raises(SystemExit):
        _cli("--trainer.callbacks+=lightning_gradguard.GradGuard", "--trainer.callbacks.on_vanishing=boil")
    assert "on_vanishing" in capsys.readouterr().err
    # a valid name that makes no sense for the condition: the guard's construction message comes through
    with pytest.raises(ValueError, match="`on_vanishing` got 'clip': clipping only ever shrinks gradients"):
        _cli("--trainer.callbacks+=lightning_gradguard.GradGuard", "--trainer.callbacks.on_vanishing=clip")
