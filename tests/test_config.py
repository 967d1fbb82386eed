"""Every bad argument is refused at construction, naming the argument, the value and the fix."""

import numpy as np
import pytest

from lightning_gradguard import GradGuard

BAD = [
    (dict(on_nonfinite="clip"), r"`on_nonfinite` got 'clip': clipping cannot repair NaN/Inf gradients.*use 'skip'"),
    (dict(on_vanishing="clip"), r"`on_vanishing` got 'clip': clipping only ever shrinks gradients"),
    (dict(on_vanishing="reduce_lr"), r"`on_vanishing` got 'reduce_lr': a smaller learning rate makes vanishing"),
    (dict(on_vanishing=("alert", "skip")), r"`on_vanishing` got 'skip': vanishing is a trend"),
    (dict(on_vanishing="rollback"), r"`on_vanishing` got 'rollback'"),
    (dict(on_exploding="clipp"), r"`on_exploding` got 'clipp', which is not a response\. Choose from 'log', 'alert', 'clip'"),
    (dict(on_exploding=("clip", "skip")), r"`on_exploding` got both 'clip' and 'skip': a skipped step has no gradients"),
    (dict(on_nonfinite=("stop", "raise")), r"`on_nonfinite` got both 'raise' and 'stop'"),
    (dict(on_nonfinite=("stop", "alert")),
     r"`on_nonfinite` got \('stop', 'alert'\): 'stop' ends the run after the step, so that step's NaN/Inf gradients "
     r"still reach the weights.*on_nonfinite=\('skip', 'stop', 'alert'\)"),
    (dict(on_nonfinite="stop"), r"`on_nonfinite` got 'stop': .*on_nonfinite=\('skip', 'stop'\)"),
    (dict(on_exploding=()), r"`on_exploding` must be a response name or a non-empty sequence of names, got \(\)"),
    (dict(on_exploding=3), r"`on_exploding` must be a response name or a non-empty sequence"),
    (dict(log_every_n_steps=0), r"`log_every_n_steps` must be at least 1, got 0"),
    (dict(log_every_n_steps=2.5), r"`log_every_n_steps` must be an integer or None, got 2.5"),
    (dict(log_layers="some"), r"`log_layers` must be one of 'all', 'topk', 'none', got 'some'"),
    (dict(top_k=0), r"`top_k` must be at least 1, got 0"),
    (dict(group_depth=0), r"`group_depth` must be at least 1, got 0"),
    (dict(detail_every_n_steps=-1), r"`detail_every_n_steps` must be at least 0, got -1"),
    (dict(warmup_steps=0), r"`warmup_steps` must be at least 1, got 0"),
    (dict(spike_zscore=0), r"`spike_zscore` must be greater than 0, got 0"),
    (dict(spike_zscore=float("nan")), r"`spike_zscore` must be a number, got nan"),
    (dict(spike_min_ratio=1), r"`spike_min_ratio` must be greater than 1, got 1"),
    (dict(warmup_spike_ratio=0.5), r"`warmup_spike_ratio` must be greater than 1, got 0.5"),
    (dict(growth_window=1), r"`growth_window` must be at least 2, got 1"),
    (dict(growth_factor=1.0), r"`growth_factor` must be greater than 1, got 1.0"),
    (dict(growth_min_steps=80), r"`growth_min_steps` must be at most 50, got 80. It cannot exceed `growth_window`"),
    (dict(max_norm=-1.0), r"`max_norm` must be greater than 0, got -1.0"),
    (dict(max_norm="1"), r"`max_norm` must be a number or None, got '1'"),
    (dict(max_update_ratio=0), r"`max_update_ratio` must be greater than 0, got 0"),
    (dict(vanish_factor=1), r"`vanish_factor` must be greater than 1, got 1"),
    (dict(vanish_drop=0.1), r"`vanish_drop` must be greater than 1, got 0.1"),
    (dict(vanish_floor=-1e-9), r"`vanish_floor` must be at least 0, got -1e-09"),
    (dict(vanish_patience=0), r"`vanish_patience` must be at least 1, got 0"),
    (dict(converged_loss_ratio=0), r"`converged_loss_ratio` must be greater than 0, got 0"),
    (dict(converged_loss_ratio=2), r"`converged_loss_ratio` must be at most 1, got 2"),
    (dict(amp_overflow_patience=0), r"`amp_overflow_patience` must be at least 1, got 0"),
    (dict(lr_factor=1), r"`lr_factor` must be below 1 to reduce the learning rate, got 1"),
    (dict(lr_factor=0), r"`lr_factor` must be greater than 0, got 0"),
    (dict(lr_cooldown=-1), r"`lr_cooldown` must be at least 0, got -1"),
    (dict(lr_min_scale=0), r"`lr_min_scale` must be greater than 0, got 0"),
    (dict(lr_recover_after=0), r"`lr_recover_after` must be at least 1, got 0"),
    (dict(rollback_every=0), r"`rollback_every` must be at least 1, got 0"),
    (dict(rollback_keep=0), r"`rollback_keep` must be at least 1, got 0"),
    (dict(rollback_margin=-1), r"`rollback_margin` must be at least 0, got -1"),
    (dict(max_rollbacks=0), r"`max_rollbacks` must be at least 1, got 0"),
    (dict(prefix=""), r"`prefix` must be a non-empty string such as 'grad/', got ''"),
    (dict(top_k=True), r"`top_k` must be an integer, got True"),
    # no upper bound here made every step fail inside the guard (a 30 GB ring of past levels, a MemoryError)
    (dict(growth_window=10**9), r"`growth_window` must be at most 10000, got 1000000000"),
    (dict(rollback_keep=10**9), r"`rollback_keep` must be at most 100, got 1000000000"),
    # accepted before, and 'reduce_lr' then never reduced anything
    (dict(lr_min_scale=1.0), r"`lr_min_scale` must be below 1, got 1: 'reduce_lr' could not reduce"),
    (dict(sinks="abc"), r"`sinks` must be a list of GuardSink instances, got 'abc'\. Wrap a single one"),
    (dict(record=""), r"`record` must be True \(the log folder\), a file or folder path, or None, got ''"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[next(iter(k)) + "=" + repr(next(iter(k.values()))) for k, _ in BAD])
def test_bad_argument_is_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradGuard(**kwargs)


def test_defaults_and_normalisation():
    g = GradGuard(on_exploding="raise", on_vanishing=["log", "log", "alert"])
    assert g.on_exploding == ("raise",)
    assert g.on_vanishing == ("log", "alert")
    assert GradGuard().on_nonfinite == ("skip", "alert")
    # sync="deferred" stops a step late anyway, and its skip needs a fused optimizer (not every optimizer has one)
    assert GradGuard(sync="deferred", on_nonfinite=("stop", "alert")).on_nonfinite == ("stop", "alert")


def test_numpy_numbers_are_numbers():
    """``top_k=np.int64(5)`` was refused as "must be an integer"; numpy scalars now pass, as Python numbers."""
    import numpy as np

    g = GradGuard(top_k=np.int64(5), spike_zscore=np.float32(5.5), log_every_n_steps=np.int32(10))
    assert (g.top_k, g.config.spike_zscore, g.log_every_n_steps) == (5, 5.5, 10)
    assert type(g.top_k) is int and type(g.config.spike_zscore) is float and type(g.log_every_n_steps) is int
    with pytest.raises(ValueError, match=r"`top_k` must be an integer, got np.float64\(5.0\)"):
        GradGuard(top_k=np.float64(5.0))
    with pytest.raises(ValueError, match=r"`spike_zscore` must be a number, got np.float32\(nan\)"):
        GradGuard(spike_zscore=np.float32("nan"))


def test_record_argument():
    from lightning_gradguard import RecordSink

    assert isinstance(GradGuard(record=True).sinks[-1], RecordSink)
    assert GradGuard(record=None).sinks == []
    with pytest.raises(ValueError, match=r"`record` must be True \(the log folder\), a file or folder path, or None, got 3"):
        GradGuard(record=3)
    with pytest.raises(ValueError, match=r"`sinks` must hold GuardSink instances"):
        GradGuard(sinks=[object()])
    with pytest.raises(ValueError, match=r"`sinks` must be a list of GuardSink instances, got <lightning_gradguard"):
        GradGuard(sinks=RecordSink())  # one sink, not in a list
    # two sinks writing one file overwrote each other: a corrupt record, and the `gradguard` gate exited 2
    with pytest.raises(ValueError, match=r"`record` and a RecordSink in `sinks` would write the same run record twice"):
        GradGuard(record=True, sinks=[RecordSink(digits=2)])
    with pytest.raises(ValueError, match=r"`wandb` must be None \(automatic\), True or False, got 'yes'"):
        GradGuard(wandb="yes")
    with pytest.raises(ValueError, match=r"`wandb` must be None \(automatic\), True or False, got 1"):
        GradGuard(wandb=1)  # 1 == True: it passed the old check
    assert GradGuard(wandb=np.False_).wandb is False  # a numpy bool is a bool


def test_a_setting_nothing_reads_is_reported(recwarn):
    """``lr_recover_after=100`` without a ``'reduce_lr'`` response did nothing, silently: the user
    expected the LR to be reduced and recovered. Such settings now warn at construction, naming
    the setting, the response lists as they are and the fix; configured or left at the default, nothing."""
    with pytest.warns(UserWarning, match=r"`lr_recover_after=100` has no effect: no response list holds 'reduce_lr' "
                      r"\(on_nonfinite=\('skip', 'alert'\), on_exploding=\('clip', 'alert'\)\)\. Add 'reduce_lr' "
                      r"to on_nonfinite or on_exploding, or drop `lr_recover_after`"):
        GradGuard(lr_recover_after=100)
    with pytest.warns(UserWarning, match=r"`rollback_every=10` has no effect: no response list holds 'rollback'"):
        GradGuard(on_exploding=("clip", "reduce_lr"), rollback_every=10)
    with pytest.warns(UserWarning, match=r"`max_consecutive_skips=5` has no effect: no response list holds 'skip' or "
                      r"'rollback'"):
        GradGuard(on_nonfinite="log", max_consecutive_skips=5)
    with pytest.warns(UserWarning, match=r"`top_k=3` has no effect with `log_layers='all'`"):
        GradGuard(log_layers="all", top_k=3)
    # rollback settings that leave no snapshot rollback_margin old (most of the time, or some of it)
    with pytest.warns(UserWarning, match=r"with rollback_every=5 and rollback_keep=2, the oldest kept snapshot is 6 "
                      r"to 11 steps old at a rollback in steady training, never `rollback_margin=30` old: rollbacks "
                      r"find none and skip instead"):
        GradGuard(on_nonfinite=("rollback", "alert"), rollback_every=5, rollback_margin=30)
    with pytest.warns(UserWarning, match=r"with rollback_every=50 and rollback_keep=1, the oldest kept snapshot is 1 "
                      r"to 51 steps old at a rollback in steady training, so a rollback up to 9 steps after a new "
                      r"snapshot finds none `rollback_margin=10` old"):
        GradGuard(on_exploding=("rollback", "alert"), rollback_keep=1)
    recwarn.clear()
    GradGuard()
    GradGuard(on_exploding=("clip", "reduce_lr"), lr_recover_after=100, lr_factor=0.3, lr_cooldown=5, lr_min_scale=0.1)
    GradGuard(on_nonfinite="rollback", rollback_every=10, rollback_keep=3, rollback_margin=2, max_rollbacks=5)
    GradGuard(on_exploding=("skip", "alert"), on_nonfinite="log", max_consecutive_skips=5)
    GradGuard(log_layers="topk", top_k=3)
    GradGuard(log_layers="all", lr_factor=0.5, rollback_keep=2)  # the defaults, written out (a YAML config)
    GradGuard(on_nonfinite="log", max_consecutive_skips=None)  # turned off: harmless
    assert [str(w.message) for w in recwarn if "GradGuard" in str(w.message)] == []


def test_a_prefix_that_runs_into_the_key_names_warns(recwarn):
    """``prefix="grad"`` logged ``gradnorm_total``: it now warns, with the fix; a separator ends it quietly."""
    with pytest.warns(UserWarning, match=r"`prefix='grad'` runs into the key names \('gradnorm_total'\)\. End it with "
                      r"'/' \('grad/': a section of its own in W&B and TensorBoard\) or '_'"):
        GradGuard(prefix="grad")
    recwarn.clear()
    for fine in ("grad/", "train/grad/", "grad_", "grad."):
        GradGuard(prefix=fine)
    assert [str(w.message) for w in recwarn if "GradGuard" in str(w.message)] == []
