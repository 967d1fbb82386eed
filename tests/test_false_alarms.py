"""Healthy training that used to raise false alarms with ``GradGuard()``'s defaults, in a real Trainer."""

import os
import sys

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import digits, trainer
from lightning_gradguard import GradGuard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from scenarios import _digits_tensors  # noqa: E402  (load_digits, standardised per pixel)


class SmallBatchMLP(pl.LightningModule):
    """Plain MLP on load_digits, Adam 1e-3. At batch 4 the loss converges to ~0.03 on most batches and 1-3 on a
    few: the running levels of the loss and of the gradient norms jump with every bad batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def small_batch_fit(guard: GradGuard, seed: int) -> None:
    x, y = _digits_tensors()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    pl.seed_everything(seed, verbose=False)
    trainer(max_steps=1500, max_epochs=-1, callbacks=[guard]).fit(SmallBatchMLP(), loader)


@pytest.mark.parametrize("seed", [0, 2])
def test_small_batch_noise_is_not_a_divergence(seed):
    """Each seed raised 6-8 "growth" alarms (10x within 50 steps, the loss level up by a few bad batches: more
    than 1% of the initial loss) and then clipped 41-47% of all steps. The loss must now rise by more than its
    own jitter too."""
    guard = GradGuard()
    small_batch_fit(guard, seed)
    assert [(e.step, e.reason) for e in guard.events] == []
    assert guard.summary()["clipped_fraction"] == 0.0


class Curriculum(pl.LightningModule):
    """Digits 0-4 until step 400, then all ten (healthy: the loss and the gradients jump once, for good, then
    the loss falls again). Adam 1e-3, batches of 64 drawn from the dataset."""

    def __init__(self, losses: list) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        x, y = _digits_tensors()
        self.data, self.easy = (x, y), (x[y < 5], y[y < 5])
        self.draw, self.losses = torch.Generator().manual_seed(0), losses

    def training_step(self, batch, batch_idx):
        x, y = self.easy if self.global_step < 400 else self.data
        pick = torch.randint(0, len(y), (64,), generator=self.draw)
        loss = nn.functional.cross_entropy(self.net(x[pick]), y[pick])
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_healthy_change_of_phase_is_not_clipped_for_good(seed):
    """At the switch to ten classes the gradients jump: spikes, then growth, and the clip limit is anchored to
    the level before it. The norms of the new phase stay above that level for good, so every later step was
    clipped (800 of 1200) and the run ended at 40x the loss of the same run without the guard. While the loss
    falls the anchors now loosen, and the clip lets go."""
    loader = DataLoader(TensorDataset(torch.zeros(1200, 1)), batch_size=1)  # the module draws its own batches
    guard, runs = GradGuard(), {}
    for name, callbacks in (("guard", [guard]), ("none", [])):
        losses = runs[name] = []
        pl.seed_everything(seed, verbose=False)
        trainer(max_steps=1200, callbacks=callbacks).fit(Curriculum(losses), loader)
    growth = [e.step for e in guard.events if e.reason == "growth"]
    assert growth and all(400 <= step < 420 for step in growth)  # the switch is seen (spikes, and growth)
    watch = guard._watches[0]
    assert watch.anchor is None and watch.counts["clipped"] < 400  # let go (it clipped 800 steps)
    final = {name: sum(losses[-100:]) / 100 for name, losses in runs.items()}
    assert final["guard"] < 1.5 * final["none"], final  # (it ended at 40x)


def test_loosened_anchors_survive_a_resume(tmp_path):
    """The anchors as loosened, the level each was set at (the floor they tighten back to), when and whether
    the long hold was reported go into the checkpoint (weights_only) and come back on resume."""
    loader = DataLoader(TensorDataset(torch.zeros(1200, 1)), batch_size=1)
    first = GradGuard()
    pl.seed_everything(0, verbose=False)
    t = trainer(max_steps=600, callbacks=[first])
    t.fit(Curriculum([]), loader)
    before = first._watches[0]
    assert (before.anchor > 2 * before.anchor_first).all()  # loosened since the switch at step 400
    t.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"][first.state_key]["watches"][0]["anchor"]
    assert state[2:4] == [before.anchor_since, before.anchor_warned]
    resumed = GradGuard()
    trainer(max_steps=601, callbacks=[resumed]).fit(Curriculum([]), loader, ckpt_path=tmp_path / "c.ckpt")
    after = resumed._watches[0]
    assert (after.anchor_since, after.anchor_warned) == (before.anchor_since, before.anchor_warned)
    assert after.anchor_first.tolist() == before.anchor_first.tolist()
    assert after.anchor / before.anchor == pytest.approx(np.ones(4), rel=0.03)  # one step on: x2 per 25 at most


class AuxEvery10(pl.LightningModule):
    """A classifier with an auxiliary head (reconstruct the input from the features) whose loss is added every
    10th step only: the head has a gradient at those steps alone. Adam 1e-3, batches of 64."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.head, self.aux = nn.Linear(128, 10), nn.Linear(128, 64)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        loss = nn.functional.cross_entropy(self.head(h), y)
        if self.global_step % 10 == 0:
            loss = loss + nn.functional.mse_loss(self.aux(h), x)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_head_used_every_10th_step_is_no_spike_of_the_global_norm(seed):
    """Each time the auxiliary head had a gradient again the global norm jumped (the head's gradient is most
    of it) and was flagged as a spike, and clipped: 18-28 times in 1,200 steps once the main loss had
    converged. A global spike at a step where a layer without a gradient at the last step has one again
    now counts only if some layer's own series spikes too."""
    x, y = _digits_tensors()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    pl.seed_everything(seed, verbose=False)
    guard = GradGuard()
    trainer(max_steps=1200, max_epochs=-1, callbacks=[guard]).fit(AuxEvery10(), loader)
    assert [e for e in guard.events if e.layer is None] == []  # no global spike
    assert len(guard.events) <= 8  # a trunk layer's own series can still spike at the head's steps


