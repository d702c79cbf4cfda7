"""Identify across hand types (``fusion=mean|max``): each hand type scored by its own model, scores fused.

    python -m handclip.identify fusion=mean gallery=GALLERY query=CASES \
        models.dorsal_right=CKPT models.palmar_left=CKPT ...   # default: outputs/train/<hand>/checkpoints/best.ckpt

The gallery is ``<person>/<hand type>/<photo>``, the query's photos grouped into probes
(:mod:`handclip.identify.hand_sources`); a photo's hand type comes from its folder, from ``query_hand=``, or
from the hand-type classifier (:mod:`handclip.identify.hand_classifier`, which refuses to guess). Then, per hand
type ``h`` of the query: its model embeds the probe photos of ``h`` and keeps a gallery index of the ``h`` photos
(one index per (hand type, model), :mod:`handclip.identify.index`); a person scores, for a probe and ``h``, as
the best (probe photo, gallery photo) pair of ``h``. The per-hand-type scores are fused over the hand types both
the probe and the person have (:func:`handclip.metrics.fusion.fuse_scores`: their mean or max); a person
sharing none with the probe is not ranked. Each result names the hand types used and their count, and is decided
at the threshold for its number of hand types (:mod:`handclip.identify.fused_threshold`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from handclip.errors import HandCLIPError
from handclip.identify.fused_threshold import fused_calibration_file, resolve_fused_thresholds, threshold_for
from handclip.identify.hand_classifier import predict_hands
from handclip.identify.hand_sources import Probe, check_gallery_covers, resolve_probes, scan_hand_gallery
from handclip.identify.images import embed_files, report_failures
from handclip.identify.index import GalleryIndex, check_index_path, open_index
from handclip.identify.results import decide, print_results, write_results
from handclip.metrics.fusion import fuse_scores
from handclip.utils.devices import resolve_device
from handclip.utils.files import check_writable, slug

log = logging.getLogger(__name__)

#: Temporary memory (bytes) of one block of query-by-gallery scores.
SCORE_BLOCK_BYTES = 256 * 2**20


def model_path(cfg: DictConfig, hand: str, where: str) -> Path:
    """The checkpoint of ``hand``: ``models.<hand>=`` or the training run's ``best.ckpt``; an error when missing."""
    given = (cfg.get("models") or {}).get(hand)
    default = Path(str(cfg.paths.output_root)) / "train" / hand / "checkpoints" / "best.ckpt"
    path = Path(str(given)).expanduser() if given else default
    if not path.is_file():
        why = (f"models.{hand}={str(given)!r} not found" if given else
               f"no models.{hand}= given and {str(default)!r} not found (train it: python -m handclip.train "
               f"hand={hand})")
        raise HandCLIPError(f"fusion needs a model for hand type {hand} ({where}): {why}")
    return path.resolve()


def hand_index_path(cfg: DictConfig, gallery: Path, hand: str, key: dict) -> Path:
    """``<index>/<hand>`` with ``index=``, else one index per (gallery, hand type, model) under
    ``<output_root>/identify/index/``."""
    if cfg.index:
        return Path(str(cfg.index)).expanduser() / hand
    digest = hashlib.sha256(json.dumps([str(gallery), hand, key]).encode()).hexdigest()[:12]
    return (Path(str(cfg.paths.output_root)) / "identify" / "index"
            / f"{slug(gallery.name, default='gallery')}-{hand}-{digest}")


