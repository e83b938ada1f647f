"""Helpers of the Triton tests (a unique module name, not conftest): bundles, sample images, a KServe v2 HTTP call."""

from __future__ import annotations

import http.client
import io
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ZOO_ARCHS = ("attributes", "fashion-fine", "maaf", "raf", "triplet")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TEXTS = ["a red striped dress", "blue shirt with long sleeves and a round collar", "navy coat"]
DEADLINE_S = 60.0


def export_bundles(root: Path) -> dict[str, Path]:
    """The zoo archs' tiny bundles with their shipped weights, plus ``clip`` (a 2-layer Hugging Face CLIPModel)
    when transformers is installed. The legacy exporter: seconds instead of a minute for the five archs; what the
    repository serves is whatever graph the bundle holds, and the dynamo exporter has its own tests."""
    from fine_infer.export import export_arch

    out = {}
    for arch in ZOO_ARCHS:
        export_arch(arch, root / arch, "tiny", pretrained=True, exporter="legacy", force=True)
        out[arch] = root / arch
    try:
        import transformers  # noqa: F401
    except ImportError:
        return out
    sys.path.insert(0, str(FIXTURES))
    from hf_models import build_clip

    from fine_infer.export import export_hf

    export_hf(build_clip(root / "clip-src"), root / "clip", texts=4, images=2, exporter="legacy", force=True)
    out["clip"] = root / "clip"
    return out


def images() -> list[bytes]:
    """Three encoded images of different sizes and formats: a PNG, a JPEG and an RGBA PNG (alpha handling)."""
    rng = np.random.default_rng(0)
    out = []
    for size, fmt, mode in (((96, 64), "PNG", "RGB"), ((50, 80), "JPEG", "RGB"), ((64, 64), "PNG", "RGBA")):
        arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, mode).save(buf, fmt)
        out.append(buf.getvalue())
    return out


def http_infer(url: str, model: str, inputs: dict, outputs=()) -> tuple[int, dict | str]:
    """``POST /v2/models/MODEL/infer`` with binary inputs: (status, outputs as arrays) or (status, error text)."""
    from fine_infer.tools.bench.load import kserve_outputs, kserve_request

    body, headers = kserve_request(inputs, outputs)
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=DEADLINE_S)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        import json

        return resp.status, json.loads(raw).get("error", raw.decode(errors="replace"))
    return resp.status, kserve_outputs(raw)


def server_or_skip(repositories, **kw):
    """A started :class:`TritonServer`, or a skip naming why no server can run here (no nvidia-pytriton, no stub
    for this Python, no numpy the stub fits: each message names the install line)."""
    from fine_infer.errors import BackendUnavailableError
    from fine_infer.serve.triton_server import TritonServer

    server = TritonServer(repositories, **kw)
    try:
        return server.start()
    except BackendUnavailableError as exc:
        server.stop()
        pytest.skip(f"no Triton Inference Server here: {exc}")
