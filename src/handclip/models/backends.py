"""Inference backends: what turns a batch of uint8 crops into embeddings, behind one ``embed(images)``.

``torch``: PyTorch, fp32 on the CPU (bf16 autocast on CUDA, as evaluation has always run). ``torch-bf16``: bf16
autocast on a CPU that computes in bf16 natively (AVX-512 BF16 or AMX). ``onnx``: onnxruntime fp32 on the CPU, from
the image tower exported by :mod:`handclip.models.onnx_export`. ``onnx-int8``: that graph with onnxruntime's dynamic
int8 quantisation of its matrix products (int8 weights per output channel, activations quantised per batch; the
patch-embedding convolution stays fp32: onnxruntime's int8 convolution was slower than its fp32 one). ``auto``:
the fastest backend this machine has whose agreement meets its goal, timed on this model on this CPU once
(:func:`time_backend`) and the choice kept in ``cache_dir`` per (CPU model and flags, threads, library versions,
goals, model fingerprint); torch on CUDA.

The exported and quantised graphs are built once per model and kept under ``cache_dir`` by the model's fingerprint
(its weights and preprocessing) and the onnxruntime version, so a cached graph is never stale. Every backend but
``torch`` states its agreement with ``torch`` fp32 on :func:`check_images` (cosine of the embeddings, lowest and
mean) and refuses with one line when the lowest is under :data:`AGREEMENT_GOAL`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from handclip.errors import HandCLIPError
from handclip.models.encoder import ImageEncoder
from handclip.schema import BACKEND_CHOICES, INFERENCE_BACKENDS, check_backend
from handclip.utils.devices import cpu_flags, cpu_has_bf16, cpu_model_name
from handclip.utils.files import atomic_write, temp_path
from handclip.utils.locks import exclusive_lock

log = logging.getLogger(__name__)

BACKENDS, CHOICES = INFERENCE_BACKENDS, BACKEND_CHOICES
#: The lowest cosine (embedding vs torch fp32's, over the check images) each backend must reach to be used.
AGREEMENT_GOAL = {"torch": 0.99999, "torch-bf16": 0.99, "onnx": 0.9999, "onnx-int8": 0.99}
#: ``backend=auto`` times each backend on this many check images at one batch, fastest of ``repeats`` passes.
AUTO_TIMING = {"images": 16, "repeats": 3}
#: Bumped when the way cached graphs are built changes (they are then rebuilt).
CACHE_FORMAT = 2
#: The ONNX operators ``onnx-int8`` quantises.
QUANTISED_OPS = ["MatMul", "Gemm"]
#: Images the agreement is measured on.
CHECK_IMAGES = 16


def default_cache_dir() -> Path:
    """``$HANDCLIP_CACHE/backends``, else ``$XDG_CACHE_HOME/handclip/backends`` (``~/.cache/handclip/backends``)."""
    if os.environ.get("HANDCLIP_CACHE"):
        return Path(os.environ["HANDCLIP_CACHE"]).expanduser() / "backends"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "handclip" / "backends"


def check_images(encoder: ImageEncoder, n: int = CHECK_IMAGES, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 crops that look more like photos than noise: smooth random colour fields (8 x 8 cells upsampled)
    with fine noise, the same for every call with the same ``seed``."""
    _, height, width = (int(v) for v in encoder.preprocess.input_size)
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 8, 8), generator=generator) * 255
    smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    noisy = smooth + 12 * torch.randn((n, 3, height, width), generator=generator)
    return noisy.clamp(0, 255).round().to(torch.uint8)


class Embedder:
    """``embed(uint8 crops) -> float32 embeddings`` (not L2-normalised) on :attr:`device`."""

    name = "torch"

    def __init__(self, encoder: ImageEncoder, device: torch.device):
        self.encoder, self.device = encoder, device
        self.agreement: dict | None = None
        #: How ``backend=auto`` chose this backend (its timings), when it did.
        self.auto: dict | None = None

    @property
    def preprocess(self):
        return self.encoder.preprocess

    @property
    def output_dim(self) -> int:
        return self.encoder.output_dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchEmbedder(Embedder):
    """PyTorch eager; ``bf16``: bf16 autocast (on CUDA always, as evaluation has always run)."""

    def __init__(self, encoder: ImageEncoder, device: torch.device, bf16: bool = False):
        super().__init__(encoder.to(device).eval(), device)
        self.bf16 = bf16 or device.type == "cuda"
        self.name = "torch-bf16" if bf16 and device.type == "cpu" else "torch"

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            return self.encoder.embed(images).float()