@torch.inference_mode()
def person_scores(queries: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor, persons: int,
                  budget: int = SCORE_BLOCK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, persons) best cosine of each query with each person's rows, and that row (the earliest of equals;
    -inf and -1 for a person without rows), computed in query blocks of bounded memory."""
    num_g = gallery.shape[0]
    rows = max(1, budget // (12 * max(1, num_g)))
    best = torch.full((queries.shape[0], persons), float("-inf"))
    where = torch.full((queries.shape[0], persons), -1, dtype=torch.long)
    g = gallery.to(device=queries.device, dtype=torch.float32)
    lab = labels.to(queries.device)
    order = torch.arange(num_g, device=queries.device)
    for start in range(0, queries.shape[0], rows):
        s = queries[start:start + rows].to(torch.float32) @ g.T
        idx = lab.expand_as(s)
        top = torch.full((s.shape[0], persons), float("-inf"), device=s.device).scatter_reduce(
            1, idx, s, "amax", include_self=True)
        hit = torch.where(s == top.gather(1, idx), order.expand_as(s), num_g)
        first = torch.full((s.shape[0], persons), num_g, device=s.device).scatter_reduce(
            1, idx, hit, "amin", include_self=True)
        best[start:start + rows] = top.cpu()
        where[start:start + rows] = first.masked_fill(first == num_g, -1).cpu()
    return best, where


def _route(cfg: DictConfig, probes: list[Probe], device, load_embedder) -> dict | None:
    """Predict the hand type of the photos that have none (refusing uncertain ones); what was used, or None."""
    todo = [p for probe in probes for p, h in zip(probe.photos, probe.hands) if h is None]
    if not todo:
        return None
    predicted = predict_hands(cfg, todo, device, load_embedder)
    for probe in probes:
        for i, photo in enumerate(probe.photos):
            if probe.hands[i] is None and photo in predicted:
                probe.hands[i], probe.probabilities[i] = predicted[photo]
    return {"path": str(Path(str(cfg.hand_classifier.path)).expanduser().resolve()), "photos": len(todo)}


def _hand_cfg(cfg: DictConfig, ckpt: Path) -> DictConfig:
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.ckpt_path = str(ckpt)
    return out


def identify_fused(cfg: DictConfig, out_dir: Path, load_embedder) -> dict:
    """Fused identification as configured (see the module); the results as written to ``results.json``.
    ``load_embedder``: :func:`handclip.identify.run.load_embedder` (passed in: run.py calls this module)."""
    if cfg.fusion not in ("mean", "max"):
        raise HandCLIPError(f"fusion={cfg.fusion!r}: expected mean or max")
    if cfg.get("ckpt_path"):
        raise HandCLIPError("ckpt_path= is for one model; with fusion= give models.<hand>=CKPT per hand type")
    if str(cfg.get("gallery_mode") or "max") != "max":
        raise HandCLIPError(f"gallery_mode={cfg.gallery_mode} is not available with fusion= (per hand type a person "
                            "scores as their best photo; case folders are probes whatever query_mode says)")
    query_hand = cfg.get("query_hand")
    probes = resolve_probes(cfg.query, query_hand)
    gallery_files = scan_hand_gallery(str(cfg.gallery))
    gallery = Path(str(cfg.gallery)).expanduser().resolve()
    check_gallery_covers(probes, gallery_files, query_hand)
    for hand in sorted({h for p in probes for h in p.hands if h is not None}):
        model_path(cfg, hand, "in the query")
    fused_calibration_file(cfg)  # exists (or threshold= given)
    if cfg.index:
        for hand in gallery_files:
            check_index_path(Path(str(cfg.index)).expanduser() / hand)
    else:
        check_writable(Path(str(cfg.paths.output_root)) / "identify" / "index", "gallery index folder")
    device = resolve_device(cfg.device)
    routed = _route(cfg, probes, device, load_embedder)
    if routed:
        check_gallery_covers(probes, gallery_files, None)
    hands = sorted({h for p in probes for h in p.hands if h is not None})
    checkpoints = {h: model_path(cfg, h, "predicted in the query") for h in hands}
    loaded = {h: load_embedder(_hand_cfg(cfg, checkpoints[h]), device) for h in hands}
    thresholds = resolve_fused_thresholds(cfg, {h: loaded[h][1].fingerprint for h in hands}, checkpoints, model_path)

    persons = sorted({f.identity for files in gallery_files.values() for f in files})
    number = {name: i for i, name in enumerate(persons)}
    scores, has_photo, best_rows, models, indexes, failed = {}, {}, {}, {}, {}, []
    for hand in hands:
        embedder, model, meta = loaded.pop(hand)
        models[hand] = {**model.key, "fingerprint": model.fingerprint, "hand": meta.get("hand")}
        if meta.get("hand") not in (None, hand):
            log.warning("models.%s is a checkpoint trained on %s", hand, meta.get("hand"))
        photos = [(n, i) for n, p in enumerate(probes) for i, h in enumerate(p.hands) if h == hand]
        paths = [probes[n].photos[i] for n, i in photos]
        done = embed_files(embedder, paths, device, cfg.batch_size, cfg.num_workers, cfg.progress,
                           desc=f"queries ({hand}): embedding", decode=model.decode)  # as its index (decode=)
        failed += [(paths[i], msg) for i, msg in done.failed]
        index_at = hand_index_path(cfg, gallery, hand, model.key)
        check_index_path(index_at)
        index = indexes[hand] = open_index(index_at, gallery, gallery_files[hand], embedder, model, device,
                                           cfg.index_dtype, cfg.overwrite, cfg.batch_size, cfg.num_workers,
                                           cfg.progress)
        labels = torch.tensor([number[i] for i in index.identities], dtype=torch.long)
        best, row = person_scores(done.embeddings.to(device), index.embeddings, labels, len(persons))
        per_probe = torch.full((len(probes), len(persons)), float("-inf"))
        probe_row = torch.full((len(probes), len(persons)), -1, dtype=torch.long)
        for k, r in enumerate(done.rows):  # a probe's score is its best photo of this hand type
            n = photos[r][0]
            better = best[k] > per_probe[n]
            per_probe[n] = torch.where(better, best[k], per_probe[n])
            probe_row[n] = torch.where(better, row[k], probe_row[n])
        scores[hand], best_rows[hand] = per_probe, probe_row
        has_photo[hand] = per_probe > float("-inf")  # (probes, persons): readable on both sides
        del embedder
    report_failures(failed, "query")
    probe_has = {h: has_photo[h].any(dim=1) for h in hands}
    gallery_has = {h: _persons_in(indexes[h], number, len(persons)) for h in hands}
    fused = fuse_scores(scores, probe_has, gallery_has, str(cfg.fusion))

    records, skipped = [], []
    for n, probe in enumerate(probes):
        types = [h for h in hands if bool(probe_has[h][n])]
        if not types:
            skipped.append({"query": str(probe.path), "reason": "none of its photos could be read"})
            continue
        ranked = _ranking(fused.scores[n], fused.count[n], int(cfg.top_k))
        top = [_entry(r + 1, g, persons, fused.scores[n, g], hands, probe_has, gallery_has, n, scores, best_rows,
                      indexes, gallery) for r, g in enumerate(ranked)]
        truth = probe.truth_name if probe.truth_name in number else None
        threshold = threshold_for(thresholds, top[0]["hand_types"])
        record = decide(probe.path, truth, top, threshold["threshold"])
        record.update(threshold=threshold["threshold"], threshold_source=threshold["source"], hand_types=types,
                      hand_types_used=top[0]["hand_types_used"],
                      routing=[{"photo": str(p), "hand_type": h, "source": s, "probability": pr}
                               for p, h, s, pr in zip(probe.photos, probe.hands, probe.sources, probe.probabilities)])
        if probe.path.is_dir():  # a case: its photos (shown in its ranking picture)
            record["photos"] = [str(p) for p in probe.photos]
        records.append(record)
    if not records:
        raise HandCLIPError(f"none of the {len(probes)} probe(s) has a readable photo")
    statuses = {h: indexes[h].status["status"] for h in hands}
    result = {
        "fusion": str(cfg.fusion),
        "models": models,
        "threshold": thresholds["fused"],
        "thresholds_per_hand_type": thresholds["per_hand"],
        "hand_classifier": routed,
        "gallery": {"folder": str(gallery), "images": sum(len(indexes[h].files) for h in hands),
                    "identities": len(persons), "hand_types": {h: len(f) for h, f in gallery_files.items()},
                    "index": {h: str(indexes[h].path) for h in hands},
                    "index_status": {"status": ", ".join(f"{h} {s}" for h, s in statuses.items()),
                                     "per_hand": {h: indexes[h].status for h in hands}},
                    "unreadable": [s for h in hands for s in indexes[h].meta.get("skipped", [])]},
        "queries": records,
        "skipped_queries": [{"query": str(p), "reason": msg} for p, msg in failed] + skipped,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    files = write_results(result, out_dir, overwrite=cfg.overwrite, pictures=cfg.pictures, progress=cfg.progress)
    print_results(result, files, limit=int(cfg.print_limit))
    return {**result, "files": files}


def _persons_in(index: GalleryIndex, number: dict[str, int], count: int) -> torch.Tensor:
    out = torch.zeros(count, dtype=torch.bool)
    out[[number[i] for i in set(index.identities)]] = True
    return out


def _ranking(fused: torch.Tensor, count: torch.Tensor, k: int) -> list[int]:
    """The k best persons sharing a hand type with the probe: by fused score, then by name (sorted order)."""
    candidates = torch.nonzero(count > 0).flatten()
    order = torch.argsort(-fused[candidates], stable=True)
    return candidates[order][:k].tolist()


def _entry(rank: int, g: int, persons: list[str], fused: torch.Tensor, hands: list[str], probe_has: dict,
           gallery_has: dict, n: int, scores: dict, best_rows: dict, indexes: dict, gallery: Path) -> dict:
    used = [h for h in hands if bool(probe_has[h][n]) and bool(gallery_has[h][g])]
    per_hand = {h: float(scores[h][n, g]) for h in used}
    best_hand = max(used, key=lambda h: per_hand[h])  # the best-matching photo: of the best hand type
    return {"rank": rank, "identity": persons[g], "score": float(fused),
            "file": str(gallery / indexes[best_hand].files[int(best_rows[best_hand][n, g])]),
            "hand_types": used, "hand_types_used": len(used), "scores_by_hand_type": per_hand}
