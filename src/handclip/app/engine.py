"""What the tabs do, without gradio: identify uploaded photos, enrol and remove people, batches, and the
evaluation results of a model. Everything goes through the one door (:func:`handclip.load` and
:meth:`handclip.api.HandCLIP.identify`), identify's gallery index (incremental) and its results files.

Each request gets a folder ``<out>/requests/<time>-<random>/``: the accepted photos (named by their content),
identify's ``results/results.{json,csv}`` (the command line's records), thumbnails. Old request folders are
removed after ``keep_hours``. A gallery is read under its shared lock and changed under its exclusive lock
(:mod:`handclip.app.gallery`), so identify sees the gallery and its index before or after a change, never between.

The gallery mode (``max``: a person scores as their best photo; ``mean``: as their mean template) is chosen per
request and passed on to identify, whose calibration file holds a threshold per mode. ``fusion`` (mean | max) sends
the request to :func:`handclip.identify_fused` instead (:mod:`handclip.app.fusion`): a hand-type gallery, one
fine-tuned model per hand type, the photos' hand type given or told by the classifier.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from handclip.app import gallery as galleries
from handclip.app.decisions import Band, band
from handclip.app.fusion import FusionSetup, fusion_setup, run_fused
from handclip.app.models import ModelChoice, find_models, load_choice
from handclip.app.settings import Folders, Limits
from handclip.app.uploads import check_uploads, thumbnail
from handclip.errors import HandCLIPError
from handclip.evaluation.calibration import read_calibration
from handclip.hands import HAND_TYPES, hand_dir_name
from handclip.identify.index import open_index
from handclip.identify.results import write_results
from handclip.identify.run import index_path
from handclip.identify.sources import scan_gallery
from handclip.utils.files import printable

log = logging.getLogger(__name__)


@dataclass
class Request:
    """What one identify or batch request asks for."""

    model: str
    gallery: str
    top_k: int = 5
    target_fmr: float | None = None
    gallery_mode: str = "max"  # max: a person scores as their best photo; mean: as their mean template
    fusion: str = "off"  # mean | max: across hand types (handclip.identify_fused); off: the chosen model alone
    hand: str = "auto"  # with fusion: the photos' hand type, or auto (the hand-type classifier)

    @property
    def fused(self) -> bool:
        return str(self.fusion or "off") != "off"


@dataclass
class Outcome:
    """What a request gives back: identify's result (as in results.json), per record the photo's label and
    thumbnail, the decision band, the result files, and a message per refused photo."""

    result: dict | None = None
    labels: list[str] = field(default_factory=list)
    thumbs: list[Path | None] = field(default_factory=list)
    band: Band | None = None
    files: dict[str, Path] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def records(self) -> list[dict]:
        return self.result["queries"] if self.result else []


class Studio:
    """The app's state: the offered models (loaded on first use and kept) and galleries, its folders and caps."""

    def __init__(self, folders: Folders, limits: Limits, *, zero_shot: tuple[str, str | None] | None = None,
                 device: str = "cpu", backend: str = "torch", seed: int = 42, top_k: int = 5,
                 target_fmr: float | None = None, keep_hours: float = 24.0):
        self.folders, self.limits, self.zero_shot = folders, limits, zero_shot
        self.device, self.backend, self.seed = device, backend, seed
        self.top_k, self.target_fmr, self.keep_hours = top_k, target_fmr, keep_hours
        self._loaded: dict[str, object] = {}
        self._load_lock = threading.Lock()
        # api.identify swaps sys.stdout while it runs: one at a time in this process
        self._identify_lock = threading.Lock()
        self.models: list[ModelChoice] = []
        self.refresh()

    # -- choices -----------------------------------------------------------------------------------------------
    def refresh(self) -> list[str]:
        self.models = find_models(self.folders.models_root, self.zero_shot)
        return [m.label for m in self.models]

    @property
    def gallery_labels(self) -> list[str]:
        return [str(g) for g in self.folders.galleries]

    def default_gallery(self, model_label: str | None) -> str | None:
        """The gallery of the model's hand type (``<split of the hand>/gallery0``), else the first."""
        choice = next((m for m in self.models if m.label == model_label), None)
        if choice is not None and choice.hand in HAND_TYPES:
            split = hand_dir_name(choice.hand)
            match = next((str(g) for g in self.folders.galleries if g.parent.name == split), None)
            if match is not None:
                return match
        return (self.gallery_labels or [None])[0]

    def fusion(self, gallery_label: str | None) -> FusionSetup | None:
        """The fused identify of a gallery (None: not offered for it)."""
        if not gallery_label:
            return None
        gallery = self.gallery(gallery_label)
        with galleries.reading(gallery):
            return fusion_setup(self.folders.models_root, gallery)

    def choice(self, label: str) -> ModelChoice:
        found = next((m for m in self.models if m.label == label), None)
        if found is None:
            raise HandCLIPError(f"no model {printable(str(label))!r} here; pick one of the list (refresh it after "
                                "training)" if label else "no model chosen (none found: train one, or run make demo)")
        return found

    def gallery(self, label: str) -> Path:
        found = next((g for g in self.folders.galleries if str(g) == label), None)
        if found is None:
            raise HandCLIPError(f"no gallery {printable(str(label))!r} here; pick one of the list")
        return found.resolve()

    def model(self, label: str):
        """The loaded model of a choice; the zero-shot model is loaded once for all its calibration files."""
        choice = self.choice(label)
        with self._load_lock:
            if label not in self._loaded:
                same = next((self._loaded[m.label] for m in self.models if m.label in self._loaded
                             and m.kind == "zero-shot" == choice.kind and m.model_name == choice.model_name
                             and m.pretrained == choice.pretrained), None)
                if same is not None:  # the same weights: shared, with this choice's calibration file
                    self._loaded[label] = copy.copy(same)
                    self._loaded[label].calibration = choice.calibration
                else:
                    self._loaded[label] = load_choice(choice, self.device, self.backend,
                                                      self.folders.out / "backends", self.seed)
            return self._loaded[label]

    def index_of(self, model, gallery: Path) -> Path:
        where = OmegaConf.create({"index": None, "paths": {"output_root": str(self.folders.out)}})
        return index_path(where, gallery, model.model)

    # -- identify ----------------------------------------------------------------------------------------------
    def _new_request(self) -> Path:
        root = self.folders.out / "requests"
        root.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - self.keep_hours * 3600
        thumbs = self.folders.out / "thumbs"
        for old in [*root.iterdir(), *(thumbs.iterdir() if thumbs.is_dir() else [])]:  # photos are not kept longer
            try:
                if old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
            except OSError:
                pass
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        folder = root / f"{stamp}-{secrets.token_hex(4)}"
        folder.mkdir()
        return folder

    def identify(self, files: list, request: Request, max_files: int | None = None, chunk: int = 0,
                 progress=None) -> Outcome:
        """Identify the uploaded photos (``files``: paths gradio wrote) against the gallery. ``chunk``: photos per
        identify call (0: all at once), ``progress(done, total)`` called after each."""
        uploads, messages = check_uploads(files, self.limits, max_files or self.limits.max_files)
        if not uploads:
            return Outcome(messages=messages or ["no photo given: upload one or more photos first"])

        def label_of_copy(path: str) -> str:  # "00003-<hash>.png" -> the label of the fourth upload
            return uploads[int(Path(path).name[:5])].label

        top_k = int(request.top_k)
        if not 1 <= top_k <= 50:
            raise HandCLIPError(f"top-k {top_k}: expected 1 to 50")
        setup = model = None
        if request.fused:
            setup = self.fusion(request.gallery)
            if setup is None:
                raise HandCLIPError(f"fusion across hand types is not offered for gallery "
                                    f"{printable(request.gallery)!r}: it needs <person>/<hand type>/<photo> folders "
                                    "and a fine-tuned model per hand type (train/<hand>/checkpoints/best.ckpt under "
                                    "the models root); choose off")
            if request.gallery_mode != "max":
                raise HandCLIPError("with fusion a person scores per hand type as their best photo: choose "
                                    "'their best photo (max)'")
        else:
            model = self.model(request.model)
        gallery = self.gallery(request.gallery)
        folder = self._new_request()
        size = chunk or len(uploads)
        parts, labels = [], []
        whole = size >= len(uploads)
        for start in range(0, len(uploads), size):
            query = folder / f"query-{start // size:04d}"
            for n, upload in enumerate(uploads[start:start + size]):  # named by position and content
                upload.save(query, f"{start + n:05d}-{upload.file_name}")
            out = folder / ("results" if whole else f"results-{start // size:04d}")
            with galleries.reading(gallery), self._identify_lock:
                if setup is not None:
                    run_fused(setup, query, gallery, out, self.folders.out / "fusion-index", fusion=request.fusion,
                              hand=request.hand, top_k=top_k, target_fmr=request.target_fmr, device=self.device)
                else:
                    model.identify(query, gallery, top_k=top_k, target_fmr=request.target_fmr, out=out,
                                   index=self.index_of(model, gallery), pictures=False, overwrite=True,
                                   gallery_mode=request.gallery_mode)
            parts.append(json.loads((out / "results.json").read_text()))
            labels += [label_of_copy(r["query"]) for r in parts[-1]["queries"]]
            if progress is not None:
                progress(min(start + size, len(uploads)), len(uploads))
        result = parts[0]
        if whole:
            files_out = {"json": folder / "results" / "results.json", "csv": folder / "results" / "results.csv"}
        else:  # one set of results files for the whole batch, written as identify writes them
            result = {**result, "queries": [r for p in parts for r in p["queries"]],
                      "skipped_queries": [s for p in parts for s in p["skipped_queries"]]}
            result.pop("summary", None)
            files_out = write_results(result, folder / "results", overwrite=False, pictures=False, progress=False)
        messages += [f"{label_of_copy(s['query'])}: could not be read" for s in result["skipped_queries"]]
        outcome = Outcome(result=result, labels=labels, files=files_out, messages=messages,  # fused: no band
                          band=None if setup else self._band(result["threshold"],
                                                             result.get("mode", {}).get("decision_mode", "max")))
        outcome.thumbs = [self._thumb(Path(r["query"]), folder / "thumbs") for r in outcome.records]
        return outcome

    @staticmethod
    def _band(threshold: dict, mode: str = "max") -> Band:
        """The decision band from the levels the calibration file lists for the decision mode."""
        levels = None
        source = Path(str(threshold.get("source", "")))
        if source.suffix == ".json" and source.is_file():
            try:
                calibration = read_calibration(source)
            except HandCLIPError:
                calibration = {}
            levels = (calibration if mode == "max" else (calibration.get("modes") or {}).get(mode) or {}).get("levels")
        return band(threshold, levels)

    def _thumb(self, image: Path, folder: Path) -> Path | None:
        """A thumbnail of ``image`` (a query copy or a gallery photo), kept by the image's path and time."""
        try:
            st = image.stat()
            key = hashlib.sha256(f"{image}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
            out = folder / f"{key}.jpg"
            return out if out.is_file() else thumbnail(image, out)
        except (OSError, HandCLIPError):
            return None

    def tiles(self, outcome: Outcome, request: Request) -> list[tuple[str, str]]:
        """(thumbnail, caption) for each photo and its top-k people's best-matching gallery photo."""
        gallery = self.gallery(request.gallery)
        out: list[tuple[str, str]] = []
        thumbs = self.folders.out / "thumbs"
        with galleries.reading(gallery):
            for label, thumb, record in zip(outcome.labels, outcome.thumbs, outcome.records):
                if thumb is not None:
                    out.append((str(thumb), f"{label} → {record['decision']}"))
                for t in record["top"]:
                    tile = self._thumb(Path(t["file"]), thumbs)
                    if tile is not None:
                        out.append((str(tile), f"{t['rank']}. {t['identity']} {t['score']:.3f}"))
        return out

    # -- enrol -------------------------------------------------------------------------------------------------
    def people(self, gallery_label: str) -> dict[str, list[str]]:
        gallery = self.gallery(gallery_label)
        with galleries.reading(gallery):
            return galleries.people(gallery)

    def _update_index(self, model_label: str | None, gallery: Path) -> str:
        """Bring the chosen model's index of ``gallery`` up to date (only new photos embedded); hold writing()."""
        if not model_label:
            return "no model chosen: the index is updated on the next identify"
        model = self.model(model_label)
        try:
            files = scan_gallery(gallery)
        except HandCLIPError as err:
            return f"index not updated: {err}"
        index = open_index(self.index_of(model, gallery), gallery, files, model.embedder, model.model, model.device,
                           "float16", progress=True)
        s = index.status
        return (f"index {s['status']}: {s.get('embedded', 0)} photo(s) embedded, {s.get('reused_rows', s['rows'])} "
                f"reused, {s['rows']} in all")

    def enrol(self, gallery_label: str, person: str, files: list, model_label: str | None) -> str:
        person = galleries.check_person(person)
        uploads, messages = check_uploads(files, self.limits, self.limits.max_files)
        if not uploads:
            raise HandCLIPError("; ".join(messages) or "no photo given: upload one or more photos of the person")
        gallery = self.gallery(gallery_label)
        with galleries.writing(gallery):
            galleries.clean_removed(gallery)
            written, present = galleries.add_photos(gallery, person, uploads)
            status = self._update_index(model_label, gallery)
        text = f"{printable(person)}: {len(written)} photo(s) added"
        text += f", {present} already there" if present else ""
        return "; ".join([text, status, *messages])

    def remove_photo(self, gallery_label: str, person: str, photo: str, model_label: str | None) -> str:
        gallery = self.gallery(gallery_label)
        with galleries.writing(gallery):
            galleries.remove_photo(gallery, person, photo)
            status = self._update_index(model_label, gallery)
        return f"{printable(person)}: photo {printable(photo)} removed; {status}"

    def remove_person(self, gallery_label: str, person: str, model_label: str | None) -> str:
        gallery = self.gallery(gallery_label)
        with galleries.writing(gallery):
            count = galleries.remove_person(gallery, person)
            status = self._update_index(model_label, gallery)
        return f"{printable(person)} removed ({count} photo(s)); {status}"

    # -- explore -----------------------------------------------------------------------------------------------
    def evaluation(self, model_label: str) -> tuple[str, list[tuple[str, str]]]:
        """The comparison table (markdown) and the pictures (CMC, ROC/DET, rankings, training curves) of the
        evaluation results next to the chosen model."""
        choice = self.choice(model_label)
        hand = choice.hand
        tables, pictures = [], []
        folder = _eval_folder(choice)
        if folder is not None and folder.resolve() in [f.resolve() for f in self.folders.evaluations()]:
            table = folder / "comparison.md"
            if table.is_file():
                tables.append(table.read_text())
            names = ["comparison_roc_det.png"] + ([f"comparison_cmc_{hand}.png", f"comparison_ranking_{hand}.png"]
                                                  if hand else sorted(p.name for p in folder.glob("comparison_*.png")))
            pictures += [(str(folder / n), n.removesuffix(".png")) for n in dict.fromkeys(names)
                         if (folder / n).is_file()]
        if choice.kind == "checkpoint" and (choice.path.parents[1] / "curves.png").is_file():
            pictures.append((str(choice.path.parents[1] / "curves.png"), "training curves"))
        if not tables:
            tables.append("No evaluation results for this model yet: `python -m handclip.eval all=true` writes them "
                          "(outputs/eval/comparison.md, CMC, ROC/DET).")
        return "\n\n".join(tables), pictures


def _eval_folder(choice: ModelChoice) -> Path | None:
    """Where ``eval`` wrote the results that compare this model: ``<root>/eval`` beside ``<root>/train``."""
    if choice.kind == "zero-shot":
        return choice.calibration.parent if choice.calibration else None
    source = choice.path if choice.kind == "checkpoint" else choice.calibration
    parts = source.parts if source is not None else ()
    if "train" not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index("train")
    return Path(*parts[:at]) / "eval"
