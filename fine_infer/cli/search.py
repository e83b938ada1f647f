"""``embed``, ``index`` and ``search``: vectors from a bundle, an index file from a folder, top-k from an index."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fine_infer.cli._args import AddCommand, add_backend_args, load_session, print_json
from fine_infer.errors import ConfigError, InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed images and/or texts; prints JSON or writes a .npy file."""
    import numpy as np


    session = load_session(args.bundle, args)
    vectors = session.embed(images=args.image, texts=args.text)
    if args.out:
        np.save(args.out, vectors)
        print(f"wrote {vectors.shape[0]}×{vectors.shape[1]} embeddings to {args.out}")
    else:
        print_json({"provider": session.providers, "embeddings": vectors.round(6).tolist()})
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Embed a folder of images into an index file (or extend one with --add)."""
    from fine_infer.index import Index

    files = _image_files(Path(args.folder))
    session = load_session(args.bundle, args)
    out = Path(args.out)
    if args.add:
        index = Index.load(out)
        start = int(max(index.ids(), default=-1)) + 1
    else:
        if out.exists() and not args.force:
            raise ConfigError(f"{out} already exists; pass --add to extend it or --force to replace it")
        index = None
        start = 0
    t0 = time.perf_counter()
    for lo in range(0, len(files), args.batch_size):
        chunk = files[lo : lo + args.batch_size]
        vectors = session.embed_images(chunk)
        if index is None:
            index = Index(vectors.shape[1], dtype=args.dtype)
        ids = list(range(start + lo, start + lo + len(chunk)))
        index.add(vectors, ids, metadata=[{"path": str(p.resolve())} for p in chunk])
    index.attrs["bundle"] = str(Path(args.bundle).resolve())
    index.save(out)
    print(f"indexed {len(files)} images in {time.perf_counter() - t0:.1f} s → {out} ({len(index)} items, {args.dtype})")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Search an index by text, image, or both (composed retrieval)."""
    from fine_infer.index import Index

    index = Index.load(args.index)
    bundle = args.bundle or index.attrs.get("bundle")
    if not bundle:
        raise ConfigError(f"{args.index} does not record its bundle; pass --bundle")
    if not args.text and not args.image:
        raise ConfigError("give --text, --image or both")
    session = load_session(bundle, args)
    query = session.embed(images=[args.image] if args.image else None, texts=[args.text] if args.text else None)
    scores, ids = index.search(query, args.k)
    hits = [{"id": int(i), "score": float(s), **(index.get_metadata(int(i)) or {})}
            for s, i in zip(scores[0], ids[0]) if i >= 0]
    if args.json:
        print_json({"query": {"text": args.text, "image": args.image}, "hits": hits})
    else:
        for rank, h in enumerate(hits, 1):
            print(f"{rank:>3}. {h['score']:.4f}  {h.get('path', h['id'])}")
    return 0


def register(add: AddCommand) -> None:
    """Register ``embed``, ``index`` and ``search``."""
    for name, fn, text in (("embed", cmd_embed, "embed images and/or texts"),):
        sp = add(name, fn, text)
        sp.add_argument("bundle")
        sp.add_argument("--image", nargs="+", help="image files")
        sp.add_argument("--text", nargs="+", help="texts (one per image for composed queries)")
        sp.add_argument("--out", help="write a .npy file instead of printing JSON")
        add_backend_args(sp)

    x = add("index", cmd_index, "embed a folder of images into an index file")
    x.add_argument("bundle")
    x.add_argument("folder")
    x.add_argument("--out", required=True, help="index file to write")
    x.add_argument("--dtype", default="float32", choices=["float32", "float16", "int8"])
    x.add_argument("--add", action="store_true", help="extend an existing index")
    x.add_argument("--force", action="store_true", help="replace an existing index")
    x.add_argument("--batch-size", type=int, default=16)
    add_backend_args(x)

    s = add("search", cmd_search, "search an index by text and/or image")
    s.add_argument("index")
    s.add_argument("--bundle", help="bundle to embed the query (default: the one the index was built with)")
    s.add_argument("--text")
    s.add_argument("--image")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--json", action="store_true")
    add_backend_args(s)
