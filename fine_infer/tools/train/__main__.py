"""``python -m fine_infer.tools.train --arch A [--all] --out fine_infer/weights --seed S``: reproduce the shipped weights.

Runs single-threaded by default (``--threads``): the result is then bit-for-bit the same on a given torch version,
and a second core stays free. Each run writes ``{arch}-tiny.safetensors`` and updates that arch's entry of
``TRAINING.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

ARCHS = ("fashion-fine", "maaf", "raf", "triplet", "attributes")


def update_training_json(folder: Path, arch: str, entry: dict) -> Path:
    """Merge ``entry`` as ``arch`` into ``folder/TRAINING.json`` (written atomically)."""
    from fine_infer._atomic import atomic_write_bytes

    path = folder / "TRAINING.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc.setdefault("about", "Tiny weights trained by `python -m fine_infer.tools.train`; eval = fine_infer.tools.evaluate "
                            "on the catalogue's held-out split (fractions in [0, 1]).")
    doc.setdefault("archs", {})[arch] = entry
    doc["archs"] = dict(sorted(doc["archs"].items()))
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m fine_infer.tools.train", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--arch", choices=ARCHS, action="append", help="arch to train (repeatable)")
    g.add_argument("--all", action="store_true", help="train every arch")
    p.add_argument("--out", required=True, help="folder for {arch}-tiny.safetensors and TRAINING.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="override the recipe's number of steps (quick runs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible, leaves a core)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    args = p.parse_args(argv)

    import torch

    from fine_infer.tools.train import recipe_for, train_arch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    for arch in ARCHS if args.all else args.arch:
        recipe = recipe_for(arch, **({"steps": args.steps} if args.steps else {}))
        t0 = time.perf_counter()
        result = train_arch(arch, args.seed, recipe, out=out, evaluate=not args.no_eval,
                            log=lambda s: print(s, file=sys.stderr, flush=True))
        update_training_json(out, arch, result.record())
        print(f"{arch}: wrote {result.weights} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
