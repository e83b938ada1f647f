"""``fine-infer export --hf DIR``: a local Hugging Face folder to a bundle, gated against the source library itself.

Supported (:data:`SUPPORTED`): sentence-transformers folders (``modules.json``: a BERT-family Transformer, Pooling —
mean, CLS or max —, optional Dense and Normalize; a model without Normalize is L2-normalised anyway, since fine-infer
scores by dot product, and the manifest says so), transformers ``CLIPModel`` and ``SiglipModel`` folders (text and
image towers with their projections, as ``get_text_features`` / ``get_image_features``, L2-normalised). The folder is
read where it is; the hub is never contacted.

The bundle carries the model's own ``tokenizer.json`` (its normaliser, pre-tokeniser, vocabulary and special-token
template) at the SOURCE's length: sentence-transformers' ``max_seq_length`` (not the 128 its tokenizer.json may
truncate at), CLIP's and SigLIP's position count (SigLIP padded to it, as it was trained); image preprocessing is read
from the processor config (size, shortest-edge or exact resize, crop, resample, rescale, mean/std, RGB on white).
Graphs: ``text`` (task ``embed_text``) and, for CLIP/SigLIP, ``image`` (``embed_image``), both output ``embedding``.

Gates: the usual checker and ONNX-vs-PyTorch parity (on real texts and random images through the bundle's own
preprocessing), then :class:`~fine_infer.export.hf._gate.SourceParity` on the sealed bundle: sentence-transformers
``encode`` / transformers ``get_*_features`` against the bundle's graphs fed by its own tokenizer and preprocessing,
on fresh seeded texts (short, long, past the limit, unicode, punctuation) and images (varied size, aspect, grey,
RGBA). The manifest's ``config.hf`` records what was done (pooling, normalisation, lengths, mask use).
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fine_infer.export.hf._folder import SUPPORTED, inspect_folder

__all__ = ["SUPPORTED", "export_hf", "inspect_folder"]


@contextmanager
def _quiet() -> Iterator[None]:
    """The source libraries' own chatter (config notes, fallbacks, progress bars, deprecations) off while they load
    and run, so that an export prints its report, or its failure in one line."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        hf_logging = None
    level = hf_logging.get_verbosity() if hf_logging else None
    bars = hf_logging.is_progress_bar_enabled() if hf_logging else False
    if hf_logging:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if hf_logging:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()


def export_hf(folder: str | Path, out: str | Path, *, texts: int = 24, images: int = 8,
              source_seed: int | None = None, **kwargs: Any):
    """Export the Hugging Face folder ``folder`` to a bundle at ``out``; ``texts``/``images`` size the source-parity
    gate (``source_seed`` fixes its draws; default fresh, recorded); ``kwargs`` are
    :func:`~fine_infer.export.export_module`'s export options (opset, exporter, atol, batch_sizes, force, gates,
    variants, lint, drop_failed_variants, references). Returns the :class:`~fine_infer.export.ExportReport`."""
    from fine_infer.export._bundle_export import _export_jobs
    from fine_infer.export.gates import default_tolerance
    from fine_infer.export.hf._gate import SourceParity
    from fine_infer.export.hf._models import load_source

    t0 = time.perf_counter()
    info = inspect_folder(folder)
    with _quiet():
        src = load_source(info)
        check = SourceParity(src.label, src.embed_text, src.embed_image, default_tolerance(kwargs.get("atol")),
                             texts=texts, images=images, seed=source_seed)
        return _export_jobs(src.jobs, out, source=f"hf:{info.path}", text=src.text, image=src.image,
                            tokenizer=src.tokenizer, config={"hf": src.config}, versions=src.versions,
                            checks=[check] if kwargs.get("gates", True) else [], started=t0, **kwargs)
