"""Identify across hand types from the app: the Identify tab's ``fusion`` choice (off | mean | max) and the hand
type of the uploaded photos (auto | a hand type), handed to :func:`handclip.identify_fused` as they are.

The choice is offered for a gallery laid out ``<person>/<hand type>/<photo>`` when one models root (the app's
``models_root``, or a folder of runs under it such as ``outputs/demo``) holds ``train/<hand>/checkpoints/best.ckpt``
for every hand type of the gallery. From that root come the hand-type classifier (``train/hand_type/hand_type.json``)
and the fused calibration (``train/fusion.calibration.json``). Identify decides everything (routing, refusing an
uncertain hand type, fusing, thresholds); this module only finds the files and words the answer for the page.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from handclip.app.models import run_roots
from handclip.errors import HandCLIPError
from handclip.hands import ELEVEN_K_HANDS, HAND_TYPES
from handclip.identify.hand_classifier import TRAIN_COMMAND
from handclip.identify.hand_sources import scan_hand_gallery
from handclip.utils.files import slug

FUSIONS = ("off", "mean", "max")
#: the hand type of the uploaded photos: auto (the classifier) or one of the hand types
HANDS = ("auto", *ELEVEN_K_HANDS)
FUSED_HEADERS = ["photo", "hand type", "rank", "person", "fused score", "hand types used", "decision", "threshold"]
PICK = "pick the hand type of the photos (“Hand type of the photos”) and identify again"


@dataclass(frozen=True)
class FusionSetup:
    """Where fused identify finds its files for one gallery."""

    root: Path
    models: dict[str, Path]
    hands: list[str]  # the gallery's hand types

    @property
    def classifier(self) -> Path:
        return self.root / "train" / "hand_type" / "hand_type.json"

    @property
    def calibration(self) -> Path:
        return self.root / "train" / "fusion.calibration.json"


def fusion_setup(models_root: Path, gallery: Path) -> FusionSetup | None:
    """The setup for ``gallery``, or None when fusion is not offered (not a hand-type gallery, or no root with a
    fine-tuned model for each of its hand types)."""
    try:
        hands = list(scan_hand_gallery(gallery))
    except HandCLIPError:
        return None
    for base in run_roots(Path(models_root).expanduser().resolve()):
        models = {h: base / "train" / h / "checkpoints" / "best.ckpt" for h in HAND_TYPES}
        models = {h: p for h, p in models.items() if p.is_file()}
        if all(h in models for h in hands):
            return FusionSetup(base, models, hands)
    return None


def run_fused(setup: FusionSetup, query: Path, gallery: Path, out: Path, index_root: Path, *, fusion: str,
              hand: str | None, top_k: int, target_fmr: float | None, device: str) -> None:
    """:func:`handclip.identify_fused` on the request's photos; results.json/csv written to ``out``."""
    import handclip

    if fusion not in FUSIONS[1:]:
        raise HandCLIPError(f"fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")
    given = None if hand in (None, "", "auto") else hand
    if given is not None and given not in HAND_TYPES:
        raise HandCLIPError(f"hand type {hand!r}: expected one of {', '.join(HANDS)}")
    if given is None and not setup.classifier.is_file():
        raise HandCLIPError(f"no hand-type classifier ({str(setup.classifier)!r} not found), so the photos' hand type "
                            f"is not known: {PICK} (or train the classifier: `{TRAIN_COMMAND}`)")
    digest = hashlib.sha256(str(gallery).encode()).hexdigest()[:12]
    try:
        handclip.identify_fused(query, gallery, fusion=fusion, models=setup.models, query_hand=given,
                                hand_classifier=setup.classifier, calibration=setup.calibration,
                                target_fmr=target_fmr, top_k=top_k, out=out, overwrite=True, device=device,
                                index=index_root / f"{slug(gallery.name, default='gallery')}-{digest}")
    except HandCLIPError as err:
        if given is None and "query_hand=" in str(err):  # the classifier was not sure: never a guess
            raise HandCLIPError(f"{err} — here: {PICK}") from err
        raise


def fused_rows(labels: list[str], records: list[dict]) -> list[list]:
    """Per photo and person: the fused score, the number of hand types used; the decision beside the first."""
    rows = []
    for label, r in zip(labels, records):
        routed = ", ".join(f"{x['hand_type']} ({x['source']}"
                           + (f" {x['probability']:.2f})" if x.get("probability") is not None else ")")
                           for x in r.get("routing", []))
        for t in r["top"]:
            first = t["rank"] == 1
            rows.append([label, routed if first else "", t["rank"], t["identity"], round(t["score"], 4),
                         t["hand_types_used"], r["decision"] if first else "",
                         round(r["threshold"], 4) if first else ""])
    return rows


def fused_text(result: dict, labels: list[str]) -> str:
    """The decision line per photo, under the fused threshold's source."""
    lines = [f"Fused over hand types ({result['fusion']}); threshold: {result['threshold']['source']}", ""]
    for label, r in zip(labels, result["queries"]):
        n = r["hand_types_used"]
        sign = "≥" if r["accepted"] else "<"
        lines.append(f"- {label}: **{r['decision']}** (fused score {r['score']:.3f} over {n} hand type"
                     f"{'s' if n != 1 else ''} {sign} threshold {r['threshold']:.3f})")
    return "\n".join(lines)
