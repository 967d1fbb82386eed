"""Threshold study: how every detection default was chosen from the scenario suite.

Each scenario of ``benchmarks/scenarios.py`` is trained once with a recorder
that measures, every optimizer step, exactly what ``GradGuard`` feeds its
detectors (global + per-layer norms from :func:`lightning_gradguard.grad_stats`,
the global weight norm during warm-up, the training loss). The detectors are
plain torch, so the recorded traces are then *replayed* through
:class:`~lightning_gradguard.detectors.TrendDetector` and
:class:`~lightning_gradguard.detectors.LossTrend` under many settings in
seconds, one threshold varied at a time around the defaults, and scored like
``benchmarks/detection.py`` (a flag of the expected kind at or after the onset
is a detection; any flag before it, or on a healthy run, a false alarm).

Run: ``python benchmarks/tune.py`` (~2 min on 2 cores); writes
``benchmarks/results/thresholds.md``. Also reports the headroom of the
defaults: the largest value each test reached on the healthy runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.dirname(__file__))

from detection import machine_info  # noqa: E402
from scenarios import SCENARIOS, run_scenario  # noqa: E402

from lightning_gradguard import LayerPlan, grad_stats  # noqa: E402
from lightning_gradguard.detectors import Code, DetectorConfig, LossTrend, Row, TrendDetector  # noqa: E402

DEFAULTS = DetectorConfig()
CONVERGED_RATIO = 0.01  # GradGuard's converged_loss_ratio default

# one threshold at a time, around the default (which is in each list)
SWEEP: dict[str, list] = {
    "spike_zscore": [3.0, 4.0, 5.0, 6.0, 8.0, 12.0],
    "spike_min_ratio": [1.5, 2.0, 3.0, 4.0, 8.0, 16.0],
    "warmup_steps": [3, 5, 10, 20, 50],
    "warmup_spike_ratio": [5.0, 10.0, 30.0, 100.0, 1000.0],
    "growth_factor": [2.0, 3.0, 5.0, 10.0, 30.0, 100.0],
    "growth_window": [10, 20, 50, 100],
    "max_grad_weight_ratio": [2.0, 5.0, 10.0, 20.0, 100.0, 1000.0],
    "vanish_factor": [1e2, 1e3, 1e4, 1e5, 1e7],
    "vanish_drop": [1e1, 1e2, 1e3, 1e4],
    "vanish_patience": [5, 10, 20, 50, 100],
    "converged_loss_ratio": [0.3, 0.1, 0.01, 1e-3],
}


class TraceRecorder(Callback):
    """Records, per optimizer step, what the guard's detectors consume."""

    def __init__(self) -> None:
        self.norms: list[np.ndarray] = []
        self.present: list[np.ndarray] = []
        self.nonfinite: list[np.ndarray] = []
        self.weight: list[float] = []
        self.losses: list[float] = []
        self.plan: LayerPlan | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.plan is None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
            self.plan = LayerPlan.from_named_parameters(pl_module.named_parameters(), only=params)
        s = grad_stats(self.plan, param_norms=True)  # a recorder may sync: it is not the guard
        self.norms.append(torch.cat([s.total.reshape(1), s.norm]).double().numpy())
        self.present.append(torch.cat([torch.ones(1, dtype=torch.bool), s.present]).numpy())
        self.nonfinite.append(torch.cat([s.nonfinite.any().reshape(1), s.nonfinite]).numpy())
        self.weight.append(float(s.param_norm.square().sum().sqrt()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def record(name: str) -> dict:
    scenario = SCENARIOS[name]
    rec = TraceRecorder()
    run_scenario(scenario, callbacks=[rec])
    return {"scenario": scenario, "rec": rec, "layers": rec.plan.layers if rec.plan else ()}


def replay(trace: dict, cfg: DetectorConfig, converged_ratio: float) -> dict:
    """Flags per step (as the guard would raise them) and the largest values each test reached."""
    rec = trace["rec"]
    det = TrendDetector(cfg, len(trace["layers"]) + 1)
    loss = LossTrend(cfg.warmup_steps, cfg.growth_window, converged_ratio)
    flags: list[tuple[int, str]] = []
    peak = {"sigma": 0.0, "ratio": 0.0, "growth": 0.0, "grad_weight": 0.0, "vanish_streak": 0.0}
    for t, norm in enumerate(rec.norms):
        weight = None
        if t < cfg.warmup_steps:
            weight = np.full(norm.shape, math.nan)
            weight[0] = rec.weight[t]
        rep = det.update(norm, rec.present[t], rec.nonfinite[t], converged=loss.converged(),
                         worsening=loss.worsening(), weight_norm=weight)
        code = rep[Row.CODE].astype(np.int64)
        if (code & Code.NONFINITE).any():
            flags.append((t, "nonfinite"))
        if (code & Code.EXPLODING).any():
            flags.append((t, "exploding"))
        if (code & Code.VANISH).any():
            flags.append((t, "vanishing"))
        with np.errstate(all="ignore"):
            finite = np.isfinite(rep[Row.NORM]) & (rep[Row.NORM] > 0)
            if t >= cfg.warmup_steps and finite.any():
                x = np.log10(rep[Row.NORM][finite])
                sigma = (x - rep[Row.LEVEL][finite]) / np.maximum(rep[Row.SCALE][finite], cfg.min_scale)
                peak["sigma"] = max(peak["sigma"], float(sigma.max()))
                peak["ratio"] = max(peak["ratio"], float((x - rep[Row.LEVEL][finite]).max()))
            growth = rep[Row.FAST] - rep[Row.GROWTH_BASE]
        if loss.worsening() is not False and np.isfinite(growth).any():
            peak["growth"] = max(peak["growth"], float(growth[np.isfinite(growth)].max()))
        gw = rep[Row.GRAD_WEIGHT, 0]
        if np.isfinite(gw):
            peak["grad_weight"] = max(peak["grad_weight"], float(gw))
        if not loss.converged():
            peak["vanish_streak"] = max(peak["vanish_streak"], float(rep[Row.STREAK].max()))
        loss.observe(rec.losses[t] if t < len(rec.losses) else math.nan)
    return {"flags": flags, "peak": peak}


def score(trace: dict, flags: list[tuple[int, str]]) -> dict:
    sc = trace["scenario"]
    if sc.expected is None:
        return {"detected": None, "latency": None, "false": len({t for t, _ in flags})}
    hit = next((t for t, kind in flags if kind == sc.expected and t >= sc.onset), None)
    stop = hit if hit is not None else math.inf
    false = {t for t, kind in flags if t < sc.onset or (kind != sc.expected and t < stop)}
    return {"detected": hit is not None, "latency": None if hit is None else hit - sc.onset, "false": len(false)}


def evaluate(traces: list[dict], cfg: DetectorConfig, converged_ratio: float) -> dict:
    rows = [score(tr, replay(tr, cfg, converged_ratio)["flags"]) for tr in traces]
    patho = [(tr, r) for tr, r in zip(traces, rows) if tr["scenario"].expected is not None]
    by_kind: dict[str, list] = {}
    for tr, r in patho:
        by_kind.setdefault(tr["scenario"].expected, []).append(r)
    lat = [r["latency"] for _, r in patho if r["latency"] is not None]
    return {
        "detected": {k: f"{sum(bool(r['detected']) for r in v)}/{len(v)}" for k, v in sorted(by_kind.items())},
        "missed": [tr["scenario"].name for tr, r in patho if not r["detected"]],
        "latency_max": {k: max([r["latency"] for r in v if r["latency"] is not None], default=None) for k, v in sorted(by_kind.items())},
        "latency_median": sorted(lat)[len(lat) // 2] if lat else None,
        "false_healthy": sum(r["false"] for tr, r in zip(traces, rows) if tr["scenario"].expected is None),
        "false_patho": sum(r["false"] for _, r in patho),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    traces = [record(name) for name in SCENARIOS]
    t_record = time.time() - t0
    healthy_steps = sum(len(tr["rec"].norms) for tr in traces if tr["scenario"].expected is None)

    lines = ["# Detection thresholds, chosen from the scenario suite", ""]
    info = machine_info()
    lines += [f"Machine: {info['cpu']} ({info['cores']} cores); python {info['python']}, torch {info['torch']}, "
              f"lightning {info['lightning']}; {info['date']}. Command: `python benchmarks/tune.py`.", ""]
    lines += [
        f"{len(traces)} scenarios recorded once ({healthy_steps} healthy steps, {t_record:.0f} s), then replayed through",
        "the detectors with one threshold varied at a time (all others at their defaults). A flag of the expected",
        "kind at or after the onset is a detection; any flag before the onset, of another kind before the detection,",
        "or on a healthy run is a false alarm (counted in steps; stricter than events, which are one per incident).",
        "",
    ]
    base = evaluate(traces, DEFAULTS, CONVERGED_RATIO)
    lines += [f"**Defaults**: detected {base['detected']}, latency max {base['latency_max']}, "
              f"false alarms {base['false_healthy']} healthy / {base['false_patho']} pathological.", ""]

    lines += ["## Headroom of the defaults on the healthy runs", "",
              "| scenario | max spike (sigma) | max spike (x level) | max growth while loss worsens | max grad/weight (warm-up) | longest vanishing streak |",
              "|---|---|---|---|---|---|"]
    for tr in traces:
        if tr["scenario"].expected is not None:
            continue
        p = replay(tr, DEFAULTS, CONVERGED_RATIO)["peak"]
        lines.append(f"| {tr['scenario'].name} | {p['sigma']:.1f} (threshold {DEFAULTS.spike_zscore:g}) | "
                     f"{10 ** p['ratio']:.2g}x ({DEFAULTS.spike_min_ratio:g}x) | {10 ** p['growth']:.2g}x ({DEFAULTS.growth_factor:g}x) | "
                     f"{p['grad_weight']:.2g} ({DEFAULTS.max_grad_weight_ratio:g}) | {p['vanish_streak']:.0f} ({DEFAULTS.vanish_patience}) |")
    lines.append("")
    lines.append("A spike needs both columns over their thresholds at the same step; growth needs a worsening loss.")
    lines.append("")

    lines += ["## One threshold at a time", "",
              "| threshold | value | detected | missed | max latency per kind | false alarms (healthy / pathological steps) |",
              "|---|---|---|---|---|---|"]
    for name, values in SWEEP.items():
        for value in values:
            if name == "converged_loss_ratio":
                cfg, conv = DEFAULTS, value
                default = value == CONVERGED_RATIO
            else:
                cfg, conv = dataclasses.replace(DEFAULTS, **{name: value}), CONVERGED_RATIO
                default = value == getattr(DEFAULTS, name)
            if name == "growth_window" and cfg.growth_min_steps > value:
                cfg = dataclasses.replace(cfg, growth_min_steps=value)
            r = evaluate(traces, cfg, conv)
            mark = " **(default)**" if default else ""
            lat = ", ".join(f"{k} {v}" for k, v in r["latency_max"].items())
            lines.append(f"| {name} | {value:g}{mark} | {', '.join(f'{k} {v}' for k, v in r['detected'].items())} | "
                         f"{', '.join(r['missed']) or '-'} | {lat} | {r['false_healthy']} / {r['false_patho']} |")
            print(lines[-1], flush=True)
    lines += ["", f"Total time {time.time() - t0:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        out = os.path.join(os.path.dirname(__file__), "results", "thresholds.md")
        with open(out, "w") as f:
            f.write(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
