"""``export``, ``validate`` and ``info``: make a bundle, check it, describe it."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fine_infer.cli._args import AddCommand, add_bundle_arg, print_json
from fine_infer.errors import ConfigError


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


CALIBRATION_SEED = 17  # the catalogue draw zoo models calibrate on (the recall gate evaluates seed 0's held-out split)


def calibration_data(args: argparse.Namespace):
    """``--int8-static``'s calibration data: ``--calibration DATA`` (a folder of images, a .txt of texts, a .jsonl of
    {"text", "image"} lines, read as ``fine-infer index`` reads them), else for a zoo arch the generated catalogue
    (images and their captions); None without ``--int8-static``."""
    if not args.int8_static:
        if args.calibration:
            raise ConfigError("--calibration is the data of --int8-static; add --int8-static")
        return None
    from fine_infer.export._calibrate import DEFAULT_HELD_OUT, CalibrationData

    size, held = args.calibration_size, DEFAULT_HELD_OUT
    extra = dict(size=size, held_out=held, subset_size=args.calibration_size,
                 smooth_quant=args.smooth_quant)
    if args.calibration:
        from fine_infer.cli._catalogue_input import first_bad, kind_of, read_images, read_jsonl, read_txt

        src = Path(args.calibration)
        kind = kind_of(src)
        if kind == "images":
            cat = read_images(src, 0)
        elif kind == "txt":
            cat = read_txt(src, 0)
        else:
            first = next((json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()
                          if line.strip()), {})
            first = first if isinstance(first, dict) else {}
            wants = "both" if {"text", "image"} <= set(first) else ("image" if "image" in first else "text")
            cat = read_jsonl(src, 0, wants, set())
        if cat.bad:
            raise first_bad(cat.bad)
        images = [i.image for i in cat.items if i.image is not None]
        texts = [i.text for i in cat.items if i.text is not None]
        return CalibrationData(images, texts, source=f"{src} ({len(cat.items)} items)", **extra)
    if not args.arch:
        raise ConfigError("--int8-static calibrates on real inputs: give --calibration DATA (a folder of images, a "
                          ".txt of texts or a .jsonl) for --module and --hf")
    from fine_infer.tools.catalogue import generate

    items = generate(size + held, seed=CALIBRATION_SEED)
    return CalibrationData([i.image for i in items], [i.caption for i in items],
                           source=f"generated catalogue, seed {CALIBRATION_SEED}", **extra)


RANDOM_WEIGHTS = ("the bundle holds random weights: its embeddings and every recall figure are chance-level until "
                  "it is exported with real ones")


def _step_printer():
    """Prints each export step to stderr with the seconds since the export began."""
    t0 = time.perf_counter()
    return lambda message: print(f"  {time.perf_counter() - t0:6.1f} s  {message}", file=sys.stderr, flush=True)


def cmd_export(args: argparse.Namespace) -> int:
    """Export a zoo arch, a user module or a local Hugging Face folder to a bundle, behind the checker and parity
    gates (and, for --hf, parity with the source library itself)."""
    from fine_infer.bundle.writer import check_destination

    check_destination(args.out, args.force)  # before torch and the model load: an existing --out fails at once
    from fine_infer.export import GateFailure, declare, export_arch, export_hf, export_user, load_factory

    if sum(map(bool, (args.arch, args.module, args.hf))) != 1:
        raise ConfigError("give exactly one of --arch (a zoo arch), --module (pkg.mod:factory) or --hf (a local "
                          "Hugging Face folder)")
    variants = [*(["fp16"] if args.fp16 else []), *(["int8"] if args.int8 else []),
                *(["int8-static", "openvino-int8"] if args.int8_static else []),
                *(["cpu-opt"] if args.optimize == "cpu" else [])]
    module_only = [flag for flag, value in (
        ("--task", args.task), ("--input-names", args.input_names), ("--tokenizer", args.tokenizer),
        ("--text-max-length", args.text_max_length), ("--text-padding", args.text_padding),
        ("--image-size", args.image_size), ("--image-crop", args.image_crop), ("--image-resize", args.image_resize),
        ("--image-interpolation", args.image_interpolation), ("--image-mean", args.image_mean),
        ("--image-std", args.image_std), ("--preprocess", args.preprocess), ("--dynamic-axis", args.dynamic_axis),
    ) if value is not None]
    if module_only and not args.module:
        raise ConfigError(f"{', '.join(module_only)} declare(s) how a --module is fed; --arch and --hf read it from "
                          "the model")
    if not args.arch and args.recall_gate:
        raise ConfigError("--recall-gate evaluates zoo archs on the generated catalogue; it does not apply to "
                          "--module or --hf")
    if args.triton_repo and Path(args.triton_repo).resolve() == Path(args.out).resolve():
        raise ConfigError("--triton-repo must be a folder other than --out")
    common = dict(opset=args.opset, exporter=args.exporter, atol=args.atol, force=args.force, variants=variants,
                  lint=args.lint, drop_failed_variants=args.drop_failed_variants, calibration=calibration_data(args))
    signing = contextlib.ExitStack()
    # A step line on stderr as the export goes (it takes tens of seconds to minutes): on a terminal, or when asked;
    # logs and pipes that read stderr for the one-line error get just that.
    if args.progress or (not args.quiet and sys.stderr.isatty()):
        from fine_infer.export.report import progress

        signing.enter_context(progress(_step_printer()))
    if args.sign_key:  # the key is checked now; the bundle is signed before it is renamed into place
        from fine_infer.bundle.signing import signing_on_commit

        signing.enter_context(signing_on_commit(args.sign_key))
    try:
        if args.arch:
            from fine_infer.tools.recall import default_checks

            if not (args.checkpoint or args.pretrained):
                print(f"fine-infer export: warning: {RANDOM_WEIGHTS} (no --checkpoint or --pretrained)"
                      + ("; the paper preset writes ~1-2 GB of them and takes minutes" if args.preset == "paper"
                         else ""), file=sys.stderr)
            report = export_arch(
                args.arch, args.out, args.preset, checkpoint=args.checkpoint, pretrained=args.pretrained,
                checks=default_checks(args.pretrained, args.recall_gate),
                overrides=_parse_overrides(args.set), graphs=args.graphs, include_weights=not args.no_weights, **common,
            )
        elif args.hf:
            report = export_hf(args.hf, args.out, **common)
        else:
            image = {"size": args.image_size, "crop": args.image_crop, "resize": args.image_resize,
                     "interpolation": args.image_interpolation, "mean": args.image_mean, "std": args.image_std}
            encoder = declare(
                load_factory(args.module, graph_name=args.graph_name), tasks=args.task or (), tokenizer=args.tokenizer,
                text_max_length=args.text_max_length, text_padding=args.text_padding, image=image,
                preprocess=args.preprocess, dynamic_axes=[a for group in args.dynamic_axis or () for a in group],
                input_names=args.input_names)
            report = export_user(encoder, args.out, source=args.module, **common)
    except GateFailure as failure:
        if args.json:
            print_json(failure.report.to_dict())
        raise
    finally:
        signing.close()
    from fine_infer.export import drop_warning

    warning = drop_warning(report.graphs)  # --drop-failed-variants left a variant out: say so every time
    if warning:
        print(f"fine-infer export: warning: {warning}", file=sys.stderr)
    repo = None
    if args.triton_repo:
        from fine_infer.export.triton_repo import write_triton_repo

        repo = write_triton_repo(args.out, args.triton_repo, force=args.force)
    if args.json:
        print_json(report.to_dict())
    else:
        print(f"wrote {args.out} in {report.seconds:.1f} s; every gate "
              + ("of what it holds passed (a failed variant was dropped)" if warning else "passed"))
        for line in report.summary_lines():
            print("  " + line)
        if repo is not None:
            print(f"wrote Triton Inference Server model repository {args.triton_repo}")
        if args.sign_key:
            print(f"signed {args.out} with {args.sign_key}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Verify a bundle's checksums and re-run parity (ONNX Runtime vs PyTorch) on fresh random inputs."""
    from fine_infer.tools.validate import validate_bundle

    report = validate_bundle(args.bundle, atol=args.atol, backends=args.backend or (), record=not args.no_record)
    if args.json:
        print_json(report)
    else:
        print(f"{args.bundle}: checksums ok; " + report["summary"])
    return 0 if report["passed"] else 1


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a bundle: arch, graphs with their inputs/outputs, preprocessing, versions, validation."""
    from fine_infer.bundle import read_bundle

    bundle = read_bundle(args.bundle, verify=not args.no_verify)
    m = bundle.manifest
    if args.json:
        print_json(m.to_dict())
        return 0
    print(f"bundle   {bundle.path}  (format {m.format_version}, checksums {'verified' if not args.no_verify else 'not checked'})")
    print(f"source   {m.arch or m.source}" + (f" preset {m.preset}" if m.preset else "") +
          (f", embedding dim {m.embed_dim}" if m.embed_dim else ""))
    if m.weights_origin:
        w = m.weights_origin
        print(f"weights  {w.get('kind')}" + (f" ({w['file']})" if w.get("file") else "")
              + (": chance-level embeddings" if w.get("kind") == "random" else ""))
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
    from fine_infer.runtime.choice import describe

    for line in describe(bundle):
        print(line)
    print("versions " + ", ".join(f"{k} {val}" for k, val in m.versions.items()))
    return 0


def register(add: AddCommand) -> None:
    """Register ``export``, ``validate`` and ``info``."""
    e = add("export", cmd_export, "export a zoo arch, a user module or a Hugging Face folder to a bundle "
                                         "(ONNX + tokenizer + manifest)")
    src = e.add_argument_group("source (one of)")
    src.add_argument("--arch", help="zoo arch: fashion-fine, maaf, raf, triplet, attributes")
    src.add_argument("--module", help="user encoder as pkg.mod:factory; factory() returns (module, {name: tensor}) "
                                      "or a dict/dataclass declaring module, inputs (or graphs), task, tokenizer, "
                                      "image_preprocess, text_max_length (fine_infer.export.UserEncoder)")
    src.add_argument("--hf", metavar="DIR", help="a local folder written by transformers save_pretrained or "
                                                 "sentence-transformers save (never the hub): sentence-transformers "
                                                 "BERT-family, CLIPModel, SiglipModel; gated against that library")
    e.add_argument("--preset", default="tiny", help="tiny (seconds on CPU) or paper (the publication's sizes)")
    e.add_argument("--checkpoint", help="weights: .safetensors or a torch file (loaded with weights_only=True)")
    e.add_argument("--pretrained", action="store_true", help="load the weights shipped with the package")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    e.add_argument("--graphs", nargs="+", help="export only these graphs (default: all of the arch)")
    e.add_argument("--dynamic-axis", action="append", nargs="+", metavar="NAME:DIM[=AXIS]",
                   help="with --module: make dim DIM of input NAME dynamic (axis 0 always is); several after one "
                        "flag, repeatable")
    e.add_argument("--graph-name", default="model", help="with --module: the graph's name in the bundle")
    m = e.add_argument_group("with --module: how the runtime feeds it (over what the factory declares)")
    m.add_argument("--task", nargs="+", metavar="[GRAPH=]TASK",
                   help="embed_text, embed_image, compose, classify or custom (default), for every graph or GRAPH=")
    m.add_argument("--input-names", nargs="+", metavar="NAME", help="the graph's input names, in the order of the "
                                                                    "example inputs (e.g. input_ids attention_mask)")
    m.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json, or a Hugging Face folder holding one")
    m.add_argument("--text-max-length", type=int, metavar="N", help="tokens per text (default: the tokenizer's own "
                                                                    "truncation length)")
    m.add_argument("--text-padding", choices=["longest", "max_length"], help="pad to the longest text (default) "
                                                                               "or always to --text-max-length")
    m.add_argument("--image-size", type=int, metavar="N", help="resize target (the shorter side, or both sides)")
    m.add_argument("--image-crop", type=int, metavar="N", help="centre crop (default: --image-size)")
    m.add_argument("--image-resize", choices=["shorter", "exact"], help="shorter side then crop, or exact size")
    m.add_argument("--image-interpolation", choices=["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"],
                   help="resampling filter of the resize")
    m.add_argument("--image-mean", type=float, nargs=3, metavar=("R", "G", "B"), help="per-channel mean subtracted after scaling to 0..1")
    m.add_argument("--image-std", type=float, nargs=3, metavar=("R", "G", "B"), help="per-channel std divided by after the mean")
    m.add_argument("--preprocess", metavar="JSON", help='JSON (or a JSON file): {"image": {ImagePreprocess fields}, '
                                                        '"text": {"max_length": N, "padding": ...}}')
    e.add_argument("--out", required=True, help="bundle folder to write")
    e.add_argument("--force", action="store_true", help="replace an existing bundle")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    e.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"], help="torch.onnx exporter")
    e.add_argument("--atol", type=float, default=None, help="parity gate: max abs error (default 1e-4)")
    e.add_argument("--no-weights", action="store_true", help="leave weights.safetensors out (no torch backend)")
    e.add_argument("--json", action="store_true", help="print the export report as JSON")
    e.add_argument("--quiet", action="store_true", help="no step-by-step progress lines on stderr")
    e.add_argument("--progress", action="store_true",
                   help="step-by-step progress lines on stderr even when it is not a terminal (e.g. a CI log)")
    dep = e.add_argument_group("deployment variants (each written beside the fp32 graph behind its own gate)")
    dep.add_argument("--fp16", action="store_true", help="fp16 graph for GPUs/TensorRT (gate: cosine ≥ 0.999)")
    dep.add_argument("--int8", action="store_true", help="ONNX Runtime dynamic int8 graph (gate: cosine ≥ 0.99)")
    dep.add_argument("--int8-static", action="store_true",
                     help="calibrated static int8 for CPUs: an ONNX Runtime QDQ graph and an OpenVINO int8 IR (NNCF; "
                          "the openvino extra), each gated on held-out real inputs (cosine ≥ 0.99, top-10 ≥ 0.9)")
    dep.add_argument("--calibration", metavar="DATA",
                     help="with --int8-static: real inputs to calibrate on, a folder of images, a .txt of texts or a "
                          ".jsonl of {\"text\", \"image\"} lines (default for zoo archs: the generated catalogue)")
    dep.add_argument("--calibration-size", type=int, default=64, metavar="N",
                     help="with --int8-static: calibration samples (16 more are held out for the gate)")
    dep.add_argument("--smooth-quant", choices=["auto", "on", "off"], default="auto",
                     help="with --int8-static: NNCF SmoothQuant for graphs with attention (auto: try both, keep the "
                          "one closer to fp32 on the calibration inputs)")
    dep.add_argument("--optimize", choices=["cpu"], help="cpu: ONNX Runtime transformer fusions (gate: 1e-4)")
    dep.add_argument("--lint", action="store_true", help="gate on TensorRT's ONNX operator support (fp32 and fp16)")
    dep.add_argument("--triton-repo", metavar="DIR", help="also write a Triton Inference Server model repository")
    e.add_argument("--sign-key", metavar="KEY.pem", help="sign the bundle with this private key before it is moved "
                                                         "into place (see `fine-infer sign`)")
    dep.add_argument("--drop-failed-variants", action="store_true",
                     help="when a variant's gate fails, write the bundle without that variant (exit 0, a warning, "
                          "the failure recorded in the manifest) instead of failing the export")
    e.add_argument("--recall-gate", action=argparse.BooleanOptionalAction, default=None,
                   help="gate on catalogue Recall@10 (fp32 and fp16 within 0.5 points of PyTorch); "
                        "default: on with --pretrained")

    v = add("validate", cmd_validate, "verify checksums and re-run the parity gate on fresh inputs")
    add_bundle_arg(v)
    v.add_argument("--atol", type=float, default=None,
                   help="parity gate: max abs error (default: the one the bundle was exported with, else 1e-4)")
    v.add_argument("--json", action="store_true", help="print the validation report as JSON")
    v.add_argument("--backend", nargs="+", choices=["onnxruntime", "openvino"],
                   help="also run the precision gate of each CPU path of these backends (fp32, int8, cpu-opt; "
                        "OpenVINO f32, bf16) and record it in the manifest")
    v.add_argument("--no-record", action="store_true", help="with --backend: report the gates, do not record them")

    i = add("info", cmd_info, "describe a bundle")
    add_bundle_arg(i)
    i.add_argument("--json", action="store_true", help="print the manifest")
    i.add_argument("--no-verify", action="store_true", help="skip checksum verification")
