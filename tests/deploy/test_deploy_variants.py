"""fp16 / int8 / cpu-opt variants: written beside the portable graph, gated against fp32 PyTorch, recorded."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from deploy_helpers import VARIANTS, arch_params

from fine_infer.bundle import read_bundle
from fine_infer.compare import Tolerance, compare
from fine_infer.errors import BundleError, ConfigError, ExportError
from fine_infer.export import GateFailure
from fine_infer.export.gates import GraphJob
from fine_infer.export.report import ExportReport
from fine_infer.export._fp16 import FP32_OPS, convert_to_fp16
from fine_infer.export._onnx import export_graph
from fine_infer.export._variants import TOLERANCES, check_variant_parity, write_variants
from fine_infer.bundle.variants import ort_session_kwargs, resolve_variant, variant_file
from fine_infer.specs import GraphSpec, TensorSpec


@pytest.mark.parametrize("arch", arch_params())
def test_fp16_int8_and_cpu_variants_pass_their_gates(deploy_bundle, arch, record_property):
    out, report, _ = deploy_bundle(arch)
    manifest = json.loads((out / "manifest.json").read_text())
    for name, g in report.graphs.items():
        for variant in VARIANTS:
            row = g["variants"][variant]
            assert row["passed"], row["reason"]
            assert manifest["graphs"][name]["variants"][variant] == row["file"] == f"{name}.{variant}.onnx"
            assert row["file"] in manifest["files"] and (out / row["file"]).is_file()
            s = row["summary"]
            tol = TOLERANCES[variant]
            assert s["min_cosine"] >= (tol.min_cosine or 0.0) and s["topk_agreement"] >= tol.min_topk
            assert {(c["runtime"], c["batch"]) for c in row["checks"]} >= {("onnxruntime", b) for b in (1, 3, 8, "all")}
            if variant == "fp16":  # fp16 arithmetic emulated by onnx.reference as well
                ran = {(c["runtime"], c["batch"]) for c in row["checks"]}
                assert {("fp16-reference", b) for b in (1, 3, "all")} <= ran
            record_property(f"{name}.{variant}", f"min cos {s['min_cosine']:.6f} agreement {s['topk_agreement']:.3f} "
                                                 f"max abs {s['max_abs']:.2e}")
        assert g["variants"]["fp16"]["tensorrt"] and not g["variants"]["int8"]["tensorrt"]
    read_bundle(out)  # every variant is checksummed


def _types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    t = {vi.name: vi.type.tensor_type.elem_type for vi in (*inferred.graph.value_info, *inferred.graph.input,
                                                            *inferred.graph.output)}
    t.update({i.name: i.data_type for i in model.graph.initializer})
    return t


@pytest.mark.parametrize("arch", arch_params())
def test_fp16_graph_keeps_io_and_overflow_traps_in_fp32(deploy_bundle, arch):
    out, _, _ = deploy_bundle(arch)
    b = read_bundle(out)
    for entry in b.manifest.graphs.values():
        fp32 = onnx.load(b.file(entry.file))
        m = onnx.load(b.file(entry.variants["fp16"]))
        def io(model):
            return [(v.name, v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)]

        assert io(m) == io(fp32)  # keep_io_types: the runtime feeds the same arrays
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
        types = _types(m)
        kept = [n for n in m.graph.node if n.op_type in FP32_OPS]
        assert kept, "every zoo graph has reductions / norms"
        for n in kept:
            floats = [types[i] for i in n.input if i and types.get(i) in (1, 10)]
            assert all(t == onnx.TensorProto.FLOAT for t in floats), f"{n.op_type} {n.name} runs in fp16"
        assert {p.key: p.value for p in m.metadata_props}["fine_infer.variant"] == "fp16"


class _NormTrap(torch.nn.Module):
    """Large activations through a hand-written LayerNorm and an L2 normalisation: x² overflows fp16 (> 65504)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 32)
        self.out = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = self.lin(x) * 400.0
        mu = h.mean(-1, keepdim=True)
        var = (h - mu).pow(2).mean(-1, keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-5)
        return torch.nn.functional.normalize(self.out(torch.relu(h)), dim=-1)


def _trap_job():
    spec = GraphSpec("trap", "embed_image", (TensorSpec("x", "float32", ("batch", 16)),),
                     (TensorSpec("embedding", "float32", ("batch", 8)),))
    module = _NormTrap().eval()
    return GraphJob(spec, module, lambda b, L, g: {"x": torch.randn(b, 16, generator=g) * 3})


