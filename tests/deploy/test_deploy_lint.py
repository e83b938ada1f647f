"""The TensorRT compatibility lint: zoo graphs pass; planted problems fail, naming the node."""

import json
import os
import subprocess
import sys

import onnx
import pytest
from deploy_helpers import arch_params
from onnx import TensorProto, helper

from fine_infer.errors import ExportError
from fine_infer.export.lint import lint_bundle, lint_gate, lint_onnx, load_table


def _model(nodes, inputs, outputs, inits=(), opset=20, extra_opsets=()):
    graph = helper.make_graph(nodes, "planted", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 10
    return model


def _save(model, path):
    onnx.save(model, os.fspath(path))
    return path


# Known lint failures of zoo graphs: (arch, report name) -> (op, the start of the one error expected). Each is a
# model to fix, not a lint to loosen: an entry must go when its model is fixed (the test then fails until it does).
KNOWN_LINT_ERRORS: dict[tuple[str, str], tuple[str, str]] = {}


@pytest.mark.parametrize("arch", arch_params())
def test_every_zoo_graph_and_its_fp16_variant_pass_the_lint(deploy_bundle, arch, record_property):
    out, _, _ = deploy_bundle(arch)
    reports = lint_bundle(out)
    assert reports and any(name.endswith(":fp16") for name in reports)
    for name, r in reports.items():
        record_property(name, r.summary())
        known = KNOWN_LINT_ERRORS.get((arch, name))
        if known is None:
            assert r.passed, r.summary()
        else:
            assert [(f.op, f.problem.startswith(known[1])) for f in r.errors] == [(known[0], True)], (
                f"{arch} {name}: expected only the known {known[0]} error (fixed? drop it from KNOWN_LINT_ERRORS): "
                f"{r.summary()}")


def test_the_table_names_its_tensorrt_version_and_source():
    table = load_table()
    assert table["tensorrt_version"] == "10.15" and "onnx-tensorrt" in table["source"]
    assert table["opset"] == {"min": 9, "max": 24}
    assert table["ops"]["LayerNormalization"]["supported"] and not table["ops"]["MatMulInteger"]["supported"]
    assert "INT64" in table["ops"]["Gather"]["types"] and "INT64" not in table["ops"]["MatMul"]["types"]
    assert "no longer casts INT64 down to INT32" in table["notes"]["int64"]


def test_a_planted_unsupported_op_fails_naming_the_node(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3, 3])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="fine_relu"),
        helper.make_node("Det", ["r"], ["y"], name="planted_det"),
        helper.make_node("FancyOp", ["r"], ["z"], name="planted_custom", domain="com.example"),
    ]
    model = _model(nodes, [x], [y, z], extra_opsets=[helper.make_opsetid("com.example", 1)])
    path = _save(model, tmp_path / "bad.onnx")
    report = lint_onnx(path)
    assert not report.passed
    by_node = {f.node: f for f in report.errors}
    assert set(by_node) == {"planted_det", "planted_custom"}
    assert "Det is not supported by the TensorRT 10.15 ONNX parser" in by_node["planted_det"].problem
    assert "com.example.FancyOp" in by_node["planted_custom"].op and "plugin" in by_node["planted_custom"].problem
    first = r"^TensorRT lint of bad.onnx failed \(2 errors\); first: error: node planted_det \(Det\)"
    with pytest.raises(ExportError, match=first):
        lint_gate(path)


def test_int64_data_is_flagged_where_tensorrt_does_not_take_it(tmp_path):
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])
    out = helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", 2])
    w = helper.make_tensor("w", TensorProto.INT64, [4, 2], [1] * 8)
    idx = helper.make_tensor("idx", TensorProto.INT64, [2], [0, 1])
    nodes = [
        helper.make_node("Gather", ["ids", "idx"], ["g"], name="int64_gather_ok", axis=1),  # INT64 is native here
        helper.make_node("MatMul", ["ids", "w"], ["mm"], name="int64_matmul"),
        helper.make_node("Add", ["mm", "g"], ["out"], name="int64_add_ok"),
    ]
    report = lint_onnx(_save(_model(nodes, [ids], [out], [w, idx]), tmp_path / "int64.onnx"))
    assert [f.node for f in report.errors] == ["int64_matmul"]
    problem = report.errors[0].problem
    assert "INT64 tensor 'ids', 'w', 'mm'" in problem and "cast to a float type" in problem


