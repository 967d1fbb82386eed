"""Detection benchmark: how fast and how cleanly GradGuard names each scenario's pathology.

Runs every scenario of ``benchmarks/scenarios.py`` with
``GradGuard(on_nonfinite="log", on_exploding="log", on_vanishing="log")`` and
scores the guard's events against the known onset: first matching event,
latency (event step - onset), false alarms (events before the onset, events of
a wrong kind before the detection, any event on a healthy run). Writes
``benchmarks/results/detection.md`` and ``benchmarks/results/detection.json``.

    python benchmarks/detection.py                 # all scenarios, writes the results
    python benchmarks/detection.py --small         # only the cheap ones (prints only)
    python benchmarks/detection.py --only lr_jump,dying_relu   # (prints only)
    python benchmarks/detection.py --check         # no guard: show each pathology
    python benchmarks/detection.py --seeds 3       # every scenario with seeds 0, 1, 2 (15,000 healthy steps)

``--check`` needs no guard at all: it prints, per scenario and for its
fault-free twin, the global gradient norm around the onset, per-layer norms for
the vanishing ones and the loss trajectory, as measured by a small probe.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

try:  # imported as ``benchmarks.detection`` (tests)
    from .scenarios import SCENARIOS, ScenarioResult, run_scenario, select
except ImportError:  # run as ``python benchmarks/detection.py``: make the repo root importable
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    from scenarios import SCENARIOS, ScenarioResult, run_scenario, select  # type: ignore[no-redef]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KINDS = ("nonfinite", "exploding", "vanishing")


# --------------------------------------------------------------------------- #
# Scoring
# --------------------------------------------------------------------------- #


def _guard_events(result: ScenarioResult) -> list[Any]:
    """Events of the first callback that has an ``events`` list (the guard)."""
    for cb in result.callbacks:
        events = getattr(cb, "events", None)
        if events is not None:
            return list(events)
    return []


def _layer_matches(layer: Optional[str], expected: Optional[str], accepted: Sequence[str] = ()) -> Optional[bool]:
    """Whether ``layer`` names the expected (or an accepted) module or one of its parameters.

    ``net.2`` matches ``net.2`` and ``net.2.weight``; None when nothing is expected.
    """
    if expected is None:
        return None
    if layer is None:
        return False
    return any(layer == name or layer.startswith(name + ".") for name in (expected, *accepted))


def evaluate(results: Iterable[ScenarioResult]) -> list[dict[str, Any]]:
    """One row per result: detection, latency and false alarms of the guard's events.

    * healthy scenario: every event is a false alarm;
    * pathological scenario: the first event of the expected kind at or after
      the onset is the detection; false alarms are the events before the onset
      plus the events of another kind after the onset but before the
      detection step (all of them when nothing was detected).
    """
    rows = []
    for res in results:
        sc = res.scenario
        events = sorted(_guard_events(res), key=lambda e: e.step)
        row: dict[str, Any] = {
            "scenario": sc.name,
            "expected": sc.expected,
            "onset": sc.onset,
            "expected_layer": sc.expected_layer,
            "steps": res.steps,
            "events": len(events),
            "detected": False,
            "event_kind": None,
            "event_step": None,
            "event_layer": None,
            "event_value": None,
            "event_threshold": None,
            "latency": None,
            "layer_ok": None,
            "false_alarms": 0,
            "false_alarm_steps": [],
            "first_nonfinite_loss_step": res.first_nonfinite_loss_step,
            "final_loss": res.final_loss,
            "wall_time_s": round(res.wall_time_s, 3),
        }
        if sc.expected is None:
            false = events
        else:
            hit = next((e for e in events if e.kind == sc.expected and e.step >= sc.onset), None)
            stop = hit.step if hit is not None else math.inf
            false = [e for e in events if e.step < sc.onset or (e.kind != sc.expected and e.step < stop)]
            if hit is not None:
                row.update(
                    detected=True,
                    event_kind=hit.kind,
                    event_step=hit.step,
                    event_layer=hit.layer,
                    event_value=_num(hit.value),
                    event_threshold=_num(hit.threshold),
                    latency=hit.step - sc.onset,
                    layer_ok=_layer_matches(hit.layer, sc.expected_layer, sc.accepted_layers),
                )
        row["false_alarms"] = len(false)
        row["false_alarm_steps"] = sorted({e.step for e in false})[:20]
        row["false_alarm_kinds"] = sorted({e.kind for e in false})
        rows.append(row)
    return rows


def _num(x: Any) -> Optional[float]:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Detection rate per kind, latency statistics, false alarms per healthy step."""
    per_kind = {}
    for kind in KINDS:
        of_kind = [r for r in rows if r["expected"] == kind]
        if of_kind:
            per_kind[kind] = {"detected": sum(r["detected"] for r in of_kind), "total": len(of_kind)}
    latencies = [r["latency"] for r in rows if r["latency"] is not None]
    healthy = [r for r in rows if r["expected"] is None]
    return {
        "detection": per_kind,
        "latency_median": statistics.median(latencies) if latencies else None,
        "latency_max": max(latencies) if latencies else None,
        "healthy_false_alarms": sum(r["false_alarms"] for r in healthy),
        "healthy_steps": sum(r["steps"] for r in healthy),
        "pathological_false_alarms": sum(r["false_alarms"] for r in rows if r["expected"] is not None),
    }


