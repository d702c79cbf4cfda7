"""The hand-type classifier: a linear probe on one model's image embedding that tells a photo's hand type
(dorsal/palmar, right/left), so that identify can route a photo to the model of its hand type.

    python -m handclip.identify task=train_hand_type            # writes outputs/train/hand_type/hand_type.json

(training: :mod:`handclip.identify.hand_training`).

It is multinomial logistic regression (a ``torch.nn.Linear`` layer trained full-batch with L-BFGS and an L2
penalty, as scikit-learn's ``LogisticRegression`` does, on standardised features) on the L2-normalised embeddings
of the four hand types' ``train`` photos (11k layout under ``paths.data_dir``), its accuracy measured on their
``val`` photos.

Routing happens before the hand type is known, so one model embeds every photo: the zero-shot model given by
``model`` (CLIP's general image features, which exist before any fine-tuning; a fine-tuned checkpoint is trained on
one hand type to keep identity only), or ``ckpt_path=`` (one named checkpoint). The file keeps the weights, the
class names, that model (what it is and its fingerprint: another model is refused), the val figures and
``min_confidence``: a photo whose predicted probability is below it is not guessed; identify asks for its hand
type instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from handclip import __version__
from handclip.errors import HandCLIPError
from handclip.identify.images import embed_files, report_failures
from handclip.utils.files import write_file

log = logging.getLogger(__name__)

FORMAT = 1
_MARK = "handclip_hand_type_classifier"
#: The level used when training is not given one (hand_classifier.min_confidence=null).
DEFAULT_MIN_CONFIDENCE = 0.9
TRAIN_COMMAND = "python -m handclip.identify task=train_hand_type"


@dataclass
class HandClassifier:
    """A trained probe: ``weight`` (C, D), ``bias`` (C,), ``classes`` (hand types) and what it was made with."""

    weight: torch.Tensor
    bias: torch.Tensor
    classes: list[str]
    model: dict
    """``key`` (the model, as identify's index names it), ``fingerprint``, ``seed`` (random-weight models)."""
    min_confidence: float
    figures: dict

    @torch.inference_mode()
    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, C) float64 class probabilities of L2-normalised embeddings."""
        logits = embeddings.to(torch.float64) @ self.weight.to(torch.float64).T + self.bias.to(torch.float64)
        return torch.softmax(logits, dim=1)

    def predict(self, embeddings: torch.Tensor) -> list[tuple[str, float]]:
        """(hand type, its probability) per row: the most probable class (the first of equals)."""
        probs = self.probabilities(embeddings)
        best, label = probs.max(dim=1)
        return [(self.classes[int(i)], float(p)) for i, p in zip(label, best)]

    def confident(self, probability: float) -> bool:
        """A prediction is used when its probability reaches ``min_confidence`` (equal counts as reached)."""
        return probability >= self.min_confidence


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-3,
              max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features (each dimension centred and scaled to unit
    variance, as scikit-learn's StandardScaler does, so that the penalty weighs every dimension alike): mean
    cross-entropy + ``weight_decay`` x ||W||^2 / 2 minimised full-batch by L-BFGS (strong Wolfe line search) from
    zero, in float64, so the same data give the same weights. The scaling is folded into the returned
    ``(weight, bias)``, which apply to the features as given."""
    raw = features.to(torch.float64)
    mean, std = raw.mean(dim=0), raw.std(dim=0, correction=0).clamp_min(1e-12)
    x = (raw - mean) / std
    y = torch.as_tensor(labels, dtype=torch.long)
    layer = torch.nn.Linear(x.shape[1], num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x), y) + 0.5 * weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight = layer.weight.detach() / std
    bias = layer.bias.detach() - weight @ mean
    return weight.to(torch.float32), bias.to(torch.float32)


def val_figures(clf: HandClassifier, embeddings: torch.Tensor, labels: list[int]) -> dict:
    """Accuracy on val, and at ``min_confidence``: the share of photos routed (coverage) and their accuracy."""
    predicted = clf.predict(embeddings)
    right = [clf.classes[y] == h for (h, _), y in zip(predicted, labels)]
    routed = [r for r, (_, p) in zip(right, predicted) if clf.confident(p)]
    n = len(labels)
    return {"val_accuracy": sum(right) / n, "val_images": n, "val_coverage": len(routed) / n,
            "val_accuracy_routed": sum(routed) / len(routed) if routed else None,
            "val_per_class": {h: sum(r for r, y in zip(right, labels) if y == c) / max(1, labels.count(c))
                              for c, h in enumerate(clf.classes)}}