@pytest.mark.parametrize("onnx_type,trt_type", [(TensorProto.INT64, "INT64"), (TensorProto.INT32, "INT32")])
def test_integer_clip_is_an_error(tmp_path, onnx_type, trt_type):
    """The 10.x operator docs list Clip for FP32, FP16 and BF16 only (torch.clamp on integer tensors exports one)."""
    x = helper.make_tensor_value_info("x", onnx_type, ["batch"])
    y = helper.make_tensor_value_info("y", onnx_type, ["batch"])
    lo = helper.make_tensor("lo", onnx_type, [], [0])
    report = lint_onnx(_save(_model([helper.make_node("Clip", ["x", "lo"], ["y"], name="clamp_len")], [x], [y], [lo]),
                             tmp_path / "clip.onnx"))
    assert not report.passed and [f.node for f in report.errors] == ["clamp_len"] and not report.warnings
    assert f"{trt_type} tensor 'x'" in report.errors[0].problem
    assert "Clip takes FP32, FP16, BF16" in report.errors[0].problem
    f = helper.make_tensor_value_info("f", TensorProto.FLOAT, ["batch"])
    g = helper.make_tensor_value_info("g", TensorProto.FLOAT, ["batch"])
    flo = helper.make_tensor("flo", TensorProto.FLOAT, [], [0.0])
    assert lint_onnx(_save(_model([helper.make_node("Clip", ["f", "flo"], ["g"])], [f], [g], [flo]),
                           tmp_path / "fclip.onnx")).passed


def test_dynamic_dims_must_be_named_axes_a_profile_covers(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "height", None])
    path = _save(_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x], [y]), tmp_path / "dyn.onnx")
    problems = [f.problem for f in lint_onnx(path).errors]
    assert any("'height'" in p and "no optimisation profile covers" in p for p in problems)
    assert any("dim 3 is dynamic without a name" in p for p in problems)
    assert [f.problem for f in lint_onnx(path, profile_axes={"batch", "height"}).errors] == [
        p for p in problems if "without a name" in p]


def test_opset_outside_the_parser_range_and_cpu_only_variants_fail(tmp_path, deploy_bundle):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x], [y], opset=8)
    assert "opset 8 is outside" in lint_onnx(m).errors[0].problem
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x], [y], opset=21)
    assert lint_onnx(m).passed and "needs a TensorRT newer than 10.0" in lint_onnx(m).warnings[0].problem
    out, _, _ = deploy_bundle("triplet")
    int8 = lint_onnx(out / "image.int8.onnx")
    assert "ONNX Runtime-only graph (variant int8" in int8.errors[0].problem
    assert any(f.op == "MatMulInteger" for f in int8.errors)
    assert "com.microsoft" in " ".join(f.op for f in lint_onnx(deploy_bundle("raf")[0] / "compose.cpu-opt.onnx").errors)


def run_cli(*argv):
    """``fine_infer.cli.main`` in-process."""
    from fine_infer import cli

    return cli.main(list(argv))


def test_lint_command_in_process(tmp_path, deploy_bundle, monkeypatch, capsys):
    out, _, _ = deploy_bundle("triplet")
    assert run_cli("lint", str(out)) == 0
    assert "image: image.onnx: passes the TensorRT 10.15 lint" in capsys.readouterr().out
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])
    bad = _save(_model([helper.make_node("Det", ["x"], ["y"], name="planted_det")], [x], [y]), tmp_path / "bad.onnx")
    assert run_cli("lint", str(bad), "--json") == 1
    report = json.loads(capsys.readouterr().out)["bad.onnx"]
    assert not report["passed"] and report["findings"][0]["node"] == "planted_det"
    assert run_cli("lint", str(tmp_path / "nothing.txt")) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line


def test_lint_command_as_a_real_process(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])
    bad = _save(_model([helper.make_node("Det", ["x"], ["y"], name="planted_det")], [x], [y]), tmp_path / "bad.onnx")
    r = subprocess.run([sys.executable, "-m", "fine_infer.cli", "lint", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "planted_det (Det)" in r.stdout
