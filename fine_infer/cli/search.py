"""``embed``, ``index`` and ``search``: vectors from a bundle, an index file from a catalogue, top-k from an index.

``index`` reads a folder of images, a ``.jsonl`` catalogue or a ``.txt`` file of texts (:mod:`._catalogue_input`),
embeds it in batches behind a progress bar, and records in the index what made its vectors: the bundle's path and
identity (:meth:`fine_infer.bundle.Manifest.identity`), the task and the graph.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from fine_infer.cli._args import AddCommand, add_backend_args, load_session, positive, print_json
from fine_infer.cli._catalogue_input import (
    INT64,
    Bad,
    Catalogue,
    Item,
    first_bad,
    kind_of,
    read_images,
    read_jsonl,
    read_txt,
)
from fine_infer.errors import ConfigError, InputError

# --task of `index` -> the graph task it runs and what each item must hold
TASKS = {"image": ("embed_image", "image"), "text": ("embed_text", "text"), "compose": ("compose", "both")}
TEXT_CHECK_BATCH = 256  # texts tokenized at once when a catalogue is checked before embedding
TRUNCATE_HELP = "cut texts over the model's token limit (as sentence-transformers does) instead of refusing them"


def _cli_phrasing(exc: InputError) -> InputError:
    """The runtime's error with its API advice put as the CLI's option."""
    return InputError(str(exc).replace("pass truncate=True", "pass --truncate"))


def _out_file(out: str, force: bool, suffix: str) -> Path:
    """Where ``--out`` writes: the target of a link (so it is updated, not replaced by a file), which must end in
    ``suffix`` and, unless ``force``, not exist yet."""
    path = Path(out)
    if path.suffix.lower() != suffix:
        raise ConfigError(f"--out {out} must end in {suffix}")
    path = path.resolve() if path.is_symlink() else path
    if path.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    return path


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed images and/or texts; prints JSON or writes a .npy file."""
    import numpy as np

    from fine_infer._atomic import atomic_writer

    out = _out_file(args.out, args.force, ".npy") if args.out else None
    session = load_session(args.bundle, args)
    try:
        vectors = session.embed(images=args.image, texts=args.text, truncate=args.truncate)
    except InputError as exc:
        raise _cli_phrasing(exc) from None
    if out is not None:
        with atomic_writer(out) as f:
            np.save(f, vectors)
        print(f"wrote {vectors.shape[0]}×{vectors.shape[1]} embeddings to {out}")
    else:
        print_json({"provider": session.providers, "embeddings": vectors.round(6).tolist()})
    return 0


# --- index --------------------------------------------------------------------------------------------------------


