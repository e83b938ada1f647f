"""The tune decision rule (:func:`fine_infer.runtime.choice.decide`) on constructed per-round speedups: a clear win, a
tie (the previous choice kept, else the most precise), a margin inside the noise (ONNX Runtime fp32), an ineligible
path passed over. No timing: the numbers are made up, so the verdicts are exact."""

from fine_infer.runtime.choice import MIN_SPEEDUP, clearly_faster, decide, margin, quantile

BASE = [1.0] * 7


def _ranked(**paths):
    out = {"onnxruntime": {"rounds": BASE, "gate_min_cosine": 1.0}}
    for label, (rounds, cos) in paths.items():
        out[label.replace("__", "/").replace("_", "-")] = {"rounds": rounds, "gate_min_cosine": cos}
    return out


def ok(path):
    return ""


def test_quantile_and_margin():
    assert quantile([1, 2, 3, 4, 5], 0.25) == 2 and quantile([1, 2], 0.5) == 1.5
    med, low = margin([2.0, 2.0, 1.0], [1.0, 1.0, 1.0])
    assert med == 2.0 and low == 1.5
    assert clearly_faster([1.2] * 5, [1.0] * 5) and not clearly_faster([1.04] * 5, [1.0] * 5)


def test_a_clear_win_is_picked():
    ranked = _ranked(onnxruntime__int8=([1.9, 2.0, 2.1, 2.0, 1.95, 2.05, 2.0], 0.999),
                     openvino__int8=([3.0, 3.1, 2.9, 3.05, 3.0, 2.95, 3.1], 0.996))
    c = decide(ranked, ok)
    assert (c.label, c.verdict) == ("openvino/int8", "clear") and c.speedup == 3.0
    assert "runner-up onnxruntime/int8" in c.reason


def test_a_tie_keeps_the_previous_choice_else_takes_the_most_precise():
    a = [2.0, 2.1, 1.9, 2.0, 2.05, 1.95, 2.0]
    b = [2.02, 2.0, 1.95, 2.06, 1.98, 2.0, 1.97]  # within 5 % of a, round by round: a tie
    ranked = _ranked(onnxruntime__int8=(a, 0.999), openvino__int8=(b, 0.996))
    c = decide(ranked, ok)
    assert c.verdict == "tie" and c.label == "onnxruntime/int8" and "most precise" in c.reason
    c = decide(ranked, ok, previous="openvino/int8")
    assert c.verdict == "tie" and c.label == "openvino/int8" and "kept the previous choice" in c.reason


def test_a_margin_inside_the_noise_is_onnxruntime_fp32():
    # median 1.3× but the box was loaded: three rounds of seven the path lost
    noisy = [1.3, 0.8, 1.6, 0.7, 1.4, 0.9, 1.5]
    c = decide(_ranked(openvino__int8=(noisy, 0.996)), ok)
    assert (c.label, c.verdict, c.speedup) == ("onnxruntime", "noise", 1.0)
    assert "inside the noise" in c.reason and f"{MIN_SPEEDUP:g}" in c.reason
    small = [1.03] * 7  # steady but under MIN_SPEEDUP
    assert decide(_ranked(openvino=(small, 1.0)), ok).verdict == "noise"


def test_an_ineligible_path_is_passed_over_and_no_baseline_is_fp32():
    ranked = _ranked(openvino__int8=([3.0] * 7, 0.996), onnxruntime__int8=([2.0] * 7, 0.999))

    def no_openvino(path):
        return "gate failed: min cosine 0.9" if path.backend == "openvino" else ""

    c = decide(ranked, no_openvino)
    assert c.label == "onnxruntime/int8" and "passed over: openvino/int8 (3.00×) gate failed" in c.reason
    assert decide({"openvino": {"rounds": [2.0] * 3}}, ok).verdict == "baseline"
    slower = decide(_ranked(openvino=([0.5] * 7, 1.0)), ok)
    assert (slower.label, slower.verdict) == ("onnxruntime", "baseline")
