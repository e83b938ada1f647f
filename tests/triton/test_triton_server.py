"""A real Triton Inference Server (``nvidia-pytriton``'s ``tritonserver``, on 127.0.0.1) loads the repository of every
zoo arch and of a Hugging Face CLIP bundle, written with ``backend="python"``; raw text, image bytes and both go in
over HTTP (KServe v2, binary data) and gRPC (tritonclient), and the answers equal ``fine_infer.load(bundle)``'s.
Bad inputs are answered with Triton's error and the server goes on; concurrent requests are batched (``/metrics``).

One server for the whole module, started once, stopped always; every wait is bounded. Skipped, naming the install
line, only where no server can run (``pip install --no-deps nvidia-pytriton``; with numpy 2 the stub also needs
``pip install --no-deps --target .venv/triton-stub-packages "numpy<2"``).
"""

import json
import re
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from triton_helpers import DEADLINE_S, TEXTS, ZOO_ARCHS, http_infer, images, server_or_skip

import fine_infer
from fine_infer.export.triton_repo import write_triton_repo

grpcclient = pytest.importorskip("tritonclient.grpc", reason="the Triton tests need tritonclient[grpc] (test extra)")

ATOL = 1e-5
NAMES = [*ZOO_ARCHS, "clip"]


class Served:
    def __init__(self, server, repos, models, sessions, index):
        self.server, self.repos, self.models, self.sessions, self.index = server, repos, models, sessions, index


