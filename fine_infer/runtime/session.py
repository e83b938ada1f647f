"""A loaded bundle: preprocessing, tokenisation and one runner per graph behind ``embed_*``/``compose``/``classify``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fine_infer.bundle import Bundle, read_bundle
from fine_infer.errors import BackendUnavailableError, BundleError, ConfigError, InputError
from fine_infer.preprocess import ImageInput, preprocess_images
from fine_infer.runtime.base import Runner
from fine_infer.runtime.buckets import plan_buckets, sequence_lengths
from fine_infer.runtime.choice import Choice, auto_choice
from fine_infer.runtime.factory import make_runner
from fine_infer.runtime.paths import BACKENDS, ExecPath
MAX_BATCH = 1024  # bound one call's work; larger inputs should be chunked by the caller


class Session:
    """Runs a bundle. Create with :func:`fine_infer.load`.

    Every method takes a batch and returns float32 numpy arrays; embeddings are L2-normalised rows.
    Runners are created on first use of their graph and are safe to call from several threads.
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: str = "auto",
        providers: Sequence[str] | None = None,
        device: str = "cpu",
        kernels: bool = False,
        threads: int | None = None,
        variant: str | None = None,
        hint: str | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self._providers = providers
        self._device = device
        self._kernels = kernels
        self._threads = threads
        self._hint = hint
        #: the longest text (characters) tokenize() takes (None: the default for the model's token limit,
        #: :func:`fine_infer.tokenization.default_max_chars`); a server sets it from its limits
        self.max_text_chars: int | None = None
        self._runners: dict[str, Runner] = {}
        self._lane_runners: dict[tuple[str, int], Runner] = {}  # (graph, intra-op threads): the batcher's lanes
        self._lock = threading.Lock()
        self._tokenizer = None
        self._model = None
        #: what ``backend="auto"`` picked and why; None for an explicit backend
        self.choice: Choice | None = None
        if backend == "auto":
            self.choice = self._auto(variant)
            backend, variant = self.choice.backend, self.choice.variant
        self.backend = backend
        self.variant = variant or "fp32"
        if hint is not None and self.backend != "openvino" and self.choice is None:  # auto: if OpenVINO is picked
            raise ConfigError(f"hint={hint!r} is an OpenVINO performance hint; load with backend='openvino'")
        if self.backend == "torch" and self.variant != "fp32":
            raise ConfigError(f"the torch backend runs the fp32 model; variant {self.variant!r} needs backend "
                              "'onnxruntime' (or 'tensorrt' for fp16, 'openvino' for bf16)")
        if self.backend == "openvino":  # fail at load: unknown precision or hint, no bf16 on this CPU
            from fine_infer.runtime.openvino_runner import HINTS, precision_unsupported, variant_precision

            if hint is not None and hint not in HINTS:
                raise ConfigError(f"unknown OpenVINO performance hint {hint!r}; choose one of {', '.join(HINTS)}")
            why = precision_unsupported(variant_precision(self.variant))
            if why:
                raise BackendUnavailableError(why)
            from fine_infer.runtime.paths import bundle_variant

            key = bundle_variant(ExecPath("openvino", self.variant))
            if key is not None:  # a model file of its own (the int8 IR)
                self._require_variant(key, "openvino")
        elif self.backend != "torch":
            try:
                self._require_variant(variant, self.backend)
            except BundleError as exc:
                if variant == "bf16":
                    raise BundleError(f"{exc}; bf16 is OpenVINO's inference precision: load with "
                                      "backend='openvino'") from None
                raise

    def _require_variant(self, variant: str | None, backend: str) -> None:
        """Every graph has ``variant``'s file: said at load, not at the first request of the graph that lacks it."""
        from fine_infer.bundle.variants import variant_file

        for entry in self.manifest.graphs.values():
            variant_file(entry, variant, backend)

    def _auto(self, variant: str | None) -> Choice:
        """``backend="auto"``: ONNX Runtime where CUDA really runs it (or where a variant, providers or a CUDA device
        was asked for); on a CPU box the fastest gated CPU path of the bundle's tune result."""
        if variant is not None:  # a variant written at export runs on ONNX Runtime
            return Choice("onnxruntime", variant, f"variant {variant!r} was asked for: ONNX Runtime")
        if self._providers is not None or self._device.startswith("cuda"):
            return Choice("onnxruntime", "fp32", "providers or a CUDA device were asked for: ONNX Runtime")
        choice = auto_choice(self.bundle)
        if choice.label != "onnxruntime" and self._cuda_runs():
            return Choice("onnxruntime", "fp32", "ONNX Runtime runs on CUDA here (a GPU box): the tuned CPU path "
                                                 f"({choice.label}) is for CPU boxes")
        return choice

    def _cuda_runs(self) -> bool:
        """Whether ONNX Runtime's CUDA provider really runs this bundle (onnxruntime-gpu lists it on CPU-only
        machines and falls back silently): probes with the first graph, whose runner is then kept."""
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return False
        name = next(iter(self.manifest.graphs))
        runner = make_runner(self.bundle, name, ExecPath("onnxruntime"), threads=self._threads)
        if runner.provider != "CUDAExecutionProvider":
            return False
        self._runners[name] = runner
        return True

    # --- runners ------------------------------------------------------------------------------------------------
    def runner(self, graph: str, threads: int | None = None) -> Runner:
        """The runner of ``graph`` (created on first use). ``threads``: a runner of its own with that many intra-op
        threads, kept beside the default one (ONNX Runtime only): what the dynamic batcher's lanes run on, several
        batches at once, each on its own share of the cores."""
        with self._lock:
            if threads is not None:
                if self.backend != "onnxruntime":
                    raise ConfigError(f"a runner with its own thread count needs backend 'onnxruntime', not "
                                      f"{self.backend!r}")
                key = (graph, int(threads))
                if key not in self._lane_runners:
                    self._lane_runners[key] = self._make_runner(graph, int(threads))
                return self._lane_runners[key]
            if graph not in self._runners:
                self._runners[graph] = self._make_runner(graph)
            return self._runners[graph]

    def release_runner(self, graph: str, threads: int) -> None:
        """Close and forget the runner of ``graph`` with ``threads`` intra-op threads (one a calibration tried and
        did not keep: its weights need not stay in memory)."""
        with self._lock:
            runner = self._lane_runners.pop((graph, int(threads)), None)
        if runner is not None:
            runner.close()

    def _make_runner(self, graph: str, threads: int | None = None) -> Runner:
        return make_runner(self.bundle, graph, self.path, providers=self._providers, device=self._device,
                           threads=threads or self._threads, hint=self._hint, model=self._torch_model)

    def _torch_model(self):
        """The bundle's PyTorch model, built once and shared by the torch backend's runners."""
        if self._model is None:
            from fine_infer.runtime.torch_runner import model_from_bundle

            self._model = model_from_bundle(self.bundle)
        return self._model

    @property
    def device(self) -> str:
        """Where PyTorch and TensorRT run (``cpu``, ``cuda``, ``cuda:N``); ONNX Runtime picks by its providers."""
        return self._device

    @property
    def path(self) -> ExecPath:
        """The backend, variant and kernels this session runs."""
        return ExecPath(self.backend, self.variant, self._kernels)

    @property
    def threads(self) -> int | None:
        """The intra-op thread cap this session was loaded with (None: the backend's default, one per core)."""
        return self._threads

    @property
    def label(self) -> str:
        """The path's label (``onnxruntime``, ``openvino/bf16``): the names tune and bench use."""
        return ExecPath(self.backend, self.variant).label

    @property
    def providers(self) -> dict[str, str]:
        """Per graph that has run, what actually executes it (the provider in use, not merely an available one)."""
        return {name: r.provider for name, r in self._runners.items()}

    def run(self, graph: str, feeds: dict[str, np.ndarray], threads: int | None = None) -> dict[str, np.ndarray]:
        """Run ``graph`` on raw inputs (already preprocessed); outputs by name. ``threads``: on a runner with that
        many intra-op threads (see :meth:`runner`)."""
        batch = _batch_of(feeds)
        if batch > MAX_BATCH:
            raise InputError(f"batch of {batch} exceeds the limit of {MAX_BATCH}; split it into smaller calls")
        return self.runner(graph, threads).run(feeds)

    # --- preprocessing ------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The bundle's tokenizer (None for image-only bundles)."""
        if self._tokenizer is None and self.manifest.tokenizer:
            from fine_infer.tokenization import load_tokenizer

            self._tokenizer = load_tokenizer(self.bundle.file(self.manifest.tokenizer))
        return self._tokenizer

    def preprocess_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Images → ``pixels`` exactly as the manifest's preprocessing says."""
        if self.manifest.image is None:
            raise ConfigError(f"bundle {self.bundle.path} takes no images")
        return preprocess_images(images, self.manifest.image)

    def tokenize(self, texts: Sequence[str], truncate: bool = False,
                 max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Strings → ``(input_ids, attention_mask)`` exactly as the manifest's tokenisation says; ``max_tokens``
        lowers the model's token limit (what ``truncate`` cuts to, or what is refused without it)."""
        from fine_infer.tokenization import encode

        if self.manifest.text is None or self.tokenizer is None:
            raise ConfigError(f"bundle {self.bundle.path} takes no text")
        return encode(self.tokenizer, texts, self.manifest.text, truncate=truncate, max_chars=self.max_text_chars,
                      max_tokens=max_tokens)

    # --- tasks --------------------------------------------------------------------------------------------------
    def _single_output(self, task: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        entry = self.bundle.graph_for_task(task)
        out = self.run(entry.spec.name, feeds)
        return out[entry.spec.outputs[0].name]

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Embed images (paths, bytes, PIL images or uint8 arrays): float32 (B, D), unit rows."""
        return self._single_output("embed_image", {"pixels": self.preprocess_images(images)})

    def embed_texts(self, texts: Sequence[str], truncate: bool = False) -> np.ndarray:
        """Embed strings: float32 (B, D), unit rows.

        Where the bundle pads text to the longest of the batch, the batch runs as sub-batches of similar length
        (:mod:`fine_infer.runtime.buckets`), each padded to its own longest: the same embeddings (to float rounding)
        for less work."""
        ids, mask = self.tokenize(texts, truncate)
        padded_to_longest = self.manifest.text is not None and self.manifest.text.padding == "longest"
        lengths = sequence_lengths(mask) if padded_to_longest and len(ids) > 1 else None
        buckets = plan_buckets(lengths) if lengths is not None else []
        if len(buckets) < 2:
            return self._single_output("embed_text", {"input_ids": ids, "attention_mask": mask})
        parts = []
        for rows in buckets:
            width = int(lengths[rows].max())
            parts.append(self._single_output("embed_text", {"input_ids": ids[rows, :width],
                                                            "attention_mask": mask[rows, :width]}))
        out = np.empty((len(ids), parts[0].shape[1]), dtype=parts[0].dtype)
        for rows, part in zip(buckets, parts):
            out[rows] = part
        return out

    def compose(self, images: Sequence[ImageInput], texts: Sequence[str], truncate: bool = False) -> np.ndarray:
        """Composed-retrieval queries (reference image + modification text): float32 (B, D), unit rows."""
        if isinstance(texts, str):
            texts = [texts]
        pixels = self.preprocess_images(images)
        if len(pixels) != len(texts):
            raise InputError(f"compose needs one text per image; got {len(pixels)} images and {len(texts)} texts")
        ids, mask = self.tokenize(texts, truncate)
        return self._single_output("compose", {"pixels": pixels, "input_ids": ids, "attention_mask": mask})

    def classify(self, images: Sequence[ImageInput]) -> list[dict[str, Any]]:
        """Per image, per attribute head: the predicted label, its probability and all probabilities."""
        entry = self.bundle.graph_for_task("classify")
        out = self.run(entry.spec.name, {"pixels": self.preprocess_images(images)})
        return classify_outputs(out, self.manifest.class_labels)

    def embed(self, images: Sequence[ImageInput] | None = None, texts: Sequence[str] | None = None,
              truncate: bool = False) -> np.ndarray:
        """Embed whatever the bundle's graphs allow: images, texts, or both together (composed query). ``truncate``:
        cut texts over the model's token limit instead of refusing them."""
        if images is not None and texts is not None:
            return self.compose(images, texts, truncate)
        if images is not None:
            return self.embed_images(images)
        if texts is not None:
            return self.embed_texts(texts, truncate)
        raise InputError("give images, texts or both")

    def close(self) -> None:
        """Release every runner."""
        for r in (*self._runners.values(), *self._lane_runners.values()):
            r.close()
        self._runners.clear()
        self._lane_runners.clear()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Session({str(self.bundle.path)!r}, arch={m.arch or m.source!r}, backend={self.backend!r}, "
                f"variant={self.variant!r})")


def classify_outputs(out: Mapping[str, np.ndarray], labels: Mapping[str, list[str]] | None) -> list[dict[str, Any]]:
    """Per row, per head: softmax of the logits → the top label, its probability, and every label's probability."""
    rows: list[dict[str, Any]] = [{} for _ in range(len(next(iter(out.values()))))]
    for name, logits in out.items():
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        names = (labels or {}).get(name) or [str(i) for i in range(logits.shape[1])]
        for i, p in enumerate(probs):
            j = int(p.argmax())
            rows[i][name] = {"label": names[j], "score": float(p[j]),
                             "scores": {n: float(v) for n, v in zip(names, p)}}
    return rows



def _batch_of(feeds: dict[str, np.ndarray]) -> int:
    for v in feeds.values():
        return int(np.shape(v)[0]) if np.ndim(v) else 1
    return 0


def load(
    bundle: str | Path,
    backend: str = "auto",
    *,
    providers: Sequence[str] | None = None,
    device: str = "cpu",
    kernels: bool = False,
    threads: int | None = None,
    verify: bool = True,
    variant: str | None = None,
    hint: str | None = None,
    public_key: str | Path | None = None,
) -> Session:
    """Open a bundle for inference, verifying every file's sha256 first.

    ``backend``: ``"auto"``, ``"onnxruntime"``, ``"openvino"`` (the fp32 graph on OpenVINO's CPU plugin),
    ``"torch"`` (the zoo model in eager PyTorch, with the fused Triton kernels when ``kernels=True``) or
    ``"tensorrt"`` (engines built on this device with ``fine-infer build-engine``). ``"auto"`` is ONNX Runtime
    on CUDA where its provider really runs; on a CPU box it is the fastest CPU path that passed its precision gate
    according to the bundle's tune result (``fine-infer tune``), else ONNX Runtime fp32; ``session.choice`` says
    what and why.

    ``variant`` picks a graph variant written at export (``fp16``, ``int8``, ``cpu-opt``; default the portable fp32
    graph); on ``openvino`` it is the inference precision: ``fp32`` or ``bf16`` (CPUs with AVX-512 BF16 or AMX).
    ``hint`` is OpenVINO's performance hint: ``"latency"`` (default) or ``"throughput"`` (several streams, for many
    concurrent callers). ``threads`` caps the intra-op threads of ONNX Runtime or OpenVINO.

    ``public_key`` (a PEM file): refuse the bundle (:class:`BundleError`) unless its signature (``fine-infer sign``)
    verifies with that key: unsigned, signed by another key, or any file changed, added or removed since signing, the
    manifest included (needs ``pip install 'fine-infer[sign]'``).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise BackendUnavailableError("backend 'torch' needs PyTorch: pip install 'fine-infer[export]'") from None
    if backend == "openvino":
        import importlib.util

        if importlib.util.find_spec("openvino") is None:
            raise BackendUnavailableError("backend 'openvino' needs OpenVINO: pip install 'fine-infer[openvino]'")
    if public_key is not None:
        from fine_infer.bundle.signing import verify_bundle

        verify_bundle(bundle, public_key)
    return Session(read_bundle(bundle, verify=verify), backend, providers, device, kernels, threads, variant, hint)
