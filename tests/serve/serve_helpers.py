"""Helpers shared by the serve tests: bundles, images, a bounded pool of HTTP clients."""

import base64
import io
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from fine_infer.batching import BatchSettings

DEADLINE_S = 60.0  # every client call and every concurrent section is bounded by this
# The test servers' batching: calibrated, on a short budget; a longer delay than the default so that concurrent test
# clients do meet in batches.
TEST_BATCHING = BatchSettings(max_delay_ms=5, calibration_budget_s=2.0)
UNBATCHED = BatchSettings(max_batch_size=1)  # every request runs alone, in the caller's thread


def export_zoo(arch, out):
    """The arch's tiny bundle; skips the test when the arch is not in the zoo (yet)."""


    try:
        from fine_infer.export import export_arch

        export_arch(arch, out, "tiny", force=True)
    except ImportError:  # the registry imports every zoo family; build this one directly while another is missing
        import torch

        from fine_infer.export import export_model
        from fine_infer.models import _registry

        entry = _registry.get_arch(arch)
        torch.manual_seed(0)
        export_model(entry.model_cls(entry.presets["tiny"]()).eval(), out, preset="tiny", force=True)
    return out


def export_maaf(out):
    """The tiny MAAF bundle (compose + gallery graphs): images, texts with padding, composed queries."""
    return export_zoo("maaf", out)


def png(seed=0, size=(72, 56)):
    """A random RGB PNG of ``size`` (w, h)."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def b64(data):
    return base64.b64encode(data).decode()


def huge_png_header(width=10_000, height=10_000):
    """A small file whose PNG header claims ``width``×``height`` pixels (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def run_concurrently(fn, items, workers=16):
    """``fn`` over ``items`` from ``workers`` threads; results in order (bounded by DEADLINE_S)."""
    with ThreadPoolExecutor(workers) as ex:
        futs = [ex.submit(fn, x) for x in items]
        return [f.result(timeout=DEADLINE_S) for f in futs]


def free_port():
    """A loopback port free now (for a server started as a process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, proc, timeout=DEADLINE_S):
    """Poll ``url``/readyz until 200 while ``proc`` (the server process) lives, bounded by ``timeout``."""
    from fine_infer.serve import wait_ready as wait

    wait(url, timeout, died=lambda: None if proc.poll() is None else proc.stderr.read().decode())
