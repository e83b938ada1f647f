"""The repository ``triton-repo`` writes, without a server: every config parses with Triton's own protobuf and says
what the served tests rely on (ensembles chaining the Python preprocessing, the graph and the index; ragged inputs,
CPU instances, parameters), the copied bundle is verified when a model loads, the CLI's flags and refusals, the
launcher's environment for the stub, and the KServe v2 request the bench sends."""

import json
import os
import struct

import numpy as np
import pytest
from google.protobuf import text_format
from triton_helpers import TEXTS

import fine_infer
from fine_infer import cli
from fine_infer.bundle import read_bundle
from fine_infer.errors import BackendUnavailableError, BundleError, ConfigError, InputError
from fine_infer.export.triton_repo import write_triton_repo
from fine_infer.serve import triton_model, triton_server

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="the Triton tests need tritonclient[grpc] (test extra)")


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def params(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


@pytest.fixture(scope="module")
def gallery(bundles, tmp_path_factory):
    session = fine_infer.load(bundles["fashion-fine"])
    index = fine_infer.Index(session.manifest.embed_dim)
    index.add(session.embed_texts(TEXTS), [7, 8, 9], [{"title": t} for t in TEXTS])
    path = tmp_path_factory.mktemp("gallery") / "gallery.fidx"
    index.save(path)
    return path


def test_python_backend_repository_chains_preprocessing_graph_and_index(bundles, gallery, tmp_path):
    repo = tmp_path / "repo"
    models = write_triton_repo(bundles["fashion-fine"], repo, backend="python", index=gallery, k=3, instances=2,
                               preprocess_instances=2, threads=1, prefix="ff")
    assert {n: m["kind"] for n, m in models.items()} == {
        "ff_image": "graph", "ff_text": "graph", "ff_preprocess": "preprocess", "ff_index": "index",
        "ff_image_raw": "ensemble", "ff_text_raw": "ensemble", "ff_image_search": "ensemble",
        "ff_text_search": "ensemble"}
    # nothing else (Triton loads every folder); the marker file is what --force may replace
    assert sorted(p.name for p in repo.iterdir()) == sorted([*models, "README.md", ".fine-infer-triton-repo"])
    cfgs = {n: parse(repo / n / "config.pbtxt") for n in models}
    for n, cfg in cfgs.items():
        assert cfg.name == n
        if cfg.backend == "python":
            assert (repo / n / "1" / "model.py").read_text().endswith(
                "from fine_infer.serve.triton_model import TritonPythonModel  # noqa: F401\n")
            assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] \
                == [(1 if n == "ff_index" else 2, "KIND_CPU")]
            assert cfg.dynamic_batching.max_queue_delay_microseconds == 100 and cfg.max_batch_size == 16
    pre = cfgs["ff_preprocess"]
    assert [(i.name, i.optional) for i in pre.input] == [("image", True), ("text", True)]
    assert [(o.name, list(o.dims)) for o in pre.output] == [("pixels", [3, 64, 64]), ("input_ids", [-1]),
                                                            ("attention_mask", [-1])]
    assert params(pre) == {"role": "preprocess", "bundle": "ff_preprocess/bundle", "backend": "onnxruntime"}
    text = cfgs["ff_text"]
    assert [(i.name, i.allow_ragged_batch) for i in text.input] == [("input_ids", True), ("attention_mask", True)]
    assert params(text) == {"role": "graph", "bundle": "ff_preprocess/bundle", "graph": "text", "threads": "1"}
    assert params(cfgs["ff_index"]) == {"role": "search", "index": "ff_index/index/gallery.fidx", "k": "3"}
    assert read_bundle(repo / "ff_preprocess" / "bundle").manifest.arch == "fashion-fine"  # the copy verifies
    assert (repo / "ff_index" / "index" / "gallery.fidx").read_bytes() == gallery.read_bytes()
    search = cfgs["ff_text_search"]
    assert cfgs["ff_text_raw"].platform == search.platform == "ensemble"
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), i.optional) for i in search.input] == [
        ("text", "TYPE_STRING", False), ("k", "TYPE_INT32", True)]
    steps = [(s.model_name, dict(s.input_map), dict(s.output_map)) for s in search.ensemble_scheduling.step]
    assert steps == [
        ("ff_preprocess", {"text": "text"}, {"input_ids": "input_ids", "attention_mask": "attention_mask"}),
        ("ff_text", {"input_ids": "input_ids", "attention_mask": "attention_mask"}, {"embedding": "embedding"}),
        ("ff_index", {"embedding": "embedding", "k": "k"}, {"ids": "ids", "scores": "scores", "metadata": "metadata"})]
    readme = (repo / "README.md").read_text()
    for what in ("ff_text_raw", "ff_image_search", "python -m fine_infer.serve.triton_server", "curl -s",
                 "ff_preprocess/bundle", "pip install --no-deps nvidia-pytriton"):
        assert what in readme, what


