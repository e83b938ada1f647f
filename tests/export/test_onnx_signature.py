"""Post-export clean-up of the ONNX signature: named dynamic dims and no value/output name clashes."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from fine_infer.export._onnx import normalise_signature
from fine_infer.specs import GraphSpec, TensorSpec


def test_intermediate_named_like_the_output_is_renamed(tmp_path, rng):
    # x -> Relu -> "embedding" (intermediate) -> Neg -> "embedding" (output): two writers of one name.
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["embedding"]), helper.make_node("Neg", ["embedding"], ["embedding"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [2, 3])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    spec = GraphSpec("g", "custom", (TensorSpec("x", "float32", ("batch", 3)),),
                     (TensorSpec("embedding", "float32", ("batch", 3)),))
    normalise_signature(path, spec)
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(path)
    assert [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3]
    x = rng.standard_normal((5, 3)).astype(np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y, -np.maximum(x, 0))
