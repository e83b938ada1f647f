"""The reference inputs and fp32 PyTorch outputs every export records (`references.npz`): within a byte budget (big
image towers record fewer rows), read back exactly, and a file that does not hold what the manifest lists is a
BundleError."""

import numpy as np
import pytest
import torch

from fine_infer.bundle import Manifest
from fine_infer.bundle.manifest import GraphEntry
from fine_infer.errors import BundleError
from fine_infer.export.gates import GraphJob, read_references, reference_batches, write_references
from fine_infer.specs import GraphSpec, TensorSpec


def _job(side: int) -> GraphJob:
    spec = GraphSpec("image", "embed_image", (TensorSpec("pixels", "float32", ("batch", 3, side, side)),),
                     (TensorSpec("embedding", "float32", ("batch", 6)),))
    proj = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 6)).eval()
    return GraphJob(spec, proj, lambda b, L, g: {"pixels": torch.randn(b, 3, side, side, generator=g)})


def test_big_inputs_record_fewer_rows_within_the_budget():
    assert reference_batches(_job(32), 4 << 20) == (1, 3, 8)  # 12 KB a row
    assert reference_batches(_job(224), 4 << 20) == (1, 2)  # 0.6 MB a row
    assert reference_batches(_job(384), 4 << 20) == (1,)  # 1.8 MB a row
    assert reference_batches(_job(384), 1 << 20) == (1,)  # one row, whatever the budget


def test_references_read_back_exactly_and_a_damaged_file_is_a_bundle_error(tmp_path):
    job = _job(16)
    block = write_references(tmp_path / "references.npz", [job], seed=3)
    assert block["graphs"]["image"]["batches"] == [1, 3, 8] and block["seed"] == 3
    unlisted = Manifest(graphs={"image": GraphEntry(job.spec, "image.onnx")}, files={},
                        validation={"references": block})
    with pytest.raises(BundleError, match="not among the bundle's checksummed files"):
        read_references(tmp_path, unlisted)  # only a checksummed file is compared against
    manifest = Manifest(graphs=unlisted.graphs, files={"references.npz": "(read_bundle checks the digest)"},
                        validation={"references": block})
    (got_job, samples), = read_references(tmp_path, manifest).values()
    assert got_job.module is None and [s.batch for s in samples] == [1, 3, 8]
    for s in samples:
        with torch.no_grad():
            want = job.module(torch.from_numpy(s.feeds["pixels"])).numpy()
        np.testing.assert_array_equal(s.references[0], want)
    np.savez(tmp_path / "references.npz", other=np.zeros(2))
    with pytest.raises(BundleError, match="does not hold the references"):
        read_references(tmp_path, manifest)
    assert read_references(tmp_path, Manifest(graphs=manifest.graphs, files={})) == {}  # exported before references
