"""`export --int8-static` on the tiny attention-fusion archs (maaf, raf) with their shipped weights: what
test_int8_static.py checks for the other archs (its tolerances and calibration sets), in a file of its own so that
neither file takes minutes."""

import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'fine-infer[openvino]'")
pytest.importorskip("nncf", reason="the openvino extra (nncf) is not installed: pip install 'fine-infer[openvino]'")

from test_int8_static import check_arch  # noqa: E402


@pytest.mark.parametrize("arch", ["maaf", "raf"])
def test_fusion_archs_export_gate_and_run_calibrated_int8(arch, tmp_path):
    check_arch(arch, tmp_path)