# -- the file -------------------------------------------------------------------------------------
def save_classifier(clf: HandClassifier, out: Path, overwrite: bool) -> Path:
    data = {_MARK: FORMAT, "classes": clf.classes, "model": clf.model, "min_confidence": clf.min_confidence,
            "figures": clf.figures, "weight": clf.weight.tolist(), "bias": clf.bias.tolist(),
            "handclip_version": __version__}
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    return write_file(out, overwrite, lambda tmp: tmp.write_text(text), "hand-type classifier")


def load_classifier(path: str | Path) -> HandClassifier:
    """Read a classifier file; one error line when it is missing or not one."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise HandCLIPError(f"hand-type classifier {str(path)!r} not found; train it with `{TRAIN_COMMAND}` (on the "
                            "11k layout of paths.data_dir), or give each photo's hand type (query_hand=, or hand-type "
                            "folders)")
    try:
        data = json.loads(path.read_text())
        if data.get(_MARK) != FORMAT:
            raise ValueError(f"format {data.get(_MARK)!r}, expected {FORMAT}")
        weight = torch.tensor(data["weight"], dtype=torch.float32)
        bias = torch.tensor(data["bias"], dtype=torch.float32)
        if weight.shape[0] != len(data["classes"]) or bias.shape != (len(data["classes"]),):
            raise ValueError("its weights do not match its classes")
        return HandClassifier(weight, bias, list(data["classes"]), dict(data["model"]),
                              float(data["min_confidence"]), dict(data["figures"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise HandCLIPError(f"{str(path)!r} is not a HandCLIP hand-type classifier ({err}); train one with "
                            f"`{TRAIN_COMMAND}`") from None


# -- routing --------------------------------------------------------------------------------------
def classifier_cfg(cfg: DictConfig, clf: HandClassifier) -> DictConfig:
    """``cfg`` with the model the classifier was trained on (its checkpoint, or the zero-shot model and seed)."""
    key = clf.model["key"]
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.ckpt_path = key.get("checkpoint")
    if not key.get("checkpoint"):
        out.model.model_name, out.model.pretrained = key["zero_shot"], key.get("pretrained")
        out.seed = int(clf.model.get("seed", cfg.seed))
    return out


def predict_hands(cfg: DictConfig, photos: list[Path], device, load_embedder) -> dict[Path, tuple[str, float]]:
    """The hand type of each photo by the classifier of ``hand_classifier.path`` (its model loaded by
    ``load_embedder``, :func:`handclip.identify.run.load_embedder`); an error naming the photos whose prediction is
    below the confidence level (never a guess); unreadable photos left out (warned)."""
    clf = load_classifier(cfg.hand_classifier.path)
    if cfg.hand_classifier.min_confidence is not None:
        clf.min_confidence = float(cfg.hand_classifier.min_confidence)
    embedder, model, _ = load_embedder(classifier_cfg(cfg, clf), device)
    if model.fingerprint != clf.model["fingerprint"]:
        raise HandCLIPError(f"hand-type classifier {str(cfg.hand_classifier.path)!r} was trained on other weights "
                            f"of {json.dumps(clf.model['key'])} than these; train it again with `{TRAIN_COMMAND}`")
    done = embed_files(embedder, photos, device, int(cfg.batch_size), cfg.num_workers, bool(cfg.progress),
                       desc="hand type: embedding")
    report_failures([(photos[i], msg) for i, msg in done.failed], "query")
    predicted = dict(zip([photos[i] for i in done.rows], clf.predict(done.embeddings)))
    unsure = [(p, h, prob) for p, (h, prob) in predicted.items() if not clf.confident(prob)]
    if unsure:
        named = "; ".join(f"{str(p)!r} (best guess {h}, probability {prob:.3f})" for p, h, prob in unsure[:5])
        more = f" and {len(unsure) - 5} more" if len(unsure) > 5 else ""
        raise HandCLIPError(f"the hand type of {len(unsure)} photo(s) is uncertain (below min_confidence "
                            f"{clf.min_confidence:g}): {named}{more}; give it with query_hand=HAND or put the photo "
                            f"in a folder named by its hand type ({', '.join(clf.classes)})")
    return predicted