class Progress:
    """A progress bar on stderr: tqdm when installed, else one rewritten line; nothing when stderr is not a TTY."""

    def __init__(self, total: int, unit: str, quiet: bool) -> None:
        self.total, self.unit, self.done = total, unit, 0
        self.on = not quiet and sys.stderr.isatty()
        self.bar = None
        if self.on:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.on:
            pct = 100 * self.done // max(self.total, 1)
            sys.stderr.write(f"\rembedding {self.done}/{self.total} {self.unit} ({pct}%)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.on:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _graph_tasks(session) -> dict[str, str]:
    """The bundle's graphs by task (``embed_image`` -> ``image``)."""
    return {g.spec.task: name for name, g in session.manifest.graphs.items()}


def _choose_task(kind: str, requested: str, source: Path, bundle: str, tasks: dict[str, str]) -> str:
    """``image``, ``text`` or ``compose``: what to embed from ``source`` with a bundle having graphs for ``tasks``;
    a catalogue the bundle cannot embed is a one-line error saying what it can."""
    graphs = ", ".join(f"{name} [{task}]" for task, name in tasks.items())
    can = {t for t, (task, _) in TASKS.items() if task in tasks}
    if kind == "images":
        if requested not in ("auto", "image"):
            raise ConfigError(f"--task {requested} needs a .jsonl catalogue; {source} is a folder of images")
        if "image" not in can:
            raise ConfigError(f"bundle {bundle} embeds no images (graphs: {graphs}): index a .jsonl or .txt "
                              f"catalogue of texts with it, not the folder {source}")
        return "image"
    if kind == "txt" and requested not in ("auto", "text"):
        raise ConfigError(f"--task {requested} needs a .jsonl catalogue; {source} is a .txt file of texts")
    if requested == "auto":
        if kind == "jsonl" and "image" in can and _has_image_key(source):
            return "image"
        requested = "text"
    if requested not in can:
        what = {"image": "images", "text": "texts", "compose": "composed (image + text) items"}[requested]
        if requested == "compose":
            hint = f"--task compose needs a compose graph; try --task {' or '.join(sorted(can)) or 'auto'}"
        elif requested == "text" and "image" in can:
            hint = "index a folder of images (or a .jsonl with \"image\" keys) with it"
        else:
            hint = f"use a bundle with an {'embed_image' if requested == 'image' else 'embed_text'} graph"
        raise ConfigError(f"bundle {bundle} embeds no {what} (graphs: {graphs}), so it cannot index {source}: {hint}")
    return requested


def _has_image_key(path: Path) -> bool:
    """Whether any line of a .jsonl catalogue is an object with an ``"image"`` key (bad lines are reported later)."""
    with open(path, "rb") as f:
        for line in f:
            if b'"image"' in line:  # most lines of a text catalogue are ruled out without parsing
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and "image" in obj:
                    return True
    return False


def _refused(session, items: Sequence[Item], checks: Sequence[str], truncate: bool) -> list[Bad]:
    """The items whose text or image (``checks``) the bundle's preprocessing refuses, each with why."""
    bad = []
    for it in items:
        why = next(filter(None, (_item_problem(session, it, c, truncate) for c in checks)), "")
        if why:
            bad.append(Bad(it.order, it.where, why))
    return bad


def _text_problems(session, items: Sequence[Item], truncate: bool) -> list[Bad]:
    """The items whose text the bundle's tokenizer refuses (over the token limit unless ``truncate``, nothing left
    once cleaned...), found before any embedding."""
    bad = []
    for lo in range(0, len(items), TEXT_CHECK_BATCH):
        chunk = items[lo:lo + TEXT_CHECK_BATCH]
        try:
            session.tokenize([it.text for it in chunk], truncate)
        except InputError:
            bad += _refused(session, chunk, ("text",), truncate)
    return bad


def _item_problem(session, item: Item, what: str, truncate: bool) -> str:
    """Why the bundle's preprocessing refuses ``item``'s text or image, or "" (rephrased for an item)."""
    try:
        if what == "text":
            session.tokenize([item.text], truncate)
        else:
            session.preprocess_images([item.image])
    except InputError as exc:
        msg = str(_cli_phrasing(exc))
        if what == "text":
            return "the text " + msg.removeprefix("text 0 ")
        msg = msg.removeprefix(f"image 0 ({item.image}) ")
        return msg.removeprefix("is ")
    return ""


def _embedder(session, task: str, truncate: bool) -> Callable[[Sequence[Item]], Any]:
    if task == "image":
        return lambda items: session.embed_images([it.image for it in items])
    if task == "text":
        return lambda items: session.embed_texts([it.text for it in items], truncate)
    return lambda items: session.compose([it.image for it in items], [it.text for it in items], truncate)


def _embed_chunk(session, task: str, embed: Callable, chunk: Sequence[Item],
                 truncate: bool) -> tuple[list[Item], Any, list[Bad]]:
    """Embed ``chunk``; on an input error, find the items at fault and embed the others.

    Returns (the items embedded, their vectors or None, the bad items)."""
    try:
        return list(chunk), embed(chunk), []
    except InputError:
        bad = _refused(session, chunk, {"image": ("image",), "text": ("text",), "compose": ("text", "image")}[task],
                       truncate)
        if not bad:
            raise  # not one item's fault: let the error say what it is
        good = _without(chunk, bad)
        return good, (embed(good) if good else None), bad


def _without(items: Sequence[Item], bad: Sequence[Bad]) -> list[Item]:
    """``items`` but those in ``bad``."""
    gone = {b.order for b in bad}
    return [it for it in items if it.order not in gone]


def _read(source: Path, kind: str, wants: str, start: int, taken: set[int]) -> Catalogue:
    if kind == "images":
        return read_images(source, start)
    if kind == "txt":
        return read_txt(source, start)
    return read_jsonl(source, start, wants, taken)


def _recorded(index, path: Path, key: str) -> str | None:
    """``index.attrs[key]`` as ``fine-infer index`` records it (a string), None when absent; anything else means the
    file was not written by it."""
    value = index.attrs.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{path}: attrs.{key} is not a string, so fine-infer index did not write this file; "
                          "rebuild the index with fine-infer index")
    return value