def summary_line(s: dict[str, Any]) -> str:
    rates = ", ".join(f"{k} {v['detected']}/{v['total']}" for k, v in s["detection"].items())
    return (
        f"detected: {rates or 'n/a'}; latency median {s['latency_median']}, max {s['latency_max']} steps; "
        f"false alarms: {s['healthy_false_alarms']} over {s['healthy_steps']} healthy steps, "
        f"{s['pathological_false_alarms']} on pathological runs"
    )


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def to_markdown(rows: Sequence[dict[str, Any]], summary: dict[str, Any], info: dict[str, str], guard_desc: str) -> str:
    head = [
        "# GradGuard detection benchmark",
        "",
        f"Machine: {info['cpu']} ({info['cores']} cores, 1 torch thread per run); "
        f"python {info['python']}, torch {info['torch']}, "
        f"lightning {info['lightning']}; {info['date']}.",
        f"Guard: `{guard_desc}`. Command: `python {' '.join(['benchmarks/detection.py', *sys.argv[1:]])}`.",
        "",
        "Latency = step of the first event of the expected kind at or after the onset, minus the onset.",
        "False alarms = events before the onset, events of another kind before the detection,",
        "or any event on a healthy run.",
        "",
        "| scenario | expected | onset | first matching event (kind @ step, layer) | latency | layer ok "
        "| false alarms | events | loss non-finite at | final loss | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    body = []
    for r in rows:
        event = f"{r['event_kind']} @ {r['event_step']}, {r['event_layer'] or 'global'}" if r["detected"] else "-"
        fa = str(r["false_alarms"])
        if r["false_alarms"]:
            fa += f" ({', '.join(r['false_alarm_kinds'])}; steps {', '.join(map(str, r['false_alarm_steps'][:5]))})"
        body.append(
            f"| {r['scenario']} | {r['expected'] or 'healthy'} | {_fmt(r['onset'])} | {event} | "
            f"{_fmt(r['latency'])} | {_fmt(r['layer_ok'])} | {fa} | {r['events']} | "
            f"{_fmt(r['first_nonfinite_loss_step'])} | {_fmt(r['final_loss'])} | {r['wall_time_s']:.1f} |"
        )
    return "\n".join(head + body + ["", "Summary: " + summary_line(summary), ""])


def _json_safe(x: Any) -> Any:
    """Strict JSON: non-finite floats (a diverged final loss) become the strings "inf" / "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _make_guard() -> Callback:
    from lightning_gradguard import GradGuard

    return GradGuard(on_nonfinite="log", on_exploding="log", on_vanishing="log")


GUARD_DESC = 'GradGuard(on_nonfinite="log", on_exploding="log", on_vanishing="log")'


def run_detection(names: Optional[Sequence[str]], small: bool, write: bool, seeds: int = 1) -> list[dict[str, Any]]:
    scenarios = select(names, small=small)
    results, labels = [], []
    t0 = time.perf_counter()
    for seed in range(seeds):
        for sc in scenarios:
            res = run_scenario(sc, callbacks=[_make_guard()], seed=seed)
            results.append(res)
            labels.append(sc.name if seeds == 1 else f"{sc.name} (seed {seed})")
            print(f"  ran {labels[-1]:36s} {res.wall_time_s:6.1f}s  events={len(_guard_events(res))}", flush=True)
    total = time.perf_counter() - t0
    rows = evaluate(results)
    for row, label in zip(rows, labels):
        row["scenario"] = label
    summary = summarize(rows)
    info = machine_info()
    md = to_markdown(rows, summary, info, GUARD_DESC)
    print()
    print(md)
    print(f"total wall time {total:.1f}s")
    if write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / "detection.md").write_text(md)
        payload = {
            "machine": info,
            "guard": GUARD_DESC,
            "total_wall_time_s": round(total, 2),
            "summary": summary,
            "rows": rows,
        }
        (RESULTS_DIR / "detection.json").write_text(json.dumps(_json_safe(payload), indent=2) + "\n")
        print(f"wrote {RESULTS_DIR / 'detection.md'} and {RESULTS_DIR / 'detection.json'}")
    return rows


# --------------------------------------------------------------------------- #
# --check: show each pathology without any guard
# --------------------------------------------------------------------------- #


class GradNormProbe(Callback):
    """Records, every optimizer step, the global gradient norm and one norm per module.

    A module's norm covers its own parameters (``recurse=False``), keyed by its
    ``named_modules`` name. Measured in ``on_before_optimizer_step``: after
    backward, before the Trainer's clipping, where a guard looks. Norms are
    taken in float64: in float32 the sum of squares of finite gradients of
    ~1e20 overflows to Inf (it happens in ``lr_jump``). Diagnostics only: one
    host sync per module, far too slow for a real guard.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.global_norms: list[float] = []
        self.layer_norms: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        per_layer = {}
        for name, module in pl_module.named_modules():
            grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
            if grads:
                norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
                per_layer[name] = torch.linalg.vector_norm(norms).item()
        self.steps.append(trainer.global_step)
        self.global_norms.append(math.sqrt(sum(v * v for v in per_layer.values())))
        self.layer_norms.append(per_layer)


def _g(x: float) -> str:
    return f"{x:.3g}"


def _med(xs: Sequence[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.median(xs) if xs else math.nan


def _check_one(name: str) -> float:
    sc = SCENARIOS[name]
    probe, twin_probe = GradNormProbe(), GradNormProbe()
    res = run_scenario(sc, callbacks=[probe])
    twin = run_scenario(sc, callbacks=[twin_probe], fault=False) if not sc.healthy else None
    n, losses = probe.global_norms, res.losses
    print(f"\n=== {name}: expected={sc.expected} onset={sc.onset} steps={res.steps} time={res.wall_time_s:.1f}s"
          + (f" (twin {twin.wall_time_s:.1f}s)" if twin else ""))
    print(f"  loss: first10 {_g(_med(losses[:10]))}  last20 {_g(_med(losses[-20:]))}  final_loss {_g(res.final_loss)}"
          f"  first non-finite loss step {res.first_nonfinite_loss_step}  weights finite {res.weights_finite}")
    if twin:
        print(f"  twin loss: first10 {_g(_med(twin.losses[:10]))} last20 {_g(_med(twin.losses[-20:]))}"
              f"  final_loss {_g(twin.final_loss)}  first non-finite {twin.first_nonfinite_loss_step}")
    nonfinite_norm_steps = [i for i, v in enumerate(n) if not math.isfinite(v)]
    if sc.healthy:
        q = sorted(x for x in n if math.isfinite(x))
        spikes = [n[i] / _med(n[max(0, i - 50):i]) for i in range(10, len(n))]
        print(f"  grad norm: min {_g(q[0])} median {_g(_med(q))} max {_g(q[-1])}; "
              f"max ratio to median of previous 50 steps {_g(max(spikes))}; "
              f"non-finite steps {len(nonfinite_norm_steps)}")
        marks = [0, 10, 50, 100, 200, 400, 600, 800, len(n) - 1]
        print("  norm @ " + "  ".join(f"{i}:{_g(n[i])}" for i in marks if i < len(n)))
        print("  loss @ " + "  ".join(f"{i}:{_g(losses[i])}" for i in marks if i < len(losses)))
        if name == "healthy_rnn_clipped":
            clipped = sum(x > 0.5 for x in n)
            print(f"  steps with pre-clip norm > 0.5 (clipping engaged): {clipped}/{len(n)}")
        return res.wall_time_s
    o = sc.onset
    window = range(max(0, o - 3), min(len(n), o + 6))
    print("  norm   @ " + "  ".join(f"{i}:{_g(n[i])}" for i in window))
    print("  twin   @ " + "  ".join(f"{i}:{_g(twin_probe.global_norms[i])}" for i in window))
    print("  loss   @ " + "  ".join(f"{i}:{_g(losses[i])}" for i in window))
    before = n[max(0, o - 50):o]
    print(f"  median norm before onset {_g(_med(before)) if before else '-'}; at onset {_g(n[o])}; "
          f"median onset..+20 {_g(_med(n[o:o + 20]))}; "
          f"twin median onset..+20 {_g(_med(twin_probe.global_norms[o:o + 20]))}")
    print(f"  first step with non-finite grad norm: {nonfinite_norm_steps[0] if nonfinite_norm_steps else None}")
    if sc.expected in ("nonfinite",) and o < len(probe.layer_norms):
        bad = [k for k, v in probe.layer_norms[o].items() if not math.isfinite(v)]
        print(f"  layers with non-finite grads at onset: {bad}")
    if sc.expected == "vanishing":
        for label, pr in (("fault", probe), ("twin", twin_probe)):
            last = len(pr.layer_norms) - 1
            for s in sorted({max(0, o - 1), o, min(last, o + 100), last}):
                layers = pr.layer_norms[s]
                print(f"  {label} per-layer @ {s}: " + " ".join(f"{k}:{_g(v)}" for k, v in layers.items()))
    marks = sorted({0, 10, o, o + 10, o + 50, len(losses) - 1})
    print("  loss trajectory: " + "  ".join(f"{i}:{_g(losses[i])}" for i in marks if i < len(losses)))
    return res.wall_time_s


def run_check(names: Optional[Sequence[str]], small: bool) -> None:
    total = 0.0
    for sc in select(names, small=small):
        total += _check_one(sc.name)
    print(f"\nsum of fault-run wall times: {total:.1f}s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--small", action="store_true", help="only the scenarios flagged small")
    parser.add_argument("--check", action="store_true", help="no guard: print gradient norms and losses")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write benchmarks/results")
    parser.add_argument("--seeds", type=int, default=1, help="run every scenario with seeds 0..N-1")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or None
    if args.check:
        run_check(names, args.small)
    else:
        # a partial run must not overwrite the full table
        run_detection(names, args.small, write=not (args.no_write or names or args.small), seeds=args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
