"""The ``fine-infer`` command line: a thin layer over the Python API.

Every command prints one clear line and exits non-zero on a :class:`FineInferError` (``--debug`` shows the
traceback). Commands whose optional dependency is missing say what to install instead of failing to start.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from fine_infer.errors import ConfigError, FineInferError, InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def add_backend_args(sp: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--variant``, shared by every command that runs a bundle."""
    from fine_infer.runtime.session import BACKENDS

    sp.add_argument("--backend", default="auto", choices=list(BACKENDS), help="what runs the graphs (default auto)")
    sp.add_argument("--variant", help="graph variant written at export: fp16, int8, cpu-opt (default the fp32 graph); "
                                      "with --backend openvino the precision: fp32 or bf16")


def _load(bundle: str | Path, args: argparse.Namespace, **kwargs: Any):
    """``fine_infer.load`` with the command's --backend/--variant."""
    import fine_infer

    return fine_infer.load(bundle, backend=args.backend, variant=args.variant, **kwargs)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=float))


def _parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# --- export / validate / info --------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    """Export a zoo arch or a user module to a bundle, behind the checker and parity gates."""
    from fine_infer.export import GateFailure, export_arch, export_module, load_factory, parse_dynamic_axes

    if bool(args.arch) == bool(args.module):
        raise ConfigError("give exactly one of --arch (a zoo arch) or --module (pkg.mod:factory)")
    variants = [*(["fp16"] if args.fp16 else []), *(["int8"] if args.int8 else []),
                *(["cpu-opt"] if args.optimize == "cpu" else [])]
    if args.module and args.recall_gate:
        raise ConfigError("--recall-gate evaluates zoo archs on the generated catalogue; it does not apply to --module")
    if args.triton_repo and Path(args.triton_repo).resolve() == Path(args.out).resolve():
        raise ConfigError("--triton-repo must be a folder other than --out")
    common = dict(opset=args.opset, exporter=args.exporter, atol=args.atol, force=args.force, variants=variants,
                  lint=args.lint)
    try:
        if args.arch:
            report = export_arch(
                args.arch, args.out, args.preset, checkpoint=args.checkpoint, pretrained=args.pretrained,
                recall_gate=args.recall_gate,
                overrides=_parse_overrides(args.set), graphs=args.graphs, include_weights=not args.no_weights, **common,
            )
        else:
            module, example = load_factory(args.module)
            report = export_module(
                module, example, args.out, dynamic_axes=parse_dynamic_axes(args.dynamic_axis), source=args.module,
                graph_name=args.graph_name, **common,
            )
    except GateFailure as failure:
        if args.json:
            _print_json(failure.report.to_dict())
        raise
    repo = None
    if args.triton_repo:
        from fine_infer.export._triton_repo import write_triton_repo

        repo = write_triton_repo(args.out, args.triton_repo, force=args.force)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(f"wrote {args.out} in {report.seconds:.1f} s; every gate passed")
        for line in report.summary_lines():
            print("  " + line)
        if repo is not None:
            print(f"wrote Triton Inference Server model repository {args.triton_repo}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Verify a bundle's checksums and re-run parity (ONNX Runtime vs PyTorch) on fresh random inputs."""
    from fine_infer.validate import validate_bundle

    report = validate_bundle(args.bundle, atol=args.atol, backends=args.backend or (), record=not args.no_record)
    if args.json:
        _print_json(report)
    else:
        print(f"{args.bundle}: checksums ok; " + report["summary"])
    return 0 if report["passed"] else 1


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a bundle: arch, graphs with their inputs/outputs, preprocessing, versions, validation."""
    from fine_infer.bundle import read_bundle

    bundle = read_bundle(args.bundle, verify=not args.no_verify)
    m = bundle.manifest
    if args.json:
        _print_json(m.to_dict())
        return 0
    print(f"bundle   {bundle.path}  (format {m.format_version}, checksums {'verified' if not args.no_verify else 'not checked'})")
    print(f"source   {m.arch or m.source}" + (f" preset {m.preset}" if m.preset else "") +
          (f", embedding dim {m.embed_dim}" if m.embed_dim else ""))
    for name, g in m.graphs.items():
        sig = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in g.spec.inputs)
        outs = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in g.spec.outputs)
        print(f"graph    {name} [{g.spec.task}] {g.file} opset {g.opset}: ({sig}) -> ({outs})")
        if g.variants:
            print("variants " + ", ".join(f"{v} {f}" for v, f in g.variants.items()))
    if m.image:
        i = m.image
        print(f"images   resize {i.resize} {i.size} {i.interpolation}, crop {i.crop}, mean {i.mean}, std {i.std}")
    if m.text:
        t = m.text
        print(f"text     {t.tokenizer}, max {t.max_length} tokens, padding {t.padding}")
    v = m.validation
    if v:
        print(f"gates    {'passed' if v.get('passed') else 'FAILED'} at atol {v.get('tolerance', {}).get('atol')}, "
              f"batches {v.get('batch_sizes')}")
    from fine_infer.tune import describe

    for line in describe(bundle):
        print(line)
    print("versions " + ", ".join(f"{k} {val}" for k, val in m.versions.items()))
    return 0


# --- embed / index / search ----------------------------------------------------------------------------------------
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


    session = _load(args.bundle, args)
    vectors = session.embed(images=args.image, texts=args.text)
    if args.out:
        np.save(args.out, vectors)
        print(f"wrote {vectors.shape[0]}×{vectors.shape[1]} embeddings to {args.out}")
    else:
        _print_json({"provider": session.providers, "embeddings": vectors.round(6).tolist()})
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Embed a folder of images into an index file (or extend one with --add)."""
    from fine_infer.index import Index

    files = _image_files(Path(args.folder))
    session = _load(args.bundle, args)
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
    session = _load(bundle, args)
    query = session.embed(images=[args.image] if args.image else None, texts=[args.text] if args.text else None)
    scores, ids = index.search(query, args.k)
    hits = [{"id": int(i), "score": float(s), **(index.get_metadata(int(i)) or {})}
            for s, i in zip(scores[0], ids[0]) if i >= 0]
    if args.json:
        _print_json({"query": {"text": args.text, "image": args.image}, "hits": hits})
    else:
        for rank, h in enumerate(hits, 1):
            print(f"{rank:>3}. {h['score']:.4f}  {h.get('path', h['id'])}")
    return 0


def cmd_catalogue(args: argparse.Namespace) -> int:
    """Write sample garment images of the generated catalogue (PNG files and catalogue.json) into a folder."""
    from fine_infer.catalogue import HELD_OUT_START, generate, save_catalogue

    if args.items < 1:
        raise ConfigError(f"--items must be at least 1, got {args.items}")
    start = HELD_OUT_START if args.held_out else 0
    path = save_catalogue(generate(args.items, args.seed, args.size, start=start), args.out)
    print(f"wrote {args.items} images and {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default: export tiny Fashion-FINE and MAAF bundles, index a generated catalogue, search, time."""
    from fine_infer.demo import run_demo

    return run_demo(workdir=args.workdir, items=args.items)


# --- parser --------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = argparse.ArgumentParser(prog="fine-infer", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=fn.__doc__)
        sp.set_defaults(fn=fn)
        return sp

    e = add("export", cmd_export, "export a zoo arch or a user module to a bundle (ONNX + manifest)")
    src = e.add_argument_group("source (one of)")
    src.add_argument("--arch", help="zoo arch: fashion-fine, maaf, raf, triplet, attributes")
    src.add_argument("--module", help="user encoder as pkg.mod:factory; factory() returns (module, {name: tensor})")
    e.add_argument("--preset", default="tiny", help="tiny (seconds on CPU) or paper (the publication's sizes)")
    e.add_argument("--checkpoint", help="weights: .safetensors or a torch file (loaded with weights_only=True)")
    e.add_argument("--pretrained", action="store_true", help="load the weights shipped with the package")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    e.add_argument("--graphs", nargs="+", help="export only these graphs (default: all of the arch)")
    e.add_argument("--dynamic-axis", action="append", metavar="NAME:DIM[=AXIS]",
                   help="with --module: make dim DIM of input NAME dynamic (axis 0 always is)")
    e.add_argument("--graph-name", default="model", help="with --module: the graph's name in the bundle")
    e.add_argument("--out", required=True, help="bundle folder to write")
    e.add_argument("--force", action="store_true", help="replace an existing bundle")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    e.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"], help="torch.onnx exporter")
    e.add_argument("--atol", type=float, default=None, help="parity gate: max abs error (default 1e-4)")
    e.add_argument("--no-weights", action="store_true", help="leave weights.safetensors out (no torch backend)")
    e.add_argument("--json", action="store_true", help="print the export report as JSON")
    dep = e.add_argument_group("deployment variants (each written beside the fp32 graph behind its own gate)")
    dep.add_argument("--fp16", action="store_true", help="fp16 graph for GPUs/TensorRT (gate: cosine ≥ 0.999)")
    dep.add_argument("--int8", action="store_true", help="ONNX Runtime dynamic int8 graph (gate: cosine ≥ 0.99)")
    dep.add_argument("--optimize", choices=["cpu"], help="cpu: ONNX Runtime transformer fusions (gate: 1e-4)")
    dep.add_argument("--lint", action="store_true", help="gate on TensorRT's ONNX operator support (fp32 and fp16)")
    dep.add_argument("--triton-repo", metavar="DIR", help="also write a Triton Inference Server model repository")
    e.add_argument("--recall-gate", action=argparse.BooleanOptionalAction, default=None,
                   help="gate on catalogue Recall@10 (fp32 and fp16 within 0.5 points of PyTorch); "
                        "default: on with --pretrained")

    v = add("validate", cmd_validate, "verify checksums and re-run the parity gate on fresh inputs")
    v.add_argument("bundle")
    v.add_argument("--atol", type=float, default=None)
    v.add_argument("--json", action="store_true")
    v.add_argument("--backend", nargs="+", choices=["onnxruntime", "openvino"],
                   help="also run the precision gate of each CPU path of these backends (fp32, int8, cpu-opt; "
                        "OpenVINO f32, bf16) and record it in the manifest")
    v.add_argument("--no-record", action="store_true", help="with --backend: report the gates, do not record them")

    i = add("info", cmd_info, "describe a bundle")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="print the manifest")
    i.add_argument("--no-verify", action="store_true", help="skip checksum verification")

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

    c = add("catalogue", cmd_catalogue, "write sample garment images (the generated catalogue) to a folder")
    c.add_argument("out", help="folder to write <id>-<category>-<colour>-<pattern>.png and catalogue.json into")
    c.add_argument("--items", type=int, default=100)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--size", type=int, default=96, help="image side in pixels")
    c.add_argument("--held-out", action="store_true", default=True,
                   help="draw from the held-out split the shipped models never saw (default)")
    c.add_argument("--training-split", dest="held_out", action="store_false", help="draw training-split items")

    d = add("demo", cmd_demo, "tiny end-to-end demo: export, index a generated catalogue, search, time")
    d.add_argument("--workdir", help="where to write the bundle and index (default: a temp folder)")
    d.add_argument("--items", type=int, default=200, help="held-out catalogue items besides the queried products")

    # Command groups with their own modules (each imports its heavy dependencies only when run).
    from fine_infer.cli_deploy import add_commands as add_deploy_commands
    from fine_infer.cli_eval import add_commands as add_eval_commands
    from fine_infer.cli_serve import add_commands as add_serve_commands
    from fine_infer.cli_tune import add_commands as add_tune_commands

    add_eval_commands(sub, add)
    add_deploy_commands(sub, add)
    add_serve_commands(sub, add)
    add_tune_commands(sub, add)
    return p


# Top-level module of a missing dependency -> the pyproject extra that installs it.
_EXTRAS = {
    "torch": "export", "onnx": "export", "onnxscript": "export", "safetensors": "export",
    "onnxruntime": "runtime", "tokenizers": "runtime", "PIL": "runtime",
    "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "pydantic": "serve", "multipart": "serve",
    "prometheus_client": "serve", "httpx": "serve", "matplotlib": "serve", "tqdm": "serve",
    "triton": "kernels", "openvino": "openvino", "tensorrt": "tensorrt", "tritonclient": "test",
}


def _extra_for(exc: ImportError) -> str:
    """The extra that provides the module ``exc`` failed to import (``all`` when unknown)."""
    top = (getattr(exc, "name", None) or "").split(".")[0]
    return _EXTRAS.get(top, "all")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fine-infer`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except FineInferError as exc:
        if args.debug:
            raise
        print(f"fine-infer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if args.debug:
            raise
        print(f"fine-infer {args.command}: error: missing dependency ({exc}); "
              f"install the extra it needs: pip install 'fine-infer[{_extra_for(exc)}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