def _out_index(args: argparse.Namespace, source: Path) -> Path:
    """The index file ``--out`` names (a link's target, so --add extends it), never the catalogue itself."""
    out = Path(args.out)
    out = out.resolve() if out.is_symlink() else out
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise ConfigError(f"--out {args.out} is the catalogue being indexed; write the index to another file")
    return out


def _open_target(args: argparse.Namespace, out: Path, identity: str, task: str):
    """(the index to extend or None, the first free id, the ids it holds) — checking --add / --force / --dtype."""
    from fine_infer.index import Index

    if not args.add:
        if out.exists() and not args.force:
            raise ConfigError(f"{out} already exists; pass --add to extend it or --force to replace it")
        return None, 0, set()
    index = Index.load(out)
    if args.dtype is not None and args.dtype != index.dtype:
        raise ConfigError(f"--dtype {args.dtype} does not match {out}, which stores {index.dtype}: --add keeps the "
                          "index's storage; drop --dtype, or write a new index")
    recorded = _recorded(index, out, "bundle_identity")
    if recorded and recorded != identity:
        raise ConfigError(f"{out} was indexed with another bundle (identity {recorded[:12]}…, this one "
                          f"{identity[:12]}…): its vectors are not comparable; index into a new file or use --force")
    held = _recorded(index, out, "task")
    if held and held != TASKS[task][0]:
        raise ConfigError(f"{out} holds {held} vectors; this catalogue would add {TASKS[task][0]} ones")
    ids = {int(i) for i in index.ids()}
    return index, max(ids, default=-1) + 1, ids


def cmd_index(args: argparse.Namespace) -> int:
    """Embed a catalogue into an index file (or extend one with --add): a folder of images, a .jsonl file (one JSON
    object a line: "text" and/or "image" (a path relative to the .jsonl), an optional int "id", any other keys kept
    as metadata) or a .txt file (one text a line, blank lines skipped). Ids not given are sequential in file order."""
    from fine_infer.index import Index

    source = Path(args.source)
    kind = kind_of(source)
    session = load_session(args.bundle, args)
    tasks = _graph_tasks(session)
    task = _choose_task(kind, args.task, source, args.bundle, tasks)
    graph_task, wants = TASKS[task]
    identity = session.manifest.identity()
    out = _out_index(args, source)
    index, start, taken = _open_target(args, out, identity, task)
    catalogue = _read(source, kind, wants, start, taken)
    items, bad = catalogue.items, list(catalogue.bad)
    if items and max(it.id for it in items) > INT64[1]:
        raise ConfigError(f"the ids of {source} would run past int64 after the index's largest id ({start - 1}): "
                          'give every line of a .jsonl catalogue its own "id"')
    if wants in ("image", "both"):  # missing files are bad items before any embedding
        bad += [Bad(it.order, it.where, f"no such image file ({it.image})") for it in items if not it.image.is_file()]
    if wants in ("text", "both"):
        bad += _text_problems(session, _without(items, bad), args.truncate)
    items = _without(items, bad)
    if bad and not args.skip_bad:
        raise first_bad(bad)
    unit = "images" if wants == "image" else "texts" if wants == "text" else "items"
    t0 = time.perf_counter()
    embed = _embedder(session, task, args.truncate)
    progress = Progress(len(items), unit, args.quiet)
    added = 0
    try:
        for lo in range(0, len(items), args.batch_size):
            chunk = items[lo:lo + args.batch_size]
            good, vectors, refused = _embed_chunk(session, task, embed, chunk, args.truncate)
            if refused and not args.skip_bad:
                raise first_bad(refused)
            bad += refused
            if good:
                if index is None:
                    index = Index(vectors.shape[1], dtype=args.dtype or "float32")
                index.add(vectors, [it.id for it in good], metadata=[it.metadata for it in good])
                added += len(good)
            progress.update(len(chunk))
    finally:
        progress.close()
    if not added:
        raise InputError(f"no item of {source} could be indexed ({len(bad)} bad); nothing was written")
    index.attrs.update(bundle=str(Path(args.bundle).resolve()), bundle_identity=identity, task=graph_task,
                       graph=tasks[graph_task])
    index.save(out)
    print(f"indexed {added} {unit[:-1] if added == 1 else unit} in {time.perf_counter() - t0:.1f} s → {out} "
          f"({len(index)} items, {index.dtype}, {graph_task} by graph {tasks[graph_task]!r})"
          + (f"; skipped {len(bad)} bad item(s):" if bad else ""))
    for b in sorted(bad, key=lambda b: b.order):
        print(f"  skipped {b.line()}")
    return 0


