"""``fine-infer tune``: time every CPU path of a bundle here and store the fastest gated one with the bundle.

The CPU paths and their gates are listed in :mod:`fine_infer.runtime.paths`; gates are run by ``fine-infer validate
--backend onnxruntime openvino`` (:mod:`fine_infer.tools.validate`) and, for the calibrated int8 paths, by the export.
:func:`tune_bundle` times every path that can run here at batch 1 and 8 in interleaved rounds (every path once per
round, so load that comes and goes falls on all of them alike), three runs of seven rounds by default, and decides
with :func:`fine_infer.runtime.choice.decide` on the per-round speedups: a path whose margin over ONNX Runtime fp32 is
inside the noise is not picked (ONNX Runtime fp32 is stored, verdict ``noise``, with why); it records each path's
per-round speedups, median and spread, whether the runs agreed and the load average it saw; :func:`write_tune` stores
the result as ``tune.<stamp>.json`` in the bundle through :func:`fine_infer.bundle.update_manifest` (hashed into
``manifest.files`` and pointed to by ``manifest.validation["tune"]``; a crash leaves either the old or the new result
listed, never a file whose checksum fails). ``load(bundle, backend="auto")`` reads it through
:mod:`fine_infer.runtime.choice`. Storing a result changes the bundle (a new file and the manifest): a signed bundle
then fails verification until it is signed again (``fine-infer sign``), so a release pipeline tunes before it signs.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from fine_infer._atomic import atomic_write_bytes
from fine_infer._cpu import cpu_signature
from fine_infer.bundle import Manifest, read_bundle, read_manifest, update_manifest
from fine_infer.errors import ConfigError, FineInferError
from fine_infer.runtime.choice import (GATES_KEY, LOW_QUANTILE, MIN_SPEEDUP, TUNE_KEY, TUNE_KIND, decide, eligibility,
                                       gate_status, quantile, read_tune)
from fine_infer.runtime.paths import BASELINE, CPU_PATHS, ExecPath, bundle_variant
from fine_infer.tools import bench
from fine_infer.tools.bench.timing import Progress

TUNE_VERSION = 2
TUNE_BATCHES = (1, 8)
TUNE_ROUNDS = 7  # interleaved rounds per run: every path once per round, per graph × batch
TUNE_RUNS = 3  # independent runs: the pick is made on all rounds pooled, and whether the runs agreed is said


def _gate_min_cosine(manifest: Manifest, path: ExecPath) -> float | None:
    """The path's gate min cosine (the tie-break of :func:`~fine_infer.runtime.choice.decide`): 1 for the fp32 paths,
    the recorded figure for the others (validate's record, else the export's variant rows)."""
    if path.variant == "fp32":
        return 1.0
    rec = ((manifest.validation or {}).get(GATES_KEY) or {}).get(path.label) or {}
    if (rec.get("summary") or {}).get("min_cosine") is not None:
        return float(rec["summary"]["min_cosine"])
    key = bundle_variant(path)
    rows = [((g.get("variants") or {}).get(key) or {}).get("summary") or {}
            for g in ((manifest.validation or {}).get("graphs") or {}).values()]
    figures = [r["min_cosine"] for r in rows if "min_cosine" in r]
    return float(min(figures)) if figures else None


def _spread(xs: Sequence[float]) -> dict[str, float]:
    return {"min": min(xs), "q25": quantile(xs, 0.25), "median": statistics.median(xs), "q75": quantile(xs, 0.75),
            "max": max(xs)}


def measure_rounds(
    sessions: dict[str, Any], cells: Sequence[tuple[str, int, dict[str, Any]]], rounds: int = TUNE_ROUNDS,
    repeats: int = 1, warmup: int = 1,
) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """Time ``sessions`` (label → session; the baseline's label among them) on ``cells`` (graph, batch, feeds) in
    interleaved rounds (:func:`fine_infer.tools.bench.interleaved_ms`, per cell). Returns (per label its speedup over
    ONNX Runtime fp32 in each round: the geometric mean over cells of the baseline's time over its own in that round;
    per label and cell the per-round ms)."""
    base = BASELINE.label
    ms: dict[str, dict[str, list[float]]] = {label: {} for label in sessions}
    for graph, batch, feeds in cells:
        fns = {label: (lambda s=s, g=graph, f=feeds: s.run(g, f)) for label, s in sessions.items()}
        got = bench.interleaved_ms(fns, rounds=rounds, repeats=repeats, warmup=warmup)
        for label, times in got.items():
            ms[label][f"{graph}@{batch}"] = times
    per_round = {label: [statistics.geometric_mean([ms[base][c][r] / ms[label][c][r] for c in ms[label]])
                         for r in range(rounds)]
                 for label in sessions}
    return per_round, ms


def _open_paths(bundle: str | Path, manifest: Manifest, threads: int | None, caps, cells) -> tuple[dict, dict]:
    """A session per CPU path that runs every cell here (label → session), and why the others do not."""
    sessions: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for p in CPU_PATHS:
        session, reason = bench.open_backend(bundle, p.label, threads, caps)
        if session is None:
            skipped[p.label] = reason or "cannot run here"
            continue
        try:
            for graph, _, feeds in cells:
                session.run(graph, feeds)
        except Exception as exc:  # noqa: BLE001 - a path that cannot run a graph is skipped with why
            skipped[p.label] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            session.close()
            continue
        sessions[p.label] = session
    if BASELINE.label not in sessions:
        raise ConfigError(f"ONNX Runtime fp32 cannot run this bundle here ({skipped.get(BASELINE.label)}): nothing "
                          "to tune against")
    return sessions, skipped


def _previous_choice(bundle: str | Path) -> str | None:
    """The choice stored by an earlier tune on this CPU (kept in a tie), or None."""
    try:
        old = read_tune(read_bundle(bundle, verify=False))
    except FineInferError:
        return None
    here = cpu_signature()
    if not old or (old.get("signature") or {}).get("cpu") != here["cpu"]:
        return None
    return old.get("choice")


def tune_bundle(
    bundle: str | Path,
    *,
    batch_sizes: Sequence[int] = TUNE_BATCHES,
    graphs: Sequence[str] | None = None,
    budget: Any = None,
    threads: int | None = None,
    capabilities: Iterable[str] | None = None,
    progress: bool = False,
    rounds: int | None = None,
    runs: int | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Time every CPU path of ``bundle`` that can run here in interleaved rounds and pick one (not yet stored).

    ``runs`` (default 3) independent runs of ``rounds`` (default 7) rounds each: every round runs every path once on
    every graph × batch (``repeats`` calls, their median), so a burst of load falls on all paths alike. The pick is
    :func:`fine_infer.runtime.choice.decide` on every round pooled (ONNX Runtime fp32 with verdict ``noise`` when the
    fastest gated path's margin is inside the noise; in a tie the previous choice is kept); each run is also decided
    alone, and ``agree`` says whether all runs picked the same path (the reason says when they did not).
    ``budget=bench.QUICK`` is a smoke run (3 rounds, 1 run).

    Returns the tune result: ``choice`` (label), ``verdict``, ``reason``, ``speedup``; ``paths`` (per label: per-round
    speedups ``rounds``, median ``speedup``, ``spread``, per-cell ratios and p50 ms, gate, or why it was skipped);
    ``runs`` (each run's choice and verdict), ``agree``; the machine ``load`` (``os.getloadavg`` before and after)."""
    from fine_infer.runtime.feeds import example_feeds

    caps = frozenset(capabilities) if capabilities is not None else None
    quick = budget is not None and budget == bench.QUICK
    rounds = rounds or (3 if quick else TUNE_ROUNDS)
    runs = runs or (1 if quick else TUNE_RUNS)
    if rounds < 2 or runs < 1:
        raise ConfigError(f"tune needs at least 2 rounds and 1 run (got {rounds} rounds, {runs} runs)")
    manifest = read_manifest(bundle)
    names = list(graphs or manifest.graphs)
    for g in names:
        if g not in manifest.graphs:
            raise ConfigError(f"bundle has no graph {g!r}; it has: {', '.join(manifest.graphs)}")
    vocab = None
    if manifest.tokenizer:
        from fine_infer.tokenization import load_tokenizer

        vocab = load_tokenizer(Path(bundle) / manifest.tokenizer).get_vocab_size(with_added_tokens=True)
    cells = [(g, b, example_feeds(manifest.graphs[g].spec, b, manifest.text, vocab, None))
             for g in names for b in batch_sizes]
    load_before = os.getloadavg()
    sessions, skipped = _open_paths(bundle, manifest, threads, caps, cells)
    why_not = eligibility(manifest, caps)
    previous = _previous_choice(bundle)
    gmc = {label: _gate_min_cosine(manifest, ExecPath.parse(label, CPU_PATHS)) for label in sessions}
    pooled: dict[str, list[float]] = {label: [] for label in sessions}
    pooled_ms: dict[str, dict[str, list[float]]] = {label: {} for label in sessions}
    per_run: list[dict[str, Any]] = []
    bar = Progress(runs, progress, "tune")
    try:
        for _ in range(runs):
            per_round, ms = measure_rounds(sessions, cells, rounds, repeats)
            for label in sessions:
                pooled[label] += per_round[label]
                for c, t in ms[label].items():
                    pooled_ms[label].setdefault(c, []).extend(t)
            c = decide({k: {"rounds": v, "gate_min_cosine": gmc[k]} for k, v in per_round.items()}, why_not,
                       previous)
            per_run.append({"choice": c.label, "verdict": c.verdict, "speedup": c.speedup,
                            "medians": {k: statistics.median(v) for k, v in per_round.items()}})
            bar.update(f"run {len(per_run)}: {c.label}")
    finally:
        bar.close()
        for s in sessions.values():
            s.close()
    load_after = os.getloadavg()
    ranked: dict[str, dict[str, Any]] = {}
    for p in CPU_PATHS:
        gate, detail = gate_status(manifest, p)
        entry: dict[str, Any] = {"backend": p.backend, "variant": p.variant, "gate": gate, "gate_detail": detail,
                                 "gate_min_cosine": _gate_min_cosine(manifest, p)}
        if p.label in sessions:
            base_ms = pooled_ms[BASELINE.label]
            entry.update(rounds=pooled[p.label], speedup=statistics.median(pooled[p.label]),
                         spread=_spread(pooled[p.label]),
                         cells={c: statistics.median([b / t for b, t in zip(base_ms[c], v)])
                                for c, v in pooled_ms[p.label].items()},
                         p50_ms={c: statistics.median(v) for c, v in pooled_ms[p.label].items()})
        else:
            entry.update(speedup=None, skipped=skipped.get(p.label, "not measured"))
        ranked[p.label] = entry
    choice = decide(ranked, why_not, previous)
    picks = [r["choice"] for r in per_run]
    agree = len(set(picks)) == 1
    reason = choice.reason
    if not agree:
        reason += (f"; the {runs} runs did not agree ({', '.join(picks)}): this pick is from all {runs * rounds} "
                   "rounds pooled; on a box this noisy, tune again when it is quieter")
    elif runs > 1:
        reason += f"; all {runs} runs agreed"
    return {"kind": TUNE_KIND, "version": TUNE_VERSION, "choice": choice.label, "verdict": choice.verdict,
            "reason": reason, "speedup": choice.speedup, "batch_sizes": list(batch_sizes), "graphs": names,
            "threads": threads, "rounds": rounds, "repeats": repeats, "runs": per_run, "agree": agree,
            "previous": previous, "signature": cpu_signature(), "paths": ranked,
            "load": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after],
                     "cores": os.cpu_count()},
            "rule": {"min_speedup": MIN_SPEEDUP, "low_quantile": LOW_QUANTILE},
            "machine": bench.machine_info(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def write_tune(bundle: str | Path, result: dict[str, Any]) -> str:
    """Store a :func:`tune_bundle` result in ``bundle`` as ``tune.<stamp>.json``; returns the file name."""
    if result.get("kind") != TUNE_KIND:
        raise ConfigError("not a tune result: make one with fine_infer.tools.tune.tune_bundle")
    folder = Path(bundle)
    read_manifest(folder)  # a clear error for a folder that is not a bundle, before writing into it
    name = f"tune.{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}.json"
    atomic_write_bytes(folder / name, json.dumps(result, indent=2, default=float).encode() + b"\n")

    def record(m: Manifest) -> list[str]:
        old = (m.validation.get(TUNE_KEY) or {}).get("file")
        m.validation[TUNE_KEY] = {"file": name, "choice": result["choice"], "speedup": result.get("speedup"),
                                  "verdict": result.get("verdict", ""),
                                  "reason": result["reason"], "date": result["date"],
                                  "signature": result["signature"], "batch_sizes": result["batch_sizes"]}
        return [old] if old and old != name else []

    try:
        update_manifest(folder, record, added=[name])
    except BaseException:
        (folder / name).unlink(missing_ok=True)
        raise
    return name