def test_sync_deferred_does_not_clip_a_layer_coming_back_either():
    """The device half of ``sync="deferred"`` compared the global norm with its limit whatever layers had
    come back: it clipped the auxiliary head's steps that ``sync="step"`` no longer flags (11 clips in
    1,200 steps with no event). Both modes now clip the same steps, each with its event."""

    class Fused(AuxEvery10):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)

    x, y = _digits_tensors()
    clipped = {}
    for sync in ("step", "deferred"):
        loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(0))
        pl.seed_everything(0, verbose=False)
        guard = GradGuard(sync=sync)
        trainer(max_steps=1200, max_epochs=-1, callbacks=[guard]).fit(Fused(), loader)
        clipped[sync] = guard._watches[0].counts["clipped"]
        assert clipped[sync] == len(guard.events) and all(e.layer is not None for e in guard.events)
    assert clipped["deferred"] == clipped["step"]


def test_anchors_from_a_checkpoint_that_lacks_their_start_count_their_hold_from_the_resume(tmp_path, caplog):
    """A checkpoint written before the anchors' start was kept holds ``[anchor, until]`` only: the hold was
    counted from step 0, so a resume at step 600 warned at once of a 600-step hold ("found at step 0")."""
    import logging

    loader = DataLoader(TensorDataset(torch.zeros(1200, 1)), batch_size=1)
    first = GradGuard()
    pl.seed_everything(0, verbose=False)
    t = trainer(max_steps=600, callbacks=[first])
    t.fit(Curriculum([]), loader)
    t.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True)
    watch_state = ckpt["callbacks"][first.state_key]["watches"][0]
    watch_state["anchor"] = watch_state["anchor"][:2]  # the earlier format
    torch.save(ckpt, tmp_path / "old.ckpt")
    resumed = GradGuard()
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        trainer(max_steps=602, callbacks=[resumed]).fit(Curriculum([]), loader, ckpt_path=tmp_path / "old.ckpt")
    assert "clipped by the anchors" not in caplog.text
    after = resumed._watches[0]
    assert after.anchor_since == 600 and not after.anchor_warned
    assert after.anchor_first.tolist() == pytest.approx(first._watches[0].anchor.tolist())  # the floor: as it was


class SmallCNN(pl.LightningModule):
    """Two 3x3 convolutions with BatchNorm on the 8x8 digits, SGD with momentum; gradients x 100 at ``spike_at``
    (BatchNorm absorbs a scaled input)."""

    def __init__(self, spike_at: int = -1, fused: bool = False) -> None:
        super().__init__()
        self.spike_at, self.fused = spike_at, fused
        self.c = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.c(x.view(-1, 1, 8, 8)), y)

    def on_after_backward(self):
        if self.global_step == self.spike_at:
            for p in self.parameters():
                p.grad.mul_(100.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, fused=self.fused)


@pytest.mark.parametrize(("seed", "sync"), [(0, "step"), (2, "step"), (2, "deferred")])
def test_an_epochs_partial_last_batch_is_not_a_spike(seed, sync):
    """1797 digits in batches of 32 leave 5 in the last batch of each epoch (DataLoader's drop_last=False):
    its gradient noise is sqrt(32/5) = 2.5x larger, and its norms reached 4.1-4.7x their level (the spike
    floor is 4x); 2-3 false spikes per 171 steps on every seed, each clipped. A real spike in that batch is
    still one."""
    x, y = _digits_tensors()
    assert len(x) % 32 == 5
    loader = DataLoader(TensorDataset(x, y), batch_size=32)  # 57 batches: steps 56, 113, 170 hold 5 samples
    pl.seed_everything(seed, verbose=False)
    guard = GradGuard(sync=sync)
    trainer(max_steps=171, max_epochs=-1, callbacks=[guard]).fit(SmallCNN(fused=sync == "deferred"), loader)
    assert guard.events == [] and guard.summary()["clipped_fraction"] == 0
    pl.seed_everything(seed, verbose=False)
    guard = GradGuard(sync=sync)
    trainer(max_steps=114, max_epochs=-1, callbacks=[guard]).fit(SmallCNN(113, fused=sync == "deferred"), loader)
    assert [(e.step, e.kind, e.actions) for e in guard.events] == [(113, "exploding", ("clip", "alert"))]