# --- search -------------------------------------------------------------------------------------------------------


def _visible(text: str) -> str:
    """``text`` with every character a terminal would act on (escapes, carriage returns, bidi overrides...) written
    as a ``\\u`` escape of four hex digits: catalogue metadata is hostile input and must not rewrite the screen or
    forge result lines."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def _compact(value: Any, width: int = 80) -> str:
    """A metadata value on one line: strings as they are unless they hold spaces, quotes or unprintable characters
    (then JSON, escaped), cut at ``width`` characters."""
    plain = isinstance(value, str) and value and value.isprintable() and not any(c in value for c in " \"'=")
    text = value if plain else _visible(json.dumps(value, ensure_ascii=False))
    return text if len(text) <= width else text[:width - 1] + "…"


def hit_line(rank: int, hit: dict[str, Any]) -> str:
    """``  1. 0.8123  id 17  shoes/a.png  "a red dress"  sku=A12``: rank, score, id, the item's image path and
    text, then its other metadata keys."""
    meta = {k: v for k, v in hit.items() if k not in ("rank", "id", "score")}
    first = [_compact(meta.pop(k)) for k in ("path", "image", "text") if k in meta]
    rest = [f"{_compact(k, 40)}={_compact(v, 40)}" for k, v in meta.items()]
    return "  ".join([f"{rank:>3}. {hit['score']:7.4f}", f"id {hit['id']}", *first, *rest])


def cmd_search(args: argparse.Namespace) -> int:
    """Search an index by text, image, or both (composed retrieval); prints each hit's rank, score, id and
    metadata (its text or image path first)."""
    from fine_infer.index import Index

    index = Index.load(args.index)
    bundle = args.bundle or _recorded(index, Path(args.index), "bundle")
    if not bundle:
        raise ConfigError(f"{args.index} does not record its bundle; pass --bundle")
    if not args.text and not args.image:
        raise ConfigError("give --text, --image or both")
    session = load_session(bundle, args)
    recorded = _recorded(index, Path(args.index), "bundle_identity")
    if recorded and recorded != session.manifest.identity():
        raise ConfigError(f"{args.index} was indexed with another bundle than {bundle} (identity {recorded[:12]}…): "
                          "its vectors are not comparable with this bundle's; search with the bundle that built it")
    try:
        query = session.embed(images=[args.image] if args.image else None, texts=[args.text] if args.text else None,
                              truncate=args.truncate)
    except InputError as exc:
        raise _cli_phrasing(exc) from None
    scores, ids = index.search(query, args.k)
    # metadata keys beside the hit's own; a metadata key named rank, id or score never hides the real one
    hits = [{**(index.get_metadata(int(i)) or {}), "rank": r, "id": int(i), "score": float(s)}
            for r, (s, i) in enumerate(((s, i) for s, i in zip(scores[0], ids[0]) if i >= 0), 1)]
    hits = [{"rank": h["rank"], "id": h["id"], "score": h["score"], **h} for h in hits]  # those three first
    if args.json:
        print_json({"query": {"text": args.text, "image": args.image}, "hits": hits})
    else:
        for h in hits:
            print(hit_line(h["rank"], h))
    return 0


def register(add: AddCommand) -> None:
    """Register ``embed``, ``index`` and ``search``."""
    sp = add("embed", cmd_embed, "embed images and/or texts")
    sp.add_argument("bundle", help="bundle folder (written by fine-infer export)")
    sp.add_argument("--image", nargs="+", metavar="FILE", help="image files to embed (default: none)")
    sp.add_argument("--text", nargs="+", metavar="TEXT",
                    help="texts to embed; with --image, one per image for composed queries (default: none)")
    sp.add_argument("--out", metavar="FILE.npy", help="write a .npy file instead of printing JSON (default: print)")
    sp.add_argument("--force", action="store_true", help="replace an existing --out file")
    sp.add_argument("--truncate", action="store_true", help=TRUNCATE_HELP)
    add_backend_args(sp)

    x = add("index", cmd_index, "embed a folder of images, a .jsonl or a .txt catalogue into an index file")
    x.add_argument("bundle", help="bundle folder (written by fine-infer export)")
    x.add_argument("source", metavar="CATALOGUE",
                   help="a folder of images; a .jsonl file (one JSON object a line: \"text\" and/or \"image\" (a path "
                        "relative to the .jsonl), optional int \"id\", other keys kept as metadata); or a .txt file "
                        "(one text a line, blank lines skipped). Ids not given: sequential in file order from 0 "
                        "(with --add: after the index's largest)")
    x.add_argument("--out", required=True, metavar="FILE.fidx", help="index file to write")
    x.add_argument("--task", default="auto", choices=["auto", *TASKS],
                   help="what to embed from a .jsonl line: its image, its text, or both through the bundle's compose "
                        "graph (default: %(default)s = the image when lines have one and the bundle embeds images, "
                        "else the text)")
    x.add_argument("--dtype", choices=["float32", "float16", "int8"],
                   help="index storage: float32 is exact, float16 half and int8 a quarter of the memory (default: "
                        "float32; with --add, the index's own)")
    x.add_argument("--batch-size", type=positive("--batch-size"), default=16, metavar="N",
                   help="items embedded per call (default: %(default)s)")
    x.add_argument("--add", action="store_true", help="extend an existing index (same bundle and task)")
    x.add_argument("--force", action="store_true", help="replace an existing index")
    x.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images and bad lines, count and list them in the summary (default: the "
                        "first one fails the command)")
    x.add_argument("--quiet", action="store_true", help="no progress bar (it shows only when stderr is a terminal)")
    x.add_argument("--truncate", action="store_true", help=TRUNCATE_HELP)
    add_backend_args(x)

    s = add("search", cmd_search, "search an index by text and/or image")
    s.add_argument("index", help="index file written by fine-infer index")
    s.add_argument("--bundle", help="bundle to embed the query (default: the one the index was built with)")
    s.add_argument("--text", help="query text (with --image: the modification of a composed query) (default: none)")
    s.add_argument("--image", metavar="FILE", help="query image (default: none)")
    s.add_argument("--k", type=positive("--k"), default=10, metavar="N",
                   help="how many hits to print (default: %(default)s)")
    s.add_argument("--json", action="store_true", help="print the query and hits (with their metadata) as JSON")
    s.add_argument("--truncate", action="store_true", help=TRUNCATE_HELP)
    add_backend_args(s)