class OnnxEmbedder(Embedder):
    """onnxruntime (CPU) on an exported graph whose input is uint8 crops (the normalisation is inside it)."""

    def __init__(self, encoder: ImageEncoder, path: Path, name: str, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(encoder, torch.device("cpu"))
        self.name, self.path = name, path
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # as many as PyTorch uses
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"images": images.cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).float()


@torch.inference_mode()
def agreement(embedder: Embedder, reference: ImageEncoder, images: torch.Tensor) -> dict:
    """Cosine between ``embedder``'s embeddings of ``images`` and ``reference``'s (PyTorch fp32 on the CPU)."""
    want = reference.to("cpu").eval().embed(images).double()
    got = embedder.embed(images).double().cpu()
    cosine = F.cosine_similarity(got, want, dim=1)
    return {"cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()), "images": int(images.shape[0]),
            "goal_cosine_min": AGREEMENT_GOAL[embedder.name]}


def _require_onnx(backend: str):
    try:
        import onnxruntime

        return onnxruntime
    except ImportError:
        raise HandCLIPError(f"backend={backend} needs onnxruntime, which is not installed: pip install -e "
                            "\".[onnx]\" (or choose backend=torch)") from None


def _paths(cache_dir: Path, fingerprint: str, backend: str) -> tuple[Path, Path]:
    import onnxruntime

    stem = cache_dir / fingerprint / f"{backend}-v{CACHE_FORMAT}-ort{onnxruntime.__version__}"
    return stem.with_suffix(".onnx"), stem.with_suffix(".json")


def _build_onnx(encoder: ImageEncoder, backend: str, target: Path, fingerprint: str, cache_dir: Path) -> None:
    from handclip.models.onnx_export import export_onnx

    if backend == "onnx":
        export_onnx(encoder, target, {"model_fingerprint": fingerprint}, check=False)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = _graph(encoder, "onnx", fingerprint, cache_dir)[0]  # the fp32 graph, under the lock already held
    tmp = temp_path(target.parent, target.name)
    try:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=QUANTISED_OPS)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet():
    """The exporter's progress prints and the quantiser's INFO lines (one per tensor) are not shown."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def cached_graph(encoder: ImageEncoder, backend: str, fingerprint: str, cache_dir: Path) -> tuple[Path, dict]:
    """The ONNX graph of ``backend`` for this model and its agreement with torch fp32: built (and measured) on the
    first call, read from ``cache_dir`` afterwards. Concurrent processes build it once (a lock per model)."""
    folder = cache_dir / fingerprint
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder / ".lock"):
        return _graph(encoder, backend, fingerprint, cache_dir)


def _graph(encoder: ImageEncoder, backend: str, fingerprint: str, cache_dir: Path) -> tuple[Path, dict]:
    graph, report = _paths(cache_dir, fingerprint, backend)
    if not graph.is_file():
        log.info("building the %s graph of model %s in %s (once)", backend, fingerprint, graph.parent)
        report.unlink(missing_ok=True)
        with _quiet():
            _build_onnx(encoder, backend, graph, fingerprint, cache_dir)
    if report.is_file():
        return graph, json.loads(report.read_text())["agreement"]
    measured = agreement(OnnxEmbedder(encoder, graph, backend), encoder, check_images(encoder))
    atomic_write(report, json.dumps({"agreement": measured, "fingerprint": fingerprint, "backend": backend},
                                    indent=1), durable=False)
    return graph, measured


def _check_agreement(backend: str, measured: dict, fingerprint: str) -> None:
    if measured["cosine_min"] < AGREEMENT_GOAL[backend]:
        raise HandCLIPError(
            f"backend={backend} agrees with torch fp32 only to cosine {measured['cosine_min']:.6f} (lowest of "
            f"{measured['images']} check images) on model {fingerprint}, short of its goal "
            f"{AGREEMENT_GOAL[backend]}; use backend=torch (or onnx)")


def _fingerprint(encoder: ImageEncoder, fingerprint: str | None) -> str:
    """``fingerprint`` when the caller has it, else the encoder's (hashing its weights: once per load)."""
    if fingerprint is not None:
        return fingerprint
    from handclip.models.fingerprint import encoder_fingerprint

    return encoder_fingerprint(encoder)


