"""The HandCLIP LightningModule: an image encoder (CLIP's image tower) plus a linear identity classifier.

The default recipe is cross-entropy with AdamW and no scheduler. Opt-in recipe options (README, "Recipes"): a
BNNeck between embedding and classifier (``neck="bnneck"``), label smoothing, a batch-hard triplet loss
(``triplet_margin``; with ``data.sampler=pk``), a linear warm-up (``warmup_epochs``), a separate head lr
(``head_lr``) and flip test-time augmentation (``tta``, carried by the encoder).
"""

from __future__ import annotations

import math
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from handclip.errors import HandCLIPError
from handclip.metrics import compute_reid_metrics
from handclip.models.clip import create_clip, freeze_text_tower, preprocess_config
from handclip.models.encoder import BNNeck, ImageEncoder, check_choice
from handclip.models.losses import batch_hard_triplet_loss
from handclip.models.metadata import META_KEY, checkpoint_metadata
from handclip.models.migrate import upgrade_state_dict

# The val figures are computed from embeddings gathered across processes: every process logs the same
# value, so Lightning's advice to average them across processes (sync_dist) does not apply.
warnings.filterwarnings("ignore", message=r".*self\.log\('val/(loss|acc|rank1)'.*sync_dist=True")

#: Training losses are checked for NaN/inf (one host sync) at least this often, in steps.
NONFINITE_CHECK_EVERY = 50


def _number(setting: str, value, positive: bool = False) -> float:
    """A finite number >= 0 (> 0 when ``positive``) from the config, or an error naming the setting."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise HandCLIPError(f"{setting} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return number


#: The neck between embedding and classifier: none (the default) or the bag-of-tricks BNNeck.
NECKS = ("none", "bnneck")
#: The warm-up starts at this fraction of the lr and rises linearly to it (CLIP-ReID's warm-up factor 0.1).
WARMUP_START_FACTOR = 0.1


def _optional_number(setting: str, value, positive: bool = False) -> float | None:
    return None if value is None else _number(setting, value, positive)


#: Param-group settings that choose how AdamW runs on this device, not what it computes.
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def adamw_implementation(device: torch.device) -> dict:
    """How AdamW runs on ``device``: fused kernels on CUDA, torch's default elsewhere."""
    return {"fused": True} if device.type == "cuda" else {}