def test_default_repository_puts_onnxruntime_graphs_behind_the_ensembles(bundles, tmp_path):
    repo = tmp_path / "repo"
    models = write_triton_repo(bundles["maaf"], repo)
    assert {n: m["platform"] for n, m in models.items()} == {
        "maaf_compose": "onnxruntime_onnx", "maaf_gallery": "onnxruntime_onnx", "maaf_preprocess": "python",
        "maaf_compose_raw": "ensemble", "maaf_gallery_raw": "ensemble"}
    compose = parse(repo / "maaf_compose_raw" / "config.pbtxt")
    assert [i.name for i in compose.input] == ["image", "text"]
    assert [s.model_name for s in compose.ensemble_scheduling.step] == ["maaf_preprocess", "maaf_compose"]
    graph = parse(repo / "maaf_compose" / "config.pbtxt")  # ONNX Runtime batches equal shapes only: not ragged
    assert not any(i.allow_ragged_batch for i in graph.input) and (repo / "maaf_compose" / "1" / "model.onnx").is_file()
    only = write_triton_repo(bundles["maaf"], repo, tensors_only=True, force=True)
    assert {m["kind"] for m in only.values()} == {"graph"} and not (repo / "maaf_preprocess").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".repo.")] == []  # the old one is gone
    # --force replaces only what it wrote: a project folder with a README of its own is never deleted
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("# mine")
    (project / "src" / "main.py").write_text("precious")
    with pytest.raises(ConfigError, match="is not a Triton repository written by fine-infer"):
        write_triton_repo(bundles["maaf"], project, force=True)
    assert (project / "src" / "main.py").read_text() == "precious" and (project / "README.md").is_file()
    hf = write_triton_repo(bundles["clip"], tmp_path / "clip") if "clip" in bundles else {"clip_text_raw": 0}
    assert "clip_text_raw" in hf  # a Hugging Face bundle is named after its architecture (CLIPModel → clip)


