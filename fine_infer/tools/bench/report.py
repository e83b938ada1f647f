"""Presenting bench results: a table, JSON files, a comparison of two results, and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fine_infer.errors import ConfigError
from fine_infer.tools.bench.runtime import RESULT_KIND


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the result rows, with the machine and the skipped backends."""
    serve = result.get("mode") == "serve"
    col = "clients" if serve else "batch"
    unit = "req/s" if serve else "items/s"
    auto = (result.get("auto") or {}).get("label")
    head = (f"{'graph':<14} {'backend':<21} {col:>7} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'ms/item':>9} "
            f"{unit:>10}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        name = r["backend"] + ("*" if r["backend"] == auto else "")
        lines.append(f"{r['graph']:<14} {name:<21} {r['batch']:>7} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                     f"{r['p99_ms']:>9.3f} {r['ms_per_item']:>9.3f} {r['items_per_s']:>10.1f}"
                     + (f"  ({r['errors']} errors)" if r.get("errors") else "")
                     + (f"  gate {r['gate']}" if r.get("gate") not in (None, "passed") else ""))
    for s in result.get("skipped", []):
        where = " ".join(str(s[k]) for k in ("graph", "batch") if k in s)
        lines.append(f"skipped {s['backend']}{' ' + where if where else ''}: {s['reason']}")
    if auto:
        lines.append(f"* auto picks {auto} on this machine: {result['auto'].get('reason', '')}")
    mach = result.get("machine") or {}
    if mach:
        v = mach.get("versions", {})
        lines.append(f"machine: {mach.get('cpu')} ({mach.get('cpu_affinity')} cores), GPU {mach.get('gpu') or 'none'}; "
                     + ", ".join(f"{k} {v[k]}" for k in ("python", "onnxruntime", "openvino", "torch", "numpy")
                                 if k in v))
        if mach.get("threads"):
            lines.append("threads: " + ", ".join(f"{k} {t}" for k, t in mach["threads"].items()))
    return "\n".join(lines)


def pick_warning(result: dict[str, Any], margin: float | None = None) -> str:
    """One line when the path ``backend="auto"`` runs (the stored tune pick) is not the fastest gated CPU path this
    bench measured (by more than ``margin``, default the tune rule's :data:`~fine_infer.runtime.choice.MIN_SPEEDUP`;
    speed: the geometric mean over graph × batch of ONNX Runtime fp32's p50 over the path's), else "". Only paths
    whose gate passed count (auto never picks another)."""
    import statistics

    from fine_infer.runtime.choice import MIN_SPEEDUP
    from fine_infer.runtime.paths import BASELINE, CPU_PATHS

    margin = MIN_SPEEDUP if margin is None else margin
    auto = (result.get("auto") or {}).get("label")
    cpu = {p.label for p in CPU_PATHS}
    if not auto or auto not in cpu:
        return ""
    base = {(r["graph"], r["batch"]): r["p50_ms"] for r in result.get("rows", []) if r["backend"] == BASELINE.label}
    speed: dict[str, float] = {}
    for label in cpu:
        rows = [r for r in result.get("rows", []) if r["backend"] == label and (r["graph"], r["batch"]) in base
                and (label == auto or r.get("gate") == "passed")]
        if base and len(rows) == len(base):
            speed[label] = statistics.geometric_mean(base[(r["graph"], r["batch"])] / r["p50_ms"] for r in rows)
    if auto not in speed or not speed:
        return ""
    best = max(speed, key=speed.get)
    if best == auto or speed[best] < margin * speed[auto]:
        return ""
    return (f"the stored pick {auto} ({speed[auto]:.2f}× ONNX Runtime fp32 here now) is not the fastest gated path "
            f"measured now: {best} {speed[best]:.2f}×; run `fine-infer tune {result.get('bundle', 'BUNDLE')}` again "
            "(on a quiet box)")


def save_json(result: dict[str, Any], path: str | Path) -> None:
    """Write a result as indented JSON."""
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a result written by :func:`save_json`; a file that is not one is a :class:`ConfigError`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read bench result {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != RESULT_KIND or not isinstance(data.get("rows"), list):
        raise ConfigError(f"{path} is not a fine-infer bench result (write one with `fine-infer bench --json`)")
    return data


def _key(r: dict[str, Any]) -> tuple:
    return (r.get("mode", "runtime"), r["graph"], r["backend"], int(r["batch"]))


def compare(new: dict[str, Any], old: dict[str, Any], max_regression: float = 0.10) -> tuple[list[str], list[dict]]:
    """Per row present in both: new/old p50 latency and throughput. A row regresses when its p50 latency grew by
    more than ``max_regression`` (0.10 = 10%). Returns printable lines and the regressed rows."""
    if max_regression < 0:
        raise ConfigError(f"max_regression must be >= 0, got {max_regression}")
    old_rows = {_key(r): r for r in old["rows"]}
    lines = [f"{'graph':<14} {'backend':<21} {'batch':>6} {'p50 old':>9} {'p50 new':>9} {'latency':>8} "
             f"{'throughput':>10}"]
    regressions: list[dict] = []
    seen = set()
    for r in new["rows"]:
        k = _key(r)
        o = old_rows.get(k)
        if o is None:
            lines.append(f"{r['graph']:<14} {r['backend']:<21} {r['batch']:>6}  (new row, not in the old result)")
            continue
        seen.add(k)
        lat = r["p50_ms"] / o["p50_ms"]
        tput = r["items_per_s"] / o["items_per_s"]
        bad = lat > 1 + max_regression
        if bad:
            regressions.append({"key": list(k), "latency_ratio": lat, "throughput_ratio": tput})
        lines.append(f"{r['graph']:<14} {r['backend']:<21} {r['batch']:>6} {o['p50_ms']:>9.3f} {r['p50_ms']:>9.3f} "
                     f"{lat:>7.2f}× {tput:>9.2f}×" + ("  REGRESSION" if bad else ""))
    for k in old_rows.keys() - seen:
        lines.append(f"{k[1]:<14} {k[2]:<21} {k[3]:>6}  (missing from the new result)")
    a, b = (new.get("machine") or {}).get("cpu"), (old.get("machine") or {}).get("cpu")
    if a and b and a != b:
        lines.append(f"note: different machines ({b} → {a}); ratios compare hardware too")
    lines.append(f"{len(regressions)} regression(s) past {max_regression:.0%} in p50 latency")
    return lines, regressions


def plot(result: dict[str, Any], path: str | Path) -> None:
    """A PNG: per graph, p50 latency (with the p90-p99 band) and throughput against batch size (or clients),
    one line per backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    rows = result["rows"]
    if not rows:
        raise ConfigError("nothing to plot: the result has no rows")
    graphs = list(dict.fromkeys(r["graph"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    serve = result.get("mode") == "serve"
    xlabel = "concurrent clients" if serve else "batch size"
    fig, axes = plt.subplots(len(graphs), 2, figsize=(11, 3.6 * len(graphs)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for gi, g in enumerate(graphs):
        ax_l, ax_t = axes[gi]
        for bi, be in enumerate(backends):
            rs = sorted((r for r in rows if r["graph"] == g and r["backend"] == be), key=lambda r: r["batch"])
            if not rs:
                continue
            x = [r["batch"] for r in rs]
            c = colors[bi % len(colors)]
            ax_l.plot(x, [r["p50_ms"] for r in rs], "o-", color=c)
            ax_l.fill_between(x, [r["p90_ms"] for r in rs], [r["p99_ms"] for r in rs], color=c, alpha=0.15)
            ax_t.plot(x, [r["items_per_s"] for r in rs], "o-", color=c, label=be)
        for ax, ylabel, title in ((ax_l, "latency (ms, log)", "p50 latency, band p90–p99"),
                                  (ax_t, "requests/s" if serve else "items/s", "throughput")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["batch"] for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{g}: {title}")
            ax.grid(True, which="both", alpha=0.3)
        # One legend per row, on the throughput panel (same colours on both; its top left stays free as the
        # lines rise to the right): on the latency panel it hid the batch-1 points.
        ax_t.legend(fontsize=8, loc="upper left")
        ax_l.set_yscale("log")
        # Plain numbers on the log axis (1, 2, 5, 10, ...), not 2×10⁻¹.
        ax_l.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax_l.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax_t.set_ylim(bottom=0)
    mach = result.get("machine") or {}
    fig.suptitle(f"fine-infer bench: {result.get('arch')} — {mach.get('cpu', '')} ({mach.get('cpu_affinity')} cores)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
