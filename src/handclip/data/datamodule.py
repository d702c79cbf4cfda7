"""The HandCLIP LightningDataModule: train/val (and test query/gallery) images of one hand type."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from open_clip.transform import PreprocessCfg
from torch.utils.data import DataLoader, Dataset

from handclip.data import layout
from handclip.data.cache import cached_crops
from handclip.data.datasets import DeviceBatchLoader, ImageDataset, TensorImageDataset, batch_collate
from handclip.data.images import ImageLoader
from handclip.errors import HandCLIPError
from handclip.hands import HAND_TYPES, check_hand, hand_dir_name

log = logging.getLogger(__name__)


@dataclass
class TestImages:
    """Every distinct test image of a hand type, and each Monte Carlo run as indices into them."""

    paths: list[Path]
    identities: list[str]
    runs: list[dict]
    """One dict per run: ``name``, ``query`` and ``gallery`` (lists of indices into ``paths``)."""


class HandDataModule(pl.LightningDataModule):
    """Images and identity labels of one hand type, with open_clip's own preprocessing.

    ``preprocess`` is the model's (``encoder.preprocess``, or ``preprocess_config(model_name,
    pretrained)``). Batches hold ``uint8`` crops (resize + center crop already applied); the model
    normalises them on its device. With ``cache=True`` each split is decoded once into an on-disk cache.
    """

    def __init__(
        self,
        root: str,
        hand: str,
        preprocess: PreprocessCfg,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache: bool = True,
        cache_dir: str | None = None,
        cache_workers: int | None = None,
        device_batches: bool | str = "auto",
        progress: bool = True,
    ):
        super().__init__()
        check_hand(hand)
        if batch_size < 1 or eval_batch_size < 1:
            raise HandCLIPError(
                f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
        for setting, value in (("num_workers", num_workers), ("cache_workers", cache_workers)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise HandCLIPError(f"data.{setting} must be a whole number >= 0 (0: in this process), got {value!r}")
        if device_batches not in (True, False, "auto"):
            raise HandCLIPError(f"data.device_batches must be true, false or auto, got {device_batches!r}")
        if cache and not cache_dir:
            raise HandCLIPError("data.cache=true needs data.cache_dir (a folder for decoded crops)")
        self.root = Path(root)
        self.hand = hand
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache_workers = cache_workers
        self.device_batches = device_batches
        self._on_device: dict[Dataset, tuple] = {}
        self.progress = progress
        self.preprocess = preprocess
        self.loader = ImageLoader(preprocess)
        self.classes: list[str] | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    # -- listing -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.classes is not None:
            return
        train = layout.list_split(self.root, self.hand, "train")
        classes = layout.class_mapping(train)
        if len(classes) < 2:
            raise HandCLIPError(
                f"{self.root / hand_dir_name(self.hand) / 'train'} holds {len(classes)} identity; "
                "training a classifier needs at least 2 training identities"
            )
        val_all = layout.list_split(self.root, self.hand, "val")
        val = layout.drop_unknown_identities(val_all, classes, "val")
        if not val:
            raise HandCLIPError(
                f"none of the {len(val_all)} images in {self.root / hand_dir_name(self.hand) / 'val'} belongs "
                "to a training identity (folder names must match those in train/)"
            )
        index = {c: i for i, c in enumerate(classes)}
        self.classes = classes
        self.train_set = self._dataset([s.path for s in train], [index[s.identity] for s in train], "train")
        self.val_set = self._dataset([s.path for s in val], [index[s.identity] for s in val], "val")
        log.info("%s: %d classes, %d train and %d val images", self.hand, len(classes), len(train), len(val))

    def _dataset(self, paths: list[Path], labels: list[int], desc: str) -> Dataset:
        if not self.cache:
            return ImageDataset(paths, labels, self.loader)
        images = cached_crops(
            paths, self.loader, self.cache_dir, num_workers=self.cache_workers, progress=self.progress,
            desc=f"{self.hand}/{desc}",
        )
        return TensorImageDataset(images, labels)

    # -- loaders -------------------------------------------------------------------------------
    def _device(self):
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else None

    def _use_device_batches(self, dataset: Dataset) -> bool:
        """Cached crops go to the device when asked, or (auto) on CUDA when they take < 1/4 of free memory."""
        if not isinstance(dataset, TensorImageDataset) or self.device_batches is False:
            return False
        if self.device_batches is True:
            return True
        device = self._device()
        if device is None or device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        return dataset.images.numel() < free // 4

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool):
        if self._use_device_batches(dataset):
            device = self._device() or "cpu"
            if dataset not in self._on_device:  # train and the val/rank1 gallery share one copy
                self._on_device[dataset] = (dataset.images.to(device), dataset.labels.to(device))
            images, labels = self._on_device[dataset]
            return DeviceBatchLoader(images, labels, batch_size, shuffle)
        batched = isinstance(dataset, TensorImageDataset)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            # Cached crops are sliced in-process: a worker would only steal a core from the model.
            num_workers=0 if batched else self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=batch_collate if batched else None,
            persistent_workers=bool(self.num_workers) and not batched,
        )

    def train_dataloader(self):
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> list:
        """[val images, training images]: the second is the gallery for ``val/rank1``."""
        return [
            self._loader(self.val_set, self.eval_batch_size, shuffle=False),
            self._loader(self.train_set, self.eval_batch_size, shuffle=False),
        ]

    # -- test query/gallery runs ---------------------------------------------------------------
    def test_images(self, cross_aspect: bool = False) -> TestImages:
        """All images of the hand's query/gallery runs, each distinct file listed once.

        ``query{i}`` and ``gallery{i}`` partition the same test images, so files are matched across
        runs by ``<identity>/<file name>``: a test image is embedded once for all runs. With
        ``cross_aspect``, each ``query{i}`` is also ranked against ``gallery{i}_all`` (the four hand
        types' galleries, identity folders ``<id>_<suffix>``): a query matches only its own aspect's
        image of the same person, identities staying distinct per aspect.
        """
        hand_layout = layout.discover_hand(self.root, self.hand)
        if not hand_layout.runs:
            raise HandCLIPError(
                f"no test data for {self.hand!r}: {hand_layout.path} has no query{{i}}/gallery{{i}} "
                f"(or query/gallery) folders; splits present: {', '.join(hand_layout.splits) or 'none'}"
            )
        own_suffix = "_" + HAND_TYPES[self.hand]
        keys: dict[tuple[str, str], int] = {}
        paths: list[Path] = []
        identities: list[str] = []

        def indices(split: str) -> list[int]:
            out = []
            for sample in layout.list_split(self.root, self.hand, split):
                # <id>_<own suffix> in a cross-aspect gallery is the same person and image as <id> here
                identity = sample.identity.removesuffix(own_suffix)
                key = (identity, sample.path.name)
                if key not in keys:
                    keys[key] = len(paths)
                    paths.append(sample.path)
                    identities.append(identity)
                out.append(keys[key])
            return out

        runs = [
            {"name": query, "query": indices(query), "gallery": indices(gallery), "gallery_name": gallery}
            for query, gallery in hand_layout.runs
        ]
        if cross_aspect:
            missing = [f"{g}_all" for _, g in hand_layout.runs if f"{g}_all" not in hand_layout.splits]
            if missing:
                raise HandCLIPError(
                    f"cross-aspect evaluation needs {', '.join(missing)} in {hand_layout.path}; create them with "
                    "`python -m handclip.prepare ... --cross-aspect`, or set metrics.cross_aspect=false"
                )
            runs += [
                {"name": query, "query": run["query"], "gallery": indices(f"{gallery}_all"),
                 "gallery_name": f"{gallery}_all", "cross_aspect": True}
                for (query, gallery), run in zip(hand_layout.runs, list(runs))
            ]
        return TestImages(paths=paths, identities=identities, runs=runs)

    def image_dataloader(self, paths: list[Path], desc: str = "test"):
        """Loader over arbitrary image files (labels are their positions), large batches, in order."""
        dataset = self._dataset(paths, list(range(len(paths))), desc)
        return self._loader(dataset, self.eval_batch_size, shuffle=False)
