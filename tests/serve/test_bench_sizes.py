"""`fine-infer serve --bench-json FILE`: each graph's batch size picked from a bench result's rows for the session's
backend, recorded as coming from that file (``/v1/info``); a file that is not a bench result fails before loading."""

import json

from fine_infer.batching import BatchSettings
from fine_infer.cli import main
from fine_infer.cli.serve import with_bench_sizes
from fine_infer.serve import create_app


def _result(graph, backend):
    rows = [(graph, backend, 1, 0.23), (graph, backend, 8, 0.11), (graph, "torch", 1, 0.01),
            ("not-in-this-bundle", backend, 8, 0.01)]
    return {"kind": "fine-infer-bench", "rows": [{"mode": "runtime", "graph": g, "backend": b, "batch": n,
                                                  "ms_per_item": ms} for g, b, n, ms in rows]}


def test_bench_sizes_are_fixed_sizes_recorded_with_their_file(maaf_session):
    graphs = list(maaf_session.manifest.graphs)
    picked, rest = graphs[0], graphs[1:]
    result = _result(picked, maaf_session.backend)
    settings = with_bench_sizes(BatchSettings(), result, maaf_session, "bench:r.json")
    assert dict(settings.max_batch_size) == {picked: 8} and settings.search_batch_limit == 64
    info = create_app(maaf_session, batching=settings, prepare="skip").state.serve.info()["graphs"]
    assert info[picked]["max_batch_size"] == 8 and info[picked]["calibration"]["source"] == "bench:r.json"
    assert all(info[g]["max_batch_size"] is None for g in rest)  # no rows for them: calibrated at start-up
    # With --max-batch-size too, the graphs the result has no rows for keep it; 1 keeps search batching off.
    fixed = with_bench_sizes(BatchSettings(max_batch_size=1), result, maaf_session, "bench:r.json")
    assert dict(fixed.max_batch_size) == {picked: 8, **{g: 1 for g in rest}} and fixed.search_batch_limit == 1


def test_a_file_that_is_not_a_bench_result_fails_before_loading(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    assert main(["serve", str(tmp_path / "no-such-bundle"), "--bench-json", str(bad)]) == 2
    assert "not a fine-infer bench result" in capsys.readouterr().err
