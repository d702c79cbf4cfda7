"""Identify new hand photos against a gallery: the steps behind ``python -m handclip.identify``.

1. every input checked before any work: the results folder (claimed, so that a second run of the same name is
   refused, and writable), the query photos and the gallery files, the model (a checkpoint, or the zero-shot
   model given by ``model``), its open-set threshold (the checkpoint's calibration file, ``calibration=FILE``, or
   ``threshold=VALUE``) and the index folder;
2. the query photos embedded (unreadable ones named, counted and left out; none readable, or a case without a
   readable photo: refused before the gallery is embedded);
3. the gallery index, reused or updated (:mod:`handclip.identify.index`);
4. exact top-k identities (:mod:`handclip.identify.search`; other decision modes: :mod:`handclip.identify.modes`)
   and a decision per query (or per case): the top identity when its score reaches the threshold of the
   decision mode, else "unknown";
5. ``results.json``, ``results.csv`` and a ranking picture per query (:mod:`handclip.identify.results`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from handclip.data.images import check_decode
from handclip.errors import HandCLIPError
from handclip.evaluation.calibration import decision_mode, read_calibration, select_threshold, sidecar_path
from handclip.identify.cases import readable_cases, resolve_cases
from handclip.identify.images import embed_files, report_failures
from handclip.identify.index import GalleryIndex, ModelInfo, check_index_path, open_index
from handclip.identify.modes import top_k_persons
from handclip.identify.results import check_output, decide, print_results, write_results
from handclip.identify.search import top_k_identities
from handclip.identify.sources import known_identity, resolve_queries, scan_gallery
from handclip.models.backends import Embedder, make_embedder
from handclip.models.checkpoint import load_encoder
from handclip.models.encoder import ImageEncoder, zero_shot_encoder
from handclip.models.fingerprint import encoder_fingerprint
from handclip.utils.devices import resolve_device
from handclip.utils.files import check_writable, claimed, slug

log = logging.getLogger(__name__)


def load_model(cfg: DictConfig) -> tuple[ImageEncoder, ModelInfo, dict]:
    """The image encoder to use, what names it (for the index), and its checkpoint metadata (empty: zero-shot)."""
    tta = (cfg.get("eval") or {}).get("tta")  # null: the checkpoint's own (none for the zero-shot model)
    if cfg.ckpt_path:
        ckpt = Path(str(cfg.ckpt_path)).expanduser().resolve()
        encoder, meta = load_encoder(ckpt, tta=tta)
        key = {"checkpoint": str(ckpt), "model_name": meta["model_name"]}
    else:
        torch.manual_seed(cfg.seed)  # random-weight models (tests, the demo) come out as in `eval`
        encoder = zero_shot_encoder(cfg.model.model_name, cfg.model.pretrained, cfg.model.cache_dir, tta=tta)
        meta, key = {}, {"zero_shot": cfg.model.model_name, "pretrained": cfg.model.pretrained}
    return encoder.eval(), ModelInfo(key=key, fingerprint=encoder_fingerprint(encoder)), meta


def load_embedder(cfg: DictConfig, device: torch.device) -> tuple[Embedder, ModelInfo, dict]:
    """:func:`load_model` run by ``backend=`` (its agreement checked) and decoding by ``decode=``; an index made by a
    backend other than torch, or of draft-decoded images, is kept apart (its key names the backend, the decoding)."""
    encoder, model, meta = load_model(cfg)
    embedder = make_embedder(encoder, str(cfg.backend), device, model.fingerprint, cfg.backend_cache)
    return embedder, with_settings(model, embedder.name, check_decode(str(cfg.get("decode") or "full"))), meta


def with_settings(model: ModelInfo, backend: str, decode: str) -> ModelInfo:
    """``model`` whose key also names a backend other than torch and a decoding other than full."""
    extra = {**({"backend": backend} if backend != "torch" else {}), **({"decode": decode} if decode != "full" else {})}
    return ModelInfo(key={**model.key, **extra}, fingerprint=model.fingerprint) if extra else model


def modes(cfg: DictConfig) -> dict:
    """``{gallery_mode, query_mode[, case_mode], decision_mode}`` as configured (the plain mode: max, each)."""
    chosen = {"gallery_mode": str(cfg.get("gallery_mode") or "max"), "query_mode": str(cfg.get("query_mode") or "each")}
    for key, allowed in (("gallery_mode", ("max", "mean")), ("query_mode", ("each", "case"))):
        if chosen[key] not in allowed:
            raise HandCLIPError(f"{key}={chosen[key]!r}: expected one of {', '.join(allowed)}")
    if chosen["query_mode"] == "case":
        chosen["case_mode"] = str(cfg.get("case_mode") or "mean")
        if chosen["case_mode"] not in ("mean", "max"):
            raise HandCLIPError(f"case_mode={chosen['case_mode']!r}: expected one of mean, max")
    return {**chosen, "decision_mode": decision_mode(*chosen.values())}


def resolve_threshold(cfg: DictConfig, meta: dict, fingerprint: str, mode: str = "max") -> dict:
    """``{threshold, source, ...}`` from ``threshold=``, ``calibration=`` or the checkpoint's calibration file;
    ``mode``: the decision mode whose threshold it is (:func:`handclip.evaluation.calibration.decision_mode`)."""
    if cfg.threshold is not None:
        return {"threshold": float(cfg.threshold), "source": "threshold= (given)"}
    ckpt = Path(str(cfg.ckpt_path)).expanduser().resolve() if cfg.ckpt_path else None
    hand = meta.get("hand", "<hand>")
    if ckpt is not None:
        how_to = (f"compute it with `python -m handclip.eval hand={hand} ckpt_path={ckpt}` (on the data it was "
                  "trained on, e.g. paths.data_dir=...), or pass threshold=VALUE")
    else:
        how_to = ("compute one with `python -m handclip.eval hand=HAND` with the same model= settings (it writes "
                  "outputs/eval/HAND_zeroshot.calibration.json) and pass calibration=FILE, or pass threshold=VALUE")
    path = Path(str(cfg.calibration)).expanduser() if cfg.calibration else (sidecar_path(ckpt) if ckpt else None)
    if path is None:
        raise HandCLIPError(f"the zero-shot model has no calibrated open-set threshold; {how_to}")
    if not path.is_file():
        if cfg.calibration:
            raise HandCLIPError(f"calibration file {str(path)!r} not found; {how_to}")
        raise HandCLIPError(f"checkpoint {str(ckpt)!r} has no calibrated open-set threshold ({path.name} not found "
                            f"beside it; training writes it at its end); {how_to}")
    chosen = select_threshold(read_calibration(path), path, fingerprint, cfg.target_fmr, how_to, mode)
    return {**chosen, "source": str(path)}


def output_name(cfg: DictConfig) -> str:
    """``name=`` or ``<query>-vs-<gallery>`` (``<folder>-glob`` for a pattern)."""
    if cfg.name:
        return slug(str(cfg.name), default="query")
    query = Path(str(cfg.query))
    stem = f"{query.parent.name}-glob" if any(c in str(cfg.query) for c in "*?[") else query.stem
    return slug(f"{stem}-vs-{Path(str(cfg.gallery)).name}", default="query")


def index_path(cfg: DictConfig, gallery: Path, model: ModelInfo) -> Path:
    """``index=PATH``, or one index per (gallery folder, model) under ``<output_root>/identify/index/``."""
    if cfg.index:
        return Path(str(cfg.index)).expanduser()
    digest = hashlib.sha256(json.dumps([str(gallery), model.key]).encode()).hexdigest()[:12]
    return Path(cfg.paths.output_root) / "identify" / "index" / f"{slug(gallery.name, default='query')}-{digest}"


def identify(cfg: DictConfig, loaded: tuple[Embedder, ModelInfo, dict] | None = None,
             out_dir: Path | None = None) -> dict:
    """Run identification as configured; return the results (as written to ``results.json``). ``loaded``: the
    model already loaded (the Python API), as :func:`load_embedder` returns it; ``out_dir``: where the results go
    (default ``<output_root>/identify/<name>``)."""
    for key in ("gallery", "query"):
        if not cfg.get(key):
            raise HandCLIPError(f"{key}= is required: python -m handclip.identify ckpt_path=CKPT gallery=DIR "
                                "query=PHOTO|DIR|'GLOB'")
    if int(cfg.top_k) < 1:
        raise HandCLIPError(f"top_k must be >= 1, got {cfg.top_k}")
    out_dir = out_dir or Path(cfg.paths.output_root) / "identify" / output_name(cfg)
    check_writable(out_dir, "results folder (paths.output_root, name=)")
    with claimed(out_dir, "identify"):  # a second run of the same name is refused while this one lives
        check_output(out_dir, cfg.overwrite)
        if cfg.get("fusion"):  # across hand types, one model each (identify/fusion.py)
            from handclip.identify.fusion import identify_fused

            return identify_fused(cfg, out_dir, load_embedder)
        return _identify(cfg, out_dir, loaded)


def _identify(cfg: DictConfig, out_dir: Path, loaded: tuple | None = None) -> dict:
    mode = modes(cfg)
    cases = resolve_cases(cfg.query) if mode["query_mode"] == "case" else None
    queries = [p for c in cases for p in c.photos] if cases else resolve_queries(cfg.query)
    files = scan_gallery(str(cfg.gallery))
    gallery = Path(str(cfg.gallery)).expanduser().resolve()
    device = resolve_device(cfg.device)
    encoder, model, meta = loaded or load_embedder(cfg, device)
    threshold = resolve_threshold(cfg, meta, model.fingerprint, mode["decision_mode"])
    index_at = index_path(cfg, gallery, model)
    check_index_path(index_at)
    embedded = embed_files(encoder, queries, device, cfg.batch_size, cfg.num_workers, cfg.progress,
                           desc="queries: embedding", decode=model.decode)
    report_failures([(queries[i], msg) for i, msg in embedded.failed], "query")
    if not embedded.rows:
        raise HandCLIPError(f"none of the {len(queries)} query image(s) could be read (the gallery was not "
                            "embedded)")
    groups = readable_cases(cases, set(embedded.rows)) if cases else None  # before the gallery is embedded
    index = open_index(index_at, gallery, files, encoder, model, device, cfg.index_dtype, cfg.overwrite,
                       cfg.batch_size, cfg.num_workers, cfg.progress)
    log.info("gallery index %s: %s (%d images, %d embedded)", index.path, index.status["status"], len(index.files),
             index.status["embedded"])
    records = _records(cfg, mode, index, embedded, queries, cases, groups, threshold["threshold"], device)
    names = index.labels()[1]
    result = {
        "model": {**model.key, "fingerprint": model.fingerprint, "hand": meta.get("hand")},
        "threshold": threshold,
        "mode": mode,
        "gallery": {"folder": str(Path(index.meta["gallery"])), "images": len(index.files), "identities": len(names),
                    "index": str(index.path), "index_status": index.status,
                    "unreadable": index.meta.get("skipped", [])},
        "queries": records,
        "skipped_queries": [{"query": str(queries[i]), "reason": msg} for i, msg in embedded.failed],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    files = write_results(result, out_dir, overwrite=cfg.overwrite, pictures=cfg.pictures, progress=cfg.progress)
    print_results(result, files, limit=int(cfg.print_limit))
    return {**result, "files": files}


def _records(cfg: DictConfig, mode: dict, index: GalleryIndex, embedded, queries: list[Path], cases: list | None,
             groups: list[list[int]] | None, threshold: float, device: torch.device) -> list[dict]:
    """One decision per probe: a query photo, or a case (its readable photos listed)."""
    labels, names = index.labels()
    probes = embedded.embeddings.to(device)
    if mode["decision_mode"] == "max":
        hits = top_k_identities(probes, index.embeddings, labels, int(cfg.top_k))
    else:
        row_of = {q: n for n, q in enumerate(embedded.rows)}  # query photo -> embedding row
        hits = top_k_persons(probes, index.embeddings, labels, int(cfg.top_k),
                             templates=index.mean_templates() if mode["gallery_mode"] == "mean" else None,
                             groups=None if groups is None else [[row_of[i] for i in g] for g in groups],
                             case_mode=mode.get("case_mode", "mean"))
    gallery_root = Path(index.meta["gallery"])
    identities = set(names)
    records = []
    for n in range(len(hits.labels)):
        top = [{"rank": r + 1, "identity": names[lab], "score": score, "file": str(gallery_root / index.files[g])}
               for r, (lab, score, g) in enumerate(zip(hits.labels[n], hits.scores[n], hits.rows[n]))]
        if cases is None:
            query = queries[embedded.rows[n]]
            records.append(decide(query, known_identity(query, identities), top, threshold))
        else:
            case = cases[n]
            truth = case.name if case.name in identities else None
            records.append({**decide(case.folder, truth, top, threshold),
                            "photos": [str(queries[i]) for i in groups[n]]})
    return records
