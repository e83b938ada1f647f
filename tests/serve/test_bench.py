"""`fine-infer bench`: the table, JSON, plot, --compare exit codes, skipped backends, and --serve load tests."""

import json

import pytest

from fine_infer.tools import bench
from fine_infer.cli import main


@pytest.fixture(scope="module")
def result_file(maaf_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", str(maaf_bundle), "--quick", "--backend", "onnxruntime", "tensorrt", "--batch-sizes", "1",
               "2", "--json", str(out / "new.json"), "--plot", str(out / "new.png"), "--no-progress"])
    assert rc == 0
    return out


def test_bench_writes_rows_machine_and_plot(result_file, capsys):
    res = bench.load_json(result_file / "new.json")
    rows = res["rows"]
    assert {(r["graph"], r["backend"], r["batch"]) for r in rows} == {
        (g, "onnxruntime", b) for g in ("compose", "gallery") for b in (1, 2)}
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["items_per_s"] > 0 and r["runs"] >= 5
    assert any(s["backend"] == "tensorrt" and s["reason"] for s in res["skipped"])
    m = res["machine"]
    assert m["cpu"] and m["cpu_count"] and "onnxruntime" in m["versions"]
    assert (result_file / "new.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_passes_on_itself_and_fails_on_a_regression(result_file, capsys):
    new = result_file / "new.json"
    assert main(["bench", "--compare", str(new), "--serve", "http://127.0.0.1:9"]) == 2  # unreachable: a clean error
    lines, regressions = bench.compare(bench.load_json(new), bench.load_json(new))
    assert not regressions and any("1.00×" in x for x in lines)
    faster = json.loads(new.read_text())
    for r in faster["rows"]:
        r["p50_ms"] /= 2  # the old run was twice as fast: every row regressed
    (result_file / "old.json").write_text(json.dumps(faster))
    lines, regressions = bench.compare(bench.load_json(new), faster, max_regression=0.1)
    assert len(regressions) == len(faster["rows"]) and any("REGRESSION" in x for x in lines)
    (result_file / "bad.json").write_text("{}")
    assert main(["bench", "x", "--compare", str(result_file / "bad.json")]) == 2
    assert "not a fine-infer bench result" in capsys.readouterr().err


def test_compare_exit_code_from_the_cli(maaf_bundle, result_file, capsys):
    old = json.loads((result_file / "new.json").read_text())
    for r in old["rows"]:
        r["p50_ms"] /= 100
    (result_file / "much_faster.json").write_text(json.dumps(old))
    rc = main(["bench", str(maaf_bundle), "--quick", "--backend", "onnxruntime", "--batch-sizes", "1",
               "--graphs", "gallery", "--compare", str(result_file / "much_faster.json"), "--no-progress"])
    assert rc == 1 and "REGRESSION" in capsys.readouterr().out


def test_load_test_a_running_server(server, tmp_path):
    res = bench.bench_server(server.url, concurrency=(1, 4), requests=24, max_time_s=10, progress=False)
    assert {r["graph"] for r in res["rows"]} == {"compose", "embed_image"}
    for r in res["rows"]:
        assert r["errors"] == 0 and r["runs"] > 0 and r["items_per_s"] > 0
    print(bench.format_table(res))
    bench.plot(res, tmp_path / "serve.png")


def test_interleaved_rounds_time_each_function_in_every_round():
    import time

    from fine_infer.tools import demo

    assert demo.interleaved_ms is bench.interleaved_ms  # the demo's latency table uses the bench timer
    order = []
    t = bench.interleaved_ms({"slow": lambda: (order.append("slow"), time.sleep(0.004)),
                              "fast": lambda: order.append("fast")}, rounds=3, repeats=2, warmup=1)
    assert len(t["slow"]) == len(t["fast"]) == 3
    # rounds alternate the functions: warm-ups, then per round both functions, each `repeats` times
    assert order == ["slow", "fast"] + ["slow", "slow", "fast", "fast"] * 3
    assert min(t["slow"]) >= 4.0 > max(t["fast"])


def test_compare_catches_a_planted_slowdown(tmp_path, capsys):
    """Two real bundles whose graph has the same name and inputs, the second planted with 8x the work: benching it
    against the first one's JSON exits 1 and names the regression; the first against itself passes."""
    torch = pytest.importorskip("torch")
    from fine_infer.export import export_module

    class MLP(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.GELU(), torch.nn.Linear(width, 64))

        def forward(self, x):
            return self.net(x)

    def mlp(width):
        torch.manual_seed(0)
        return MLP(width).eval()

    example = {"x": torch.randn(2, 64)}
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    export_module(mlp(256), example, fast, batch_sizes=(2,))
    export_module(mlp(256 * 32), example, slow, batch_sizes=(2,))  # the planted slowdown: ~32x the FLOPs
    args = ["--quick", "--backend", "onnxruntime", "--batch-sizes", "8", "--no-progress"]
    assert main(["bench", str(fast), *args, "--json", str(tmp_path / "fast.json")]) == 0
    assert main(["bench", str(fast), *args, "--compare", str(tmp_path / "fast.json"), "--max-regression", "2.0"]) == 0
    capsys.readouterr()
    assert main(["bench", str(slow), *args, "--compare", str(tmp_path / "fast.json")]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "model" in out
