"""The HandCLIP LightningDataModule: train/val (and test query/gallery) images of one hand type."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from open_clip.transform import PreprocessCfg
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from handclip.data import layout
from handclip.data.cache import cached_crops
from handclip.data.datasets import (
    DeviceBatchLoader,
    ImageDataset,
    IndexedDataset,
    TensorImageDataset,
    batch_collate,
)
from handclip.data.images import ImageLoader
from handclip.data.sampling import EveryImageOnceBatchSampler, PKBatchSampler
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

    Under DDP (Lightning's ``DistributedSampler`` injection, mirrored for device batches), each epoch
    shows every training image exactly once across processes (``data.batch_size`` per process: the
    global batch is ``batch_size x devices x nodes``); validation batches carry their indices so that the
    module can gather them across processes and drop the padding duplicates. The crop cache is built in
    :meth:`prepare_data`, which Lightning runs on one process per node while the others wait; every
    process then opens it in :meth:`setup`.
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
        sampler: str = "random",
        pk_identities: int = 16,
        pk_images: int = 4,
    ):
        """``sampler``: "random" (each training image once per epoch, shuffled) or "pk" (identity-balanced
        batches of ``pk_identities`` x ``pk_images`` per process, :class:`PKBatchSampler`; ``batch_size`` is then
        their product)."""
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
        if sampler not in ("random", "pk"):
            raise HandCLIPError(f"data.sampler must be random or pk, got {sampler!r}")
        for setting, value in (("pk_identities", pk_identities), ("pk_images", pk_images)):
            if not isinstance(value, int) or value < 1:
                raise HandCLIPError(f"data.{setting} must be a whole number >= 1, got {value!r}")
        if sampler == "pk":
            batch_size = pk_identities * pk_images
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
        self.sampler, self.pk_identities, self.pk_images = sampler, pk_identities, pk_images
        self.preprocess = preprocess
        self.loader = ImageLoader(preprocess)
        self._listed: tuple[list[str], list, list] | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    # -- listing -------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """The training identities (sorted folder names: label i is ``classes[i]``), listed on first use."""
        return self._listing()[0]

    def _listing(self) -> tuple[list[str], list, list]:
        """(classes, train samples, val samples), listed once; cheap (file names only, nothing decoded)."""
        if self._listed is not None:
            return self._listed
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
        log.info("%s: %d classes, %d train and %d val images", self.hand, len(classes), len(train), len(val))
        self._listed = (classes, train, val)
        return self._listed

    def prepare_data(self) -> None:
        """Decode the training and val images into the crop cache (Lightning: one process per node)."""
        if self.cache:
            _, train, val = self._listing()
            for samples, desc in ((train, "train"), (val, "val")):
                self._cached([s.path for s in samples], desc)

    def setup(self, stage: str | None = None) -> None:
        """The training and val datasets (opening the crop cache that :meth:`prepare_data` built)."""
        if self.train_set is not None:
            return
        classes, train, val = self._listing()
        index = {c: i for i, c in enumerate(classes)}
        self.train_set = self._dataset([s.path for s in train], [index[s.identity] for s in train], "train")
        self.val_set = self._dataset([s.path for s in val], [index[s.identity] for s in val], "val")

    def _cached(self, paths: list[Path], desc: str) -> torch.Tensor:
        return cached_crops(paths, self.loader, self.cache_dir, num_workers=self.cache_workers,
                            progress=self.progress, desc=f"{self.hand}/{desc}")

    def _dataset(self, paths: list[Path], labels: list[int], desc: str) -> Dataset:
        if not self.cache:
            return ImageDataset(paths, labels, self.loader)
        return TensorImageDataset(self._cached(paths, desc), labels)

    # -- loaders -------------------------------------------------------------------------------
    def _device(self, device: torch.device | str | None = None) -> torch.device | None:
        """``device`` when given (loaders used outside a Trainer), else the trainer's, else None."""
        if device is not None:
            return torch.device(device)
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else None

    def _use_device_batches(self, dataset: Dataset, device: torch.device | None) -> bool:
        """Cached crops go to the device when asked, or (auto) on CUDA when they take < 1/4 of free memory."""
        if not isinstance(dataset, TensorImageDataset) or self.device_batches is False:
            return False
        if self.device_batches is True:
            return True
        if device is None or device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        return dataset.images.numel() < free // 4

    def _distributed_sampler(self, dataset: Dataset, shuffle: bool) -> DistributedSampler | None:
        """The sampler Lightning would inject into a DataLoader of ``dataset`` under DDP, else None."""
        trainer = getattr(self, "trainer", None)
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        if not kwargs or kwargs.get("num_replicas", 1) <= 1:
            return None
        return DistributedSampler(dataset, shuffle=shuffle, seed=int(os.getenv("PL_GLOBAL_SEED", 0)), **kwargs)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, train: bool = False,
                with_index: bool = False, shard: bool = True, device: torch.device | str | None = None):
        """Batches of ``dataset``. ``train``: every image once per epoch across processes (no padding);
        otherwise Lightning's padded ``DistributedSampler`` under DDP. ``with_index``: batches carry indices.
        ``shard=False``: every image on this process, whatever the trainer (for a DataLoader, as long as
        Lightning is not given it). ``device``: where the batches will be used, for loaders used outside a
        Trainer (evaluation): cached crops are sliced there (``device_batches``), or else copied from pinned
        memory when it is a GPU."""
        batches = self._train_batches(dataset) if train else BatchSampler
        pin = self.pin_memory or (device is not None and torch.device(device).type == "cuda")
        device = self._device(device)
        if self._use_device_batches(dataset, device):
            device = device or "cpu"
            if dataset not in self._on_device:  # train and the val/rank1 gallery share one copy
                self._on_device[dataset] = (dataset.images.to(device), dataset.labels.to(device))
            images, labels = self._on_device[dataset]
            sampler = self._distributed_sampler(dataset, shuffle) if shard else None
            if sampler is None:
                sampler = RandomSampler(range(len(dataset))) if shuffle else SequentialSampler(range(len(dataset)))
            return DeviceBatchLoader(images, labels, batch_sampler=batches(sampler, batch_size, drop_last=False),
                                     with_index=with_index)
        batched = isinstance(dataset, TensorImageDataset)
        if with_index:
            dataset = IndexedDataset(dataset)
        # Under DDP Lightning replaces the sampler by a DistributedSampler (re-creating the batch sampler).
        if train:
            sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
            batching = {"batch_sampler": batches(sampler, batch_size, drop_last=False)}
        else:
            batching = {"batch_size": batch_size, "shuffle": shuffle}
        return DataLoader(
            dataset,
            **batching,
            # Cached crops are sliced in-process: a worker would only steal a core from the model.
            num_workers=0 if batched else self.num_workers,
            pin_memory=pin,
            collate_fn=batch_collate if batched else None,
            persistent_workers=bool(self.num_workers) and not batched,
        )

    def _train_batches(self, dataset: Dataset):
        """The batch sampler class (or a factory taking the same arguments) of training batches."""
        if self.sampler != "pk":
            return EveryImageOnceBatchSampler
        labels = dataset.labels.tolist() if isinstance(dataset.labels, torch.Tensor) else list(dataset.labels)

        def pk(sampler, batch_size: int, drop_last: bool = False) -> PKBatchSampler:
            return PKBatchSampler(sampler, batch_size, drop_last, labels=labels, identities=self.pk_identities,
                                  images=self.pk_images)

        return pk

    def train_dataloader(self):
        self._check_shareable(self.train_set)
        return self._loader(self.train_set, self.batch_size, shuffle=True, train=True)

    def val_dataloader(self) -> list:
        """[val images, training images]: the second is the gallery for ``val/rank1``. Batches carry indices."""
        return list(self._val_and_train(with_index=True))

    def whole_val_and_train_loaders(self, device: torch.device | str | None = None) -> tuple:
        """(val, train) batches of every image in dataset order on this process alone, also after a run on
        several processes: for work done once when training ends (the open-set threshold's calibration).
        ``device``: where they will be embedded."""
        return self._val_and_train(shard=False, device=device)

    def _val_and_train(self, **options) -> tuple:
        return tuple(self._loader(dataset, self.eval_batch_size, shuffle=False, **options)
                     for dataset in (self.val_set, self.train_set))

    def _check_shareable(self, dataset: Dataset) -> None:
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        if len(dataset) < world:
            raise HandCLIPError(
                f"{len(dataset)} training images of {self.hand!r} cannot be shared by {world} processes; "
                "use fewer devices (trainer.devices) or nodes"
            )

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

    def image_dataloader(self, paths: list[Path], desc: str = "test", device: torch.device | str | None = None):
        """Loader over arbitrary image files (labels are their positions), large batches, in order. ``device``:
        where they will be embedded (cached crops are sliced there when ``device_batches`` allows)."""
        dataset = self._dataset(paths, list(range(len(paths))), desc)
        return self._loader(dataset, self.eval_batch_size, shuffle=False, device=device)
