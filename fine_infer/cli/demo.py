"""``demo`` and ``catalogue``: the embedded default end to end, and sample images of the generated catalogue."""

from __future__ import annotations

import argparse

from fine_infer.cli._args import AddCommand, positive
from fine_infer.errors import ConfigError


def cmd_catalogue(args: argparse.Namespace) -> int:
    """Write sample garment images of the generated catalogue (PNG files and catalogue.json) into a folder."""
    from fine_infer.tools.catalogue import HELD_OUT_START, generate, save_catalogue

    if args.items < 1:
        raise ConfigError(f"--items must be at least 1, got {args.items}")
    start = HELD_OUT_START if args.held_out else 0
    path = save_catalogue(generate(args.items, args.seed, args.size, start=start), args.out)
    print(f"wrote {args.items} images and {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default: export tiny Fashion-FINE and MAAF bundles, index a generated catalogue, search, time."""
    from fine_infer.tools.demo import run_demo

    return run_demo(workdir=args.workdir, items=args.items)


def register(add: AddCommand) -> None:
    """Register ``catalogue`` and ``demo``."""
    c = add("catalogue", cmd_catalogue, "write sample garment images (the generated catalogue) to a folder")
    c.add_argument("out", help="folder to write <id>-<category>-<colour>-<pattern>.png and catalogue.json into")
    c.add_argument("--items", type=positive("--items"), default=100, help="how many garments to draw")
    c.add_argument("--seed", type=int, default=0, help="catalogue seed (the same seed draws the same items)")
    c.add_argument("--size", type=int, default=96, help="image side in pixels")
    c.add_argument("--held-out", dest="held_out", action="store_true", default=argparse.SUPPRESS,
                   help="draw from the held-out split the shipped models never saw (the default)")
    c.add_argument("--training-split", dest="held_out", action="store_false", default=True,
                   help="draw training-split items instead")

    d = add("demo", cmd_demo, "tiny end-to-end demo: export, index a generated catalogue, search, time")
    d.add_argument("--workdir", help="where to write the bundle and index (default: a temp folder)")
    d.add_argument("--items", type=positive("--items"), default=200,
                   help="held-out catalogue items besides the queried products")