def test_a_changed_byte_in_the_copied_bundle_keeps_the_models_from_loading(bundles, tmp_path):
    repo = tmp_path / "repo"
    write_triton_repo(bundles["triplet"], repo, backend="python")
    cfg = parse(repo / "triplet_image" / "config.pbtxt")
    model_dir, p = repo / "triplet_image", params(cfg)
    session = triton_model.open_session(model_dir, p)  # what initialize() does, without a stub
    runner = triton_model.GraphRunner(session, p["graph"])
    pixels = session.preprocess_images([np.zeros((8, 8, 3), np.uint8)])
    out = runner.run([{"pixels": pixels}, {"pixels": pixels[:0].astype(np.float64)}])
    np.testing.assert_array_equal(out[0]["embedding"], session.run("image", {"pixels": pixels})["embedding"])
    assert isinstance(out[1], InputError) and "float64" in str(out[1])  # a bad request fails alone
    victim = repo / "triplet_preprocess" / "bundle" / "image.onnx"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    tmp = victim.with_suffix(".tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, victim)  # a new file: the copy may share its inode with the bundle (a hard link)
    with pytest.raises(BundleError, match="image.onnx"):
        triton_model.open_session(model_dir, p)
    read_bundle(bundles["triplet"])  # the bundle itself is untouched
    with pytest.raises(BundleError, match="is missing"):
        triton_model.open_session(model_dir, {**p, "bundle": "nowhere/bundle"})


def test_triton_repo_command_flags_and_refusals(bundles, gallery, tmp_path, capsys):
    ff = str(bundles["fashion-fine"])
    out = tmp_path / "repo"
    assert cli.main(["triton-repo", ff, "--out", str(out), "--backend", "python", "--index", str(gallery), "--k", "4",
                     "--instances", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["fashion_fine_index"]["k"] == 4 and printed["fashion_fine_text"]["platform"] == "python"
    refusals = [
        (["--index", str(gallery), "--tensors-only"], "does not go with --tensors-only"),
        (["--backend", "tensorrt"], "has no TensorRT engine"),
        (["--backend", "tensorrt", "--no-engines"], "drop --no-engines"),
        (["--prefix", "bad name"], "prefix 'bad name'"),
        (["--index", str(tmp_path / "missing.fidx")], "missing.fidx"),
    ]
    for extra, message in refusals:
        assert cli.main(["triton-repo", ff, "--out", str(tmp_path / "other"), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    small = fine_infer.Index(4)
    small.add(np.eye(4, dtype=np.float32), [1, 2, 3, 4])
    small.save(tmp_path / "small.fidx")
    assert cli.main(["triton-repo", ff, "--out", str(tmp_path / "other"), "--index", str(tmp_path / "small.fidx")]) == 2
    assert "holds 4-dimensional vectors; the bundle's embeddings have 32" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_search_role_caps_k_at_the_index_and_checks_it():
    index = fine_infer.Index(4)
    index.add(np.eye(4, dtype=np.float32)[:2], [10, 11], [{"path": "/abs/a.jpg"}, None])
    search = triton_model.Search(index, default_k=10)
    assert search.k_of(None) == 10 and search.k_of(np.array([[3], [3]])) == 3
    for bad, message in ((np.array([[1], [2]]), "one k per request"), (np.array([[1001]]), "out of range")):
        with pytest.raises(InputError, match=message):
            search.k_of(bad)
    q = np.eye(4, dtype=np.float32)[:2]
    one, two = search([(q[:1], 10), (q, 1)])
    assert one["ids"].tolist() == [[10, 11]] and [json.loads(m) for m in one["metadata"][0]] == [{"path": "a.jpg"}, None]
    assert two["ids"].tolist() == [[10], [11]] and two["scores"].dtype == np.float32
    (empty,) = triton_model.Search(fine_infer.Index(4))([(q, 5)])  # no hits, rather than -1 ids and -inf scores
    assert empty["ids"].shape == empty["scores"].shape == empty["metadata"].shape == (2, 0)


def test_a_stub_that_scrambles_tensors_is_refused_with_the_fix():
    class Scrambling:
        class Tensor:
            def __init__(self, name, array):
                self.array = array

            def as_numpy(self):
                return np.repeat(self.array.reshape(-1)[:1], self.array.size).reshape(self.array.shape)

    with pytest.raises(ConfigError, match=r"numpy<2 in the server's Python"):
        triton_model.check_tensor_roundtrip(Scrambling)


def test_the_launcher_gives_the_stub_a_numpy_it_fits_or_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(triton_server, "stub_numpy_fits", lambda: (False, "<2.0.0,>=1.21"))
    monkeypatch.setattr(triton_server, "default_stub_packages", lambda: None)
    with pytest.raises(BackendUnavailableError, match=r'needs numpy<2.0.0,>=1.21.*pip install --no-deps --target '
                                                      r'.*triton-stub-packages "numpy<2"'):
        triton_server.server_env(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no numpy"):
        triton_server.server_env(tmp_path / "w1", empty)
    pkgs = tmp_path / "pkgs"
    (pkgs / "numpy").mkdir(parents=True)
    env = triton_server.server_env(tmp_path / "w2", pkgs)
    bin_dir = env["PATH"].split(os.pathsep)[0]
    assert bin_dir == str(tmp_path / "w2" / "stub-python" / "bin") and os.path.islink(os.path.join(bin_dir, "python3"))
    pth = next((tmp_path / "w2" / "stub-python" / "lib").rglob("*.pth")).read_text().splitlines()
    assert pth[0] == str(pkgs.resolve()) and all(line.startswith("import site; site.addsitedir(") for line in pth[1:])
    assert "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"] or not triton_server.importlib.util.find_spec("pytriton")


def test_kserve_request_is_the_binary_tensor_extension():
    from fine_infer.tools.bench import kserve_outputs, kserve_request

    body, headers = kserve_request({"text": ["héllo", b"\x00x"], "k": np.array([[3], [4]], np.int32)}, ["ids"])
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    assert [(i["name"], i["datatype"], i["shape"]) for i in head["inputs"]] == [("text", "BYTES", [2, 1]),
                                                                               ("k", "INT32", [2, 1])]
    text = "héllo".encode()
    assert body[n:] == struct.pack("<I", len(text)) + text + struct.pack("<I", 2) + b"\x00x" + \
        np.array([3, 4], np.int32).tobytes()
    try:
        from tritonclient.utils import serialize_byte_tensor
    except ImportError:
        pass
    else:  # the same bytes tritonclient sends
        blob = serialize_byte_tensor(np.array([[text], [b"\x00x"]], dtype=object)).item()
        assert body[n:n + head["inputs"][0]["parameters"]["binary_data_size"]] == blob
    got = kserve_outputs(json.dumps({"outputs": [
        {"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": [5, 6]},
        {"name": "metadata", "datatype": "BYTES", "shape": [1, 1], "data": ["{}"]}]}).encode())
    assert got["ids"].tolist() == [[5, 6]] and got["metadata"].tolist() == [[b"{}"]]


def test_bench_takes_one_server_url(capsys):
    assert cli.main(["bench", "--serve", "http://127.0.0.1:1", "--triton", "http://127.0.0.1:2"]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main(["bench", "--triton", "http://127.0.0.1:9", "--api-key-env", "X"]) == 2
    assert "--api-key-env goes with --serve" in capsys.readouterr().err


def test_the_triton_model_imports_without_the_serve_extra():
    """The server's Python needs fine-infer's runtime, not FastAPI: the Python-backend model and the launcher import
    with the serve extra's packages absent, and fine_infer.serve still hands out its names lazily."""
    import subprocess
    import sys

    code = ("import sys\nfor m in ('fastapi', 'starlette', 'uvicorn', 'pydantic', 'prometheus_client'):\n"
            "    sys.modules[m] = None\n"
            "import fine_infer.serve.triton_model, fine_infer.serve.triton_server, fine_infer.serve as s\n"
            "assert 'create_app' in dir(s) and 'Limits' in s.__all__\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn') and sys.modules[m]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