def test_the_samples_of_a_batch_are_found_cheaply_and_not_judged_across_ranks():
    from collections import UserDict
    from dataclasses import dataclass

    from lightning_gradguard.callback import _batch_size

    @dataclass
    class Batch:
        ids: list
        x: torch.Tensor

    assert _batch_size((torch.zeros(5, 3), torch.zeros(5))) == 5
    assert _batch_size(UserDict(text=["a"], x=torch.zeros(7, 2))) == 7  # a Mapping (HF's BatchEncoding)
    assert _batch_size(Batch([1, 2], torch.zeros(9))) == 9
    assert _batch_size({"input_ids": [[1] * 512] * 32}) == 0  # Python lists of ints: not walked, no size
    assert _batch_size(object()) == 0
    guard = GradGuard()
    guard._usual_samples, guard._samples = 32, 5
    assert guard._step_slack() == 0.0  # not the epoch's last batch: a size that varies by design (time-major)
    guard._samples_read, guard._epoch_end = False, True
    assert guard._step_slack() == pytest.approx(0.5 * np.log10(32 / 5))
    guard._samples_read, guard._world_size = False, 2  # several ranks: their batches are not this one's
    assert guard._step_slack() == 0.0


class ReturnedLosses(pl.LightningModule):
    """MLP on load_digits, batches of 8, SGD 5e-2 with momentum; keeps the losses its ``training_step`` returned."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=5e-2, momentum=0.9)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_change_of_the_accumulation_count_is_no_jump_of_the_loss(seed):
    """Lightning hands callbacks the loss divided by ``accumulate_grad_batches``. Read as it was, a
    ``GradientAccumulationScheduler`` going from 32 to 1 looked like the loss rising 5x while it fell 3x: the
    gate of sustained growth opened, a false "growth" event followed and its anchor clipped ~75% of the rest of
    the run, on every seed (and, going from 1 to 16, the loss looked converged 16x too early, which turns the
    vanishing detection off). The trend now sees the loss ``training_step`` returned."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    x, y = digits()  # pixels / 16, not standardised
    pl.seed_everything(seed, verbose=False)
    model, guard = ReturnedLosses(), GradGuard()
    trainer(max_epochs=3, max_steps=-1, callbacks=[GradientAccumulationScheduler({0: 32, 2: 1}), guard]).fit(
        model, DataLoader(TensorDataset(x, y), batch_size=8))
    assert guard.summary()["steps"] == 241  # 2 epochs of 7 steps, then 225 of one batch each
    assert [(e.step, e.reason, e.layer) for e in guard.events] == []
    assert guard.summary()["clipped_fraction"] == 0.0
    warmup = guard.config.warmup_steps
    assert guard._loss.first == pytest.approx(np.mean(model.losses[:warmup]), rel=1e-5)  # not 1/32 of it


class RingGAN(pl.LightningModule):
    """Lightning's documented GAN pattern: manual optimization, two optimizers, ``training_step`` returns
    nothing. WGAN-GP on a ring of 8 Gaussians (2-D)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.G = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
        self.D = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2),
                               nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        fake = self.G(torch.randn(x.shape[0], 8))
        d_loss = self.D(fake.detach()).mean() - self.D(x).mean()
        a = torch.rand(x.shape[0], 1)
        mixed = (a * x + (1 - a) * fake.detach()).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.D(mixed).sum(), mixed, create_graph=True)
        d_loss = d_loss + 10 * ((grad.norm(dim=1) - 1) ** 2).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        opt_g.zero_grad()
        self.manual_backward(-self.D(fake).mean())
        opt_g.step()

    def configure_optimizers(self):
        return (torch.optim.Adam(self.G.parameters(), lr=1e-3, betas=(0.0, 0.9)),
                torch.optim.Adam(self.D.parameters(), lr=1e-3, betas=(0.0, 0.9)))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_gans_generator_growing_as_the_discriminator_learns_is_no_divergence(seed):
    """Without a loss to read (or with several optimizers, whose players pull against each other) the growth gate
    was open: the generator's gradients grow as the discriminator learns, 2-4 growth events came within the first
    ~60 steps, and the anchors, which only a falling loss loosens, clipped every generator step 10-80x for the
    rest of the run."""
    g = torch.Generator().manual_seed(77 + seed)
    angle = torch.randint(0, 8, (4096,), generator=g).float() * 2 * np.pi / 8
    ring = torch.stack([2 * angle.cos(), 2 * angle.sin()], 1) + 0.05 * torch.randn(4096, 2, generator=g)
    pl.seed_everything(seed, verbose=False)
    guard = GradGuard()
    trainer(max_steps=600, max_epochs=-1, callbacks=[guard]).fit(
        RingGAN(), DataLoader(TensorDataset(ring), batch_size=64, shuffle=True, generator=g))
    assert guard.summary()["steps"] == 600
    assert [(e.step, e.reason, e.layer) for e in guard.events] == []
    assert guard.summary()["clipped_fraction"] == 0.0