def test_fp16_keeps_squares_and_norms_in_fp32_where_naive_fp16_overflows(tmp_path, monkeypatch):
    job = _trap_job()
    x = job.sampler(2, None, torch.Generator().manual_seed(0))["x"]
    export_graph(job.module, job.spec, [x], tmp_path / "trap.onnx")
    report = convert_to_fp16(tmp_path / "trap.onnx", tmp_path / "trap.fp16.onnx")
    assert report.fp32_ops.get("ReduceMean") and report.fp32_ops.get("Sqrt")
    rows, _, reason = check_variant_parity(job, tmp_path / "trap.fp16.onnx", "fp16", TOLERANCES["fp16"])
    assert not reason and {r["runtime"] for r in rows} == {"onnxruntime", "fp16-reference"}

    import fine_infer.export._fp16 as fp16

    decide = fp16._decide  # naive conversion: everything fp16, squares and variances included
    monkeypatch.setattr(fp16, "_decide", lambda gr: {k: "fp16" if v == "fp32" else v for k, v in decide(gr).items()})
    fp16.convert_to_fp16(tmp_path / "trap.onnx", tmp_path / "naive.onnx")
    rows, _, reason = check_variant_parity(job, tmp_path / "naive.onnx", "fp16", TOLERANCES["fp16"])
    # ONNX Runtime's CPU provider computes the fp16 nodes in fp32 and hides the overflow; the fp16 reference does not.
    assert "fp16 on fp16-reference" in reason and "fp16 on onnxruntime" not in reason


def test_a_failed_variant_gate_raises_gate_failure_with_the_report(tmp_path):
    job = _trap_job()
    x = job.sampler(2, None, torch.Generator().manual_seed(0))["x"]
    export_graph(job.module, job.spec, [x], tmp_path / "trap.onnx")
    from fine_infer.bundle import GraphEntry

    entries = {"trap": GraphEntry(job.spec, "trap.onnx", 20)}
    report = ExportReport(str(tmp_path))
    impossible = {"int8": Tolerance(atol=None, min_cosine=1.0000001, min_topk=0.9)}
    # every variant is gated first: the line names the one that passed (fp16) and the figure of the one that failed
    expected = (r"variant gates: passed fp16; FAILED int8 \(trap\.embedding \(int8 on onnxruntime\): min cosine "
                r"[0-9.]+ < 1\.0000001, seed \d+\); nothing was written: rerun without --int8")
    with pytest.raises(GateFailure, match=expected) as info:
        write_variants(tmp_path, entries, [job], ["int8", "fp16"], report=report, tolerances=impossible)
    assert not info.value.report.passed and {"int8", "fp16"} <= set(info.value.report.graphs["trap"]["variants"])
    assert entries["trap"].variants == {}  # nothing recorded when the export fails
    with pytest.raises(ExportError, match="FAILED int8"):
        write_variants(tmp_path, entries, [job], ["int8"], tolerances=impossible)
    # drop_failed: the failed variant's file is deleted, the passing one recorded
    rows = write_variants(tmp_path, entries, [job], ["int8", "fp16"], tolerances=impossible, drop_failed=True)
    assert entries["trap"].variants == {"fp16": "trap.fp16.onnx"} and [r.get("dropped") for r in rows] == [True, None]
    assert not (tmp_path / "trap.int8.onnx").exists() and (tmp_path / "trap.fp16.onnx").is_file()
    with pytest.raises(ConfigError, match="unknown variant"):
        write_variants(tmp_path, entries, [job], ["bf16"])


def test_variant_resolution_and_running_the_fp16_graph(deploy_bundle):
    out, _, model = deploy_bundle("maaf")  # maaf's fp16 compose graph is the one that crashes ORT's NCHWc transformer
    b = read_bundle(out)
    for name, entry in b.manifest.graphs.items():
        assert resolve_variant(b, name) == out / entry.file
        assert resolve_variant(b, entry, "fp16") == out / f"{name}.fp16.onnx"
        assert variant_file(entry, "fp32") == entry.file
        with pytest.raises(BundleError, match=r"no variant 'bf16'; available: fp32, fp16, int8, cpu-opt"):
            variant_file(entry, "bf16")
        with pytest.raises(BundleError, match="build-engine"):
            variant_file(entry, "fp16", backend="tensorrt")
        # fp16 graphs run with ONNX Runtime's NCHWc transformer off (ort_session_kwargs), on every graph.
        feeds = {k: v.numpy() for k, v in model.example_inputs(name, 4).items()}
        a, h = (ort.InferenceSession(resolve_variant(b, name, v), providers=["CPUExecutionProvider"],
                                     **ort_session_kwargs(v)).run(None, feeds)[0] for v in ("fp32", "fp16"))
        assert np.isfinite(h).all() and compare(a, h, Tolerance(atol=None, min_cosine=0.999)).passed