@pytest.fixture(scope="module")
def served(bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-repos")
    sessions = {name: fine_infer.load(b) for name, b in bundles.items()}
    gallery = images() * 3  # an index of fashion-fine image embeddings, with metadata (absolute paths among it)
    index = fine_infer.Index(sessions["fashion-fine"].manifest.embed_dim)
    index.add(sessions["fashion-fine"].embed_images(gallery), np.arange(100, 100 + len(gallery)),
              [{"path": f"/srv/catalogue/item{i}.jpg", "title": f"item {i}"} for i in range(len(gallery))])
    index.save(root / "gallery.fidx")
    repos, models = {}, {}
    for name, bundle in bundles.items():
        repos[name] = root / name
        models[name] = write_triton_repo(bundle, repos[name], backend="python",
                                         index=root / "gallery.fidx" if name == "fashion-fine" else None, k=5)
    server = server_or_skip(list(repos.values()))
    try:
        server.wait_ready(timeout=300)
        yield Served(server, repos, models, sessions, index)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def grpc(served):
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    yield client
    client.close()


def _bytes_input(name, items):
    a = np.array([[x if isinstance(x, bytes) else x.encode()] for x in items], dtype=object)
    t = grpcclient.InferInput(name, list(a.shape), "BYTES")
    t.set_data_from_numpy(a)
    return t


def grpc_infer(client, model, inputs, outputs):
    res = client.infer(model, [_bytes_input(k, v) for k, v in inputs.items()], client_timeout=DEADLINE_S)
    return {o: res.as_numpy(o) for o in outputs}


def runtime_case(session, info):
    """Raw inputs for an ensemble of ``info["task"]`` and what ``fine_infer.load(bundle)`` answers for them."""
    graph = session.manifest.graphs[info["graph"]].spec
    imgs, texts = images(), list(TEXTS)
    if info["task"] == "embed_text":
        return {"text": texts}, {graph.outputs[0].name: session.embed_texts(texts)}
    if info["task"] == "embed_image":
        return {"image": imgs}, {graph.outputs[0].name: session.embed_images(imgs)}
    if info["task"] == "compose":
        return {"image": imgs, "text": texts}, {graph.outputs[0].name: session.compose(imgs, texts)}
    assert info["task"] == "classify"
    return {"image": imgs}, session.run(graph.name, {"pixels": session.preprocess_images(imgs)})


@pytest.mark.parametrize("name", NAMES)
def test_raw_inputs_answer_like_the_runtime_over_http_and_grpc(served, grpc, name):
    if name not in served.repos:
        pytest.skip("the Hugging Face bundle needs transformers (the hf extra)")
    session, models = served.sessions[name], served.models[name]
    ensembles = {n: i for n, i in models.items() if i["kind"] == "ensemble" and i["task"] != "search"}
    assert sorted(i["graph"] for i in ensembles.values()) == sorted(session.manifest.graphs)  # every graph
    for model, info in ensembles.items():
        inputs, want = runtime_case(session, info)
        status, got = http_infer(served.server.http_url, model, inputs)
        assert status == 200, got
        by_grpc = grpc_infer(grpc, model, inputs, list(want))
        for out, ref in want.items():
            for how, answer in (("HTTP", got[out]), ("gRPC", by_grpc[out])):
                assert answer.shape == ref.shape and answer.dtype == np.float32, (model, how, out)
                np.testing.assert_allclose(answer, ref, rtol=0, atol=ATOL, err_msg=f"{model} {out} over {how}")


def test_the_graph_models_take_tensors_too(served, grpc):
    session = served.sessions["fashion-fine"]
    ids, mask = session.tokenize(TEXTS)
    inputs = []
    for n, a in (("input_ids", ids), ("attention_mask", mask)):
        t = grpcclient.InferInput(n, list(a.shape), "INT64")
        t.set_data_from_numpy(a)
        inputs.append(t)
    got = grpc.infer("fashion_fine_text", inputs, client_timeout=DEADLINE_S).as_numpy("embedding")
    np.testing.assert_allclose(got, session.embed_texts(TEXTS), rtol=0, atol=ATOL)


def test_search_ensemble_answers_the_index_top_k_with_public_metadata(served, grpc):
    session, index = served.sessions["fashion-fine"], served.index
    q = session.embed_texts(TEXTS)
    for k, want_k in ((None, 5), (3, 3)):  # k from the repository (triton-repo --k 5), or sent by the client
        inputs = {"text": TEXTS} if k is None else {"text": TEXTS, "k": np.full((len(TEXTS), 1), k, np.int32)}
        status, got = http_infer(served.server.http_url, "fashion_fine_text_search", inputs)
        assert status == 200, got
        scores, ids = index.search(q, want_k)
        np.testing.assert_array_equal(got["ids"], ids)
        np.testing.assert_allclose(got["scores"], scores, rtol=0, atol=ATOL)
        meta = [[json.loads(m) for m in row] for row in got["metadata"]]
        assert meta[0][0] == {"path": f"item{ids[0, 0] - 100}.jpg", "title": f"item {ids[0, 0] - 100}"}
    by_grpc = grpc_infer(grpc, "fashion_fine_image_search", {"image": images()[:1]}, ["ids"])
    np.testing.assert_array_equal(by_grpc["ids"], index.search(session.embed_images(images()[:1]), 5)[1])


def test_bad_inputs_get_triton_errors_and_the_server_goes_on(served):
    url = served.server.http_url
    jpeg = images()[1]
    cases = [
        ("fashion_fine_image_raw", {"image": [b"not an image"]}, "not a readable image"),
        ("fashion_fine_image_raw", {"image": [jpeg[: len(jpeg) // 2]]}, "corrupt or truncated"),
        ("fashion_fine_image_raw", {"image": [b""]}, "empty"),
        ("fashion_fine_text_raw", {"text": ["   "]}, "text 0 is empty"),
        ("fashion_fine_text_raw", {"text": [b"\xff\xfe bad utf-8"]}, "not UTF-8"),
        ("fashion_fine_text_raw", {"text": np.array([[1], [2]], np.int32)}, "expects 'BYTES'"),  # Triton's own check
        ("fashion_fine_text_raw", {"image": images()[:1]}, "text"),  # the wrong input for this model
        ("maaf_compose_raw", {"image": images()[:1]}, "text"),  # a required input missing
        ("fashion_fine_text_search", {"text": TEXTS[:1], "k": np.array([[0]], np.int32)}, "k = 0 is out of range"),
    ]
    for model, inputs, message in cases:
        status, err = http_infer(url, model, inputs)
        assert status == 400 and message in err, (model, status, err)
    # the batch-mates of a bad request are answered: one bad text among good ones, sent together
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: http_infer(url, "fashion_fine_text_raw", {"text": [t]}),
                                ["red dress", " ", "blue coat", "striped shirt"] * 4, timeout=DEADLINE_S))
    assert [s for s, _ in results] == [200, 400, 200, 200] * 4
    assert served.server.proc.poll() is None
    with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=10) as r:
        assert r.status == 200


def _metrics(served) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(served.server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for name, model, value in re.findall(r'^(nv_inference_(?:exec_)?count)\{model="([^"]+)",version="1"\} (\S+)$',
                                         text, re.M):
        out[(name, model)] = float(value)
    return out


def test_concurrent_requests_are_batched_and_padded_answers_equal_the_runtime(served):
    """32 clients send composed queries whose texts differ in length (RAF pads to the longest): Triton's dynamic
    batcher hands the Python graph model ragged batches, which it pads as the runtime's batcher does; every answer
    still equals the runtime's for that query alone, and /metrics shows fewer model executions than inferences."""
    session, url = served.sessions["raf"], served.server.http_url
    img = images()[0]
    texts = [" ".join(["red"] + ["striped dress with long sleeves"] * (i % 4)) for i in range(32)]
    want = {t: session.compose([img], [t]) for t in set(texts)}
    before = _metrics(served)
    barrier = threading.Barrier(32, timeout=DEADLINE_S)

    def client(text):
        barrier.wait()
        return text, [http_infer(url, "raf_compose_raw", {"image": [img], "text": [text]}) for _ in range(3)]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(client, texts, timeout=DEADLINE_S * 3))
    for text, answers in results:
        for status, got in answers:
            assert status == 200, got
            np.testing.assert_allclose(got["embedding"], want[text], rtol=0, atol=ATOL)
    after = _metrics(served)
    for model in ("raf_compose", "raf_preprocess", "raf_compose_raw"):
        assert after[("nv_inference_count", model)] - before.get(("nv_inference_count", model), 0) == 96
    for model in ("raf_compose", "raf_preprocess"):  # the steps that batch (an ensemble itself has no executions)
        execs = after[("nv_inference_exec_count", model)] - before.get(("nv_inference_exec_count", model), 0)
        assert execs < 96, (model, execs)