def _keep_implementation(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Resuming keeps this run's AdamW implementation (e.g. fused on CUDA) whatever device the checkpoint came
    from: ``load_state_dict`` would otherwise restore the saved groups' ``fused=None`` of a CPU run."""
    groups = [dict(saved) for saved in state_dict.get("param_groups", [])]
    for saved, current in zip(groups, optimizer.param_groups):
        saved.update({k: current[k] for k in IMPLEMENTATION_KEYS if k in current})
    return {**state_dict, "param_groups": groups}


class HandCLIPModule(pl.LightningModule):
    """Fine-tunes only the image tower of an open_clip model with cross-entropy over identities.

    The whole open_clip model (both towers) is built. Its image tower becomes :attr:`encoder` (with
    the model's preprocessing); the text tower and the logit scale are frozen and never called. The
    whole model stays reachable as :attr:`clip`, but it is deliberately not a registered submodule:
    the text tower is therefore not optimised, not saved in checkpoints and not moved to the
    accelerator. Inputs are ``uint8`` crops; the encoder normalises them on the model's device.

    Nothing that loads a checkpoint needs the text tower, so a module built for a checkpoint
    (``load_pretrained=False``: resuming, evaluating) is built without fetching pretrained weights, and
    its :attr:`clip` then holds a randomly initialised text tower. Only the open_clip export uses the
    text tower: it rebuilds it from the checkpoint's ``pretrained`` source (:mod:`handclip.models.open_clip_export`).
    """

    def __init__(
        self,
        classes: list[str],
        hand: str,
        model_name: str = "ViT-B-32-quickgelu",
        pretrained: str | None = "openai",
        cache_dir: str | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.01,
        compile: bool = False,
        load_pretrained: bool = True,
        neck: str = "none",
        neck_feature: str = "before",
        label_smoothing: float = 0.0,
        triplet_margin: float | None = None,
        triplet_weight: float = 1.0,
        triplet_soft: bool = False,
        warmup_epochs: float = 0,
        head_lr: float | None = None,
        tta: str = "none",
    ):
        """``load_pretrained=False`` builds the architecture without fetching ``pretrained`` (whose
        preprocessing is still used): for weights that come from a checkpoint, e.g.
        ``HandCLIPModule.load_from_checkpoint(path, load_pretrained=False)``.

        Recipe options (all off by default): ``neck="bnneck"`` (``neck_feature``: the test feature, "before" or
        "after" the BN), ``label_smoothing`` (cross-entropy's), ``triplet_margin`` (a batch-hard triplet loss on
        the tower's features, added with ``triplet_weight``; ``triplet_soft``: soft margin), ``warmup_epochs``
        (linear warm-up of every lr, per step), ``head_lr`` (the classifier's and neck's lr), ``tta`` ("flip")."""
        super().__init__()
        classes = [str(c) for c in classes]
        lr, weight_decay = _number("model.lr", lr, positive=True), _number("model.weight_decay", weight_decay)
        neck = check_choice("model.neck", neck, NECKS)
        label_smoothing = _number("model.label_smoothing", label_smoothing)
        if label_smoothing >= 1:
            raise HandCLIPError(f"model.label_smoothing must be in [0, 1), got {label_smoothing!r}")
        triplet_margin = _optional_number("model.triplet_margin", triplet_margin)
        triplet_weight = _number("model.triplet_weight", triplet_weight)
        warmup_epochs = _number("model.warmup_epochs", warmup_epochs)
        head_lr = _optional_number("model.head_lr", head_lr, positive=True)
        if len(classes) < 2:
            raise HandCLIPError(f"need at least 2 training identities, got {len(classes)}")
        # Plain values only: checkpoints load with torch's weights_only unpickler.
        self.save_hyperparameters(
            {
                "classes": classes,
                "hand": str(hand),
                "model_name": str(model_name),
                "pretrained": None if pretrained is None else str(pretrained),
                "cache_dir": None if cache_dir is None else str(cache_dir),
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "compile": bool(compile),
                "neck": neck,
                "neck_feature": str(neck_feature),
                "label_smoothing": label_smoothing,
                "triplet_margin": triplet_margin,
                "triplet_weight": triplet_weight,
                "triplet_soft": bool(triplet_soft),
                "warmup_epochs": warmup_epochs,
                "head_lr": head_lr,
                "tta": str(tta),
            }
        )
        clip = create_clip(model_name, pretrained if load_pretrained else None, cache_dir)
        freeze_text_tower(clip)
        visual = clip.visual
        width = ImageEncoder(visual, preprocess_config(model_name, pretrained)).output_dim
        self.encoder = ImageEncoder(visual, preprocess_config(model_name, pretrained),
                                    neck=BNNeck(width) if neck == "bnneck" else None, feature=neck_feature, tta=tta)
        self.__dict__["_clip"] = clip  # not a submodule on purpose (see the class docstring)
        # BNNeck: the classifier has no bias (BoT)
        self.head = nn.Linear(width, len(classes), bias=neck != "bnneck")
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # validate_args=False: the argument checks read the labels on the host (a sync every step)
        self.train_acc = MulticlassAccuracy(num_classes=len(classes), average="micro", validate_args=False)
        if compile:
            self.encoder.compile_tower()
        self._val_outputs: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._unchecked_losses: list[tuple[torch.Tensor, int, int, int]] = []

    @property
    def classes(self) -> list[str]:
        return list(self.hparams.classes)

    @property
    def clip(self) -> nn.Module:
        """The whole open_clip model: the frozen text tower and this module's image tower."""
        return self.__dict__["_clip"]

    # -- forward -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Identity logits of a batch of uint8 crops."""
        return self.classify(self.encoder.features(images))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Identity logits of the tower's features (through the BNNeck when there is one)."""
        neck = self.encoder.neck
        return self.head(features if neck is None else neck(features))

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.hparams.get("triplet_margin") is None:
            logits = self(images)
        else:  # the triplet loss takes the tower's features: computed once for both losses
            features = self.encoder.features(images)
            logits = self.classify(features)
        loss = self.loss_fn(logits, labels)
        if self.hparams.get("triplet_margin") is not None:
            triplet = batch_hard_triplet_loss(features, labels, self.hparams.triplet_margin, self.hparams.triplet_soft)
            self.log("train/triplet", triplet, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=True)
            loss = loss + self.hparams.triplet_weight * triplet
        # No host sync per step: the losses are checked for NaN/inf every NONFINITE_CHECK_EVERY steps, before
        # each validation and at each epoch end (before any checkpoint of that epoch is written).
        self._unchecked_losses.append((loss.detach(), self.global_step, self.current_epoch, batch_idx))
        if len(self._unchecked_losses) >= NONFINITE_CHECK_EVERY:
            self.check_losses_finite()
        self.train_acc(logits, labels)
        # sync_dist: under DDP, the mean over every process's images (a no-op on one process). Not prog_bar: Lightning
        # would read it back from the device after every step; the progress bar reads it when it redraws.
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(labels), sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def check_losses_finite(self) -> None:
        """Stop, naming the first step, if a training loss since the last check was NaN or infinite (one sync)."""
        pending, self._unchecked_losses = self._unchecked_losses, []
        if not pending:
            return
        finite = torch.isfinite(torch.stack([loss for loss, *_ in pending])).tolist()
        if all(finite):
            return
        loss, step, epoch, batch_idx = pending[finite.index(False)]
        # fp32 already: only the lr is left to try
        full = "32" in str(getattr(self._attached_trainer(), "precision", "32"))
        raise HandCLIPError(
            f"training loss became {loss.item()} at global step {step} "
            f"(epoch {epoch}, batch {batch_idx}); stopping. Try a lower model.lr"
            f"{'' if full else ' or trainer.precision=32-true'}."
        )

    def on_validation_start(self) -> None:
        self.check_losses_finite()

    def on_train_epoch_end(self) -> None:
        self.check_losses_finite()

    def on_train_end(self) -> None:
        self.check_losses_finite()

    def configure_optimizers(self):
        """AdamW over the image tower, the neck and the head; no scheduler unless a warm-up is asked for (then a
        per-step linear one from ``WARMUP_START_FACTOR`` x lr). With ``head_lr``, the head and the neck form a
        second parameter group with that lr."""
        tower = [p for p in self.encoder.visual.parameters() if p.requires_grad]
        in_tower = {id(p) for p in self.encoder.visual.parameters()}
        added = [p for p in self.encoder.parameters() if p.requires_grad and id(p) not in in_tower]
        added += [p for p in self.head.parameters() if p.requires_grad]
        head_lr = self.hparams.get("head_lr")
        params = tower + added if head_lr is None else [{"params": tower}, {"params": added, "lr": head_lr}]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                      **adamw_implementation(self.device))
        optimizer.register_load_state_dict_pre_hook(_keep_implementation)
        if not self.hparams.get("warmup_epochs"):
            return optimizer
        warmup_steps = max(1, round(self.hparams.warmup_epochs * self._steps_per_epoch()))
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, end_factor=1.0,
                                                   total_iters=warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def _steps_per_epoch(self) -> float:
        trainer = self._attached_trainer()
        if trainer is None or not trainer.max_epochs or trainer.max_epochs < 1:
            return 1.0
        return max(1.0, trainer.estimated_stepping_batches / trainer.max_epochs)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Besides the weights: the preprocessing and the logged figures (:mod:`handclip.models.metadata`)."""
        trainer = self._attached_trainer()
        metrics = trainer.callback_metrics if trainer is not None else {}
        checkpoint[META_KEY] = checkpoint_metadata(self.encoder.preprocess, metrics)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints of earlier versions keep the image tower under ``clip.visual.``: map them."""
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])

    # -- validation: loss and accuracy on val, rank-1 of val against the training images -------
    # The figures are those of the whole val set against the whole training set, on one process or many:
    # embeddings (with labels and dataset indices) are gathered from every process at the end of the
    # epoch, put back in dataset order with the padding duplicates of a DistributedSampler dropped, and
    # every process computes the same values from them.
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = {0: [], 1: []}

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """``batch``: (uint8 images, labels[, dataset indices]); loader 0 is val, loader 1 the training images."""
        images, labels, *index = batch
        outputs = self._val_outputs[dataloader_idx]
        if index:
            index = index[0]
        elif self._world_size() > 1:
            raise RuntimeError("under DDP, validation batches must carry their dataset indices (images, labels, index)")
        else:  # one process, in order: positions
            start = sum(len(o[1]) for o in outputs)
            index = torch.arange(start, start + len(labels), device=labels.device)
        features = self.encoder.features(images)
        embedding = self.encoder.embed(images, features=features)
        # the classifier's input is kept for val/loss when the test embedding differs from it (TTA, post-BN)
        extra = (features.detach().float(),) if dataloader_idx == 0 and embedding is not features else ()
        outputs.append((embedding.detach().float(), labels, index, *extra))

    def _world_size(self) -> int:
        trainer = self._attached_trainer()
        return trainer.world_size if trainer is not None else 1

    def _attached_trainer(self) -> pl.Trainer | None:
        """The Trainer running this module, or None outside one (Lightning's public ``trainer`` raises then)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def _gathered(self, outputs: list[tuple[torch.Tensor, ...]]):
        """(embeddings, labels[, classifier inputs]) of every process, in dataset order, each dataset index once."""
        embeddings, labels, index, *extra = (torch.cat(t) for t in zip(*outputs))
        if self._world_size() > 1:
            embeddings, labels, index, *extra = (self.all_gather(t).flatten(0, 1)
                                                 for t in (embeddings, labels, index, *extra))
        index, order = torch.sort(index, stable=True)
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        order = order[first]
        return (embeddings[order], labels[order], *(t[order] for t in extra))

    def on_validation_epoch_end(self) -> None:
        outputs, self._val_outputs = self._val_outputs, {}
        if not outputs.get(0) or not outputs.get(1):
            return
        query, query_labels, *classifier_input = self._gathered(outputs[0])
        gallery, gallery_labels, *_ = self._gathered(outputs[1])
        logits = self.classify(classifier_input[0] if classifier_input else query)
        rank1 = compute_reid_metrics(query, query_labels, gallery, gallery_labels, ranks=(1,))["rank1"]
        log = {"add_dataloader_idx": False}
        self.log("val/loss", self.loss_fn(logits, query_labels), prog_bar=True, **log)
        self.log("val/acc", (logits.argmax(dim=1) == query_labels).float().mean(), **log)
        self.log("val/rank1", rank1, prog_bar=True, **log)