@pytest.mark.slow
def test_fashion_fine_paper_fp16_and_int8_pass_their_gates(tmp_path):
    """The paper-size Fashion-FINE (ViT-B/16 at 256 px + 6 BERT layers): fp16 and int8 graphs behind their gates."""
    from fine_infer.export import export_arch

    report = export_arch("fashion-fine", tmp_path / "ff-paper", "paper", include_weights=False,
                         variants=["fp16", "int8"])
    for name, g in report.graphs.items():
        for variant in ("fp16", "int8"):
            row = g["variants"][variant]
            assert row["passed"], row["reason"]
            assert row["summary"]["min_cosine"] >= TOLERANCES[variant].min_cosine
    read_bundle(tmp_path / "ff-paper")


OUTLIER_ENCODER = '''
import torch


class Outlier(torch.nn.Module):
    """One outlier weight (100 among weights of ~0.05): per-tensor int8 weights round the rest of that layer to 0."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(32, 64)
        self.out = torch.nn.Linear(64, 16)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(64, 32, generator=g) * 0.05)
            self.lin.weight[0, 0] = 100.0

    def forward(self, x):
        return torch.nn.functional.normalize(self.out(torch.relu(self.lin(x))), dim=-1)


def factory():
    return Outlier().eval(), {"x": torch.randn(2, 32)}
'''


@pytest.fixture
def outlier_encoder(tmp_path, monkeypatch):
    """A user encoder (``--module int8_outlier_encoder:factory``) whose fp16 graph passes its gate and whose int8
    graph fails it for real (min cosine ~0.3-0.5: the outlier sets the per-tensor weight scale)."""
    (tmp_path / "int8_outlier_encoder.py").write_text(OUTLIER_ENCODER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "int8_outlier_encoder:factory"


def test_export_gates_every_variant_and_fails_naming_passed_and_failed(outlier_encoder, tmp_path, capsys):
    from fine_infer.cli import main

    out = tmp_path / "bundle"
    rc = main(["export", "--module", outlier_encoder, "--int8", "--fp16", "--optimize", "cpu", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err  # release pipelines depend on the non-zero exit
    assert "variant gates: passed fp16, cpu-opt; FAILED int8 (model.output (int8 on onnxruntime): min cosine" in err
    assert "< 0.99" in err and "rerun without --int8, or with --drop-failed-variants" in err
    assert not out.exists()  # nothing written


def test_drop_failed_variants_keeps_the_bundle_without_them(outlier_encoder, tmp_path, capsys):
    import fine_infer
    from fine_infer.cli import main

    out = tmp_path / "bundle"
    rc = main(["export", "--module", outlier_encoder, "--fp16", "--int8", "--out", str(out), "--drop-failed-variants"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    warning = cap.err.strip()
    assert len(warning.splitlines()) == 1 and warning.startswith("fine-infer export: warning: variant gates: passed "
                                                                  "fp16; FAILED int8 (model.output")
    assert "wrote the bundle without int8" in warning and "dropped" in cap.out
    b = read_bundle(out)  # checksums verified: the dropped file is neither present nor listed
    entry = b.manifest.graphs["model"]
    assert entry.variants == {"fp16": "model.fp16.onnx"} and not (out / "model.int8.onnx").exists()
    assert "model.int8.onnx" not in b.manifest.files
    v = b.manifest.validation
    assert v["passed"] and list(v["dropped_variants"]) == ["int8"]
    assert v["dropped_variants"]["int8"][0].startswith("model: model.output (int8 on onnxruntime): min cosine")
    row = v["graphs"]["model"]["variants"]["int8"]
    assert row["dropped"] and not row["passed"] and row["summary"]["min_cosine"] < 0.99
    with pytest.raises(BundleError, match="no variant 'int8'"):
        fine_infer.load(out, variant="int8")
    assert fine_infer.load(out, variant="fp16").run("model", {"x": np.ones((1, 32), np.float32)})["output"].shape \
        == (1, 16)