def make_embedder(encoder: ImageEncoder, backend: str = "torch", device: torch.device | str = "cpu",
                  fingerprint: str | None = None, cache_dir: str | Path | None = None) -> Embedder:
    """The embedder of ``backend`` (one of :data:`CHOICES`) for ``encoder`` on ``device``, its agreement checked."""
    device = torch.device(device)
    check_backend(backend)
    if backend == "auto":
        return _auto(encoder, device, fingerprint, cache_dir)
    if backend == "torch":
        return TorchEmbedder(encoder, device)
    if device.type != "cpu":
        raise HandCLIPError(f"backend={backend} runs on the CPU; pass device=cpu (or backend=torch on {device})")
    fingerprint = _fingerprint(encoder, fingerprint)
    if backend == "torch-bf16":
        if not cpu_has_bf16():
            raise HandCLIPError("backend=torch-bf16: this CPU has no native bf16 (avx512_bf16 or amx_bf16 flags); "
                                "use backend=torch or onnx-int8")
        embedder = TorchEmbedder(encoder, device, bf16=True)
        embedder.agreement = agreement(embedder, encoder, check_images(encoder))
    else:
        _require_onnx(backend)
        graph, measured = cached_graph(encoder, backend, fingerprint, Path(cache_dir or default_cache_dir()))
        embedder = OnnxEmbedder(encoder, graph, backend)
        embedder.agreement = measured
    _check_agreement(backend, embedder.agreement, fingerprint)
    return embedder


def available(backend: str) -> bool:
    """Whether this machine has what ``backend`` needs (not whether it agrees on a given model)."""
    if backend == "torch-bf16":
        return cpu_has_bf16()
    if backend.startswith("onnx"):
        try:
            _require_onnx(backend)
        except HandCLIPError:
            return False
    return True


def machine_key() -> dict:
    """What ``auto``'s choice depends on besides the model: the CPU (model name and flags), the threads, the
    libraries and the agreement goals. A choice is reused only while all of them are the same."""
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    return {"cpu": cpu_model_name(), "flags": sorted(cpu_flags()), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": ort, "goals": dict(AGREEMENT_GOAL), "format": CACHE_FORMAT,
            "timing": dict(AUTO_TIMING)}


def time_backend(embedder: Embedder, images: torch.Tensor, repeats: int) -> float:
    """Seconds per image of ``embedder`` on ``images`` in one batch: a warm-up pass, then the fastest of
    ``repeats`` (the least disturbed by other processes)."""
    embedder.embed(images)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        embedder.embed(images)
        best = min(best, time.perf_counter() - start)
    return best / images.shape[0]


def _auto(encoder: ImageEncoder, device: torch.device, fingerprint: str | None, cache_dir) -> Embedder:
    """The fastest backend that meets its agreement, as measured here once (the choice kept, see the module)."""
    if device.type != "cpu":
        return TorchEmbedder(encoder, device)
    fingerprint = _fingerprint(encoder, fingerprint)
    cache_dir = Path(cache_dir or default_cache_dir())
    machine = machine_key()
    folder = cache_dir / fingerprint
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:16]
    record = folder / f"auto-{digest}.json"
    with exclusive_lock(folder / ".auto.lock"):  # not the graphs' lock, which make_embedder takes
        try:
            cached = json.loads(record.read_text())
        except (OSError, ValueError):
            cached = None
        if cached and cached.get("machine") == machine and cached.get("fingerprint") == fingerprint:
            try:
                embedder = make_embedder(encoder, cached["choice"], device, fingerprint, cache_dir)
                embedder.auto = {**cached, "reused": True}
                return embedder
            except HandCLIPError as err:
                log.info("backend=auto: the kept choice %s is not usable (%s); timing again", cached["choice"], err)
        return _measure(encoder, device, fingerprint, cache_dir, machine, record)


def _measure(encoder: ImageEncoder, device: torch.device, fingerprint: str, cache_dir: Path, machine: dict,
             record: Path) -> Embedder:
    images = check_images(encoder, int(AUTO_TIMING["images"]), seed=1)
    seconds, refused, embedders = {}, {}, {}
    for name in INFERENCE_BACKENDS:
        if not available(name):
            refused[name] = "not available on this machine"
            continue
        try:
            embedders[name] = make_embedder(encoder, name, device, fingerprint, cache_dir)
        except HandCLIPError as err:  # short of its agreement goal on this model: never chosen
            refused[name] = str(err)
            continue
        seconds[name] = time_backend(embedders[name], images, int(AUTO_TIMING["repeats"]))
    choice = min(seconds, key=lambda n: (seconds[n], INFERENCE_BACKENDS.index(n)))  # torch is always there
    log.info("backend=auto chose %s (seconds per image: %s)", choice,
             ", ".join(f"{n} {t:.4f}" for n, t in seconds.items()))
    chosen = {"choice": choice, "seconds_per_image": seconds, "refused": refused, "fingerprint": fingerprint,
              "machine": machine}
    atomic_write(record, json.dumps(chosen, indent=1), durable=False)
    embedder = embedders[choice]
    embedder.auto = {**chosen, "reused": False}
    return embedder
