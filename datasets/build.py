"""Training and validation datasets of the DeiT-recipe scripts, and their transforms.

- ``IMNET``: an ImageFolder tree ``<data-path>/train/<class>/*.JPEG`` and ``<data-path>/val/<class>/*``.
- ``CIFAR`` / ``CIFAR100``: torchvision's CIFAR-100 files under ``<data-path>``; never downloaded.
- ``INAT`` / ``INAT19``: the iNaturalist 2018 / 2019 annotation files (``train2018.json``,
  ``val2018.json``, ``categories.json``) and images under ``<data-path>``, read as the DeiT release
  read them; nothing is downloaded.

Datasets are built without a transform first (the class count decides the model's head) and
the transform, which depends on the model's input size and preprocessing cfg, is attached after
the model exists (:func:`attach_transform`).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.nn as nn
from timm.data import create_transform
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv_datasets

from .folder import (
    DatasetError, RobustImageFolder, UnreadableCounter, read_or_skip, read_substituting, unwrap_subset,
)
from .safe_read import UnsafeFileError, read_structured
from .transforms import data_config, eval_transform, keep_zero_bit_posterize

__all__ = [
    'DATA_SETS', 'build_dataset', 'build_transform', 'attach_transform', 'resolve_data_path',
    'INatDataset', 'check_same_classes',
]

_logger = logging.getLogger(__name__)

#: ``--data-set`` names (the release's, plus ``CIFAR100`` spelled out).
DATA_SETS = ('IMNET', 'CIFAR', 'CIFAR100', 'INAT', 'INAT19')
_INAT_YEARS = {'INAT': 2018, 'INAT19': 2019}


def resolve_data_path(args: argparse.Namespace, announce: bool = True) -> Path:
    """The dataset root of ``--data-path``.

    Without ``--data-path`` (and ``--data-set IMNET``) the built-in synthetic shapes set is
    written once (``datasets.synthetic``) and used, which the log says.

    Raises:
        DatasetError: ``--data-path`` does not exist, or another data set needs one.
    """
    if not getattr(args, 'data_path', None):
        if getattr(args, 'data_set', 'IMNET') != 'IMNET':
            raise DatasetError(f'--data-set {args.data_set} needs --data-path PATH')
        from .synthetic import make_synthetic_dataset
        path = make_synthetic_dataset()
        if announce:  # build_dataset: with the validation split only, so a run says it once
            _logger.info('no --data-path given: using the built-in synthetic shapes dataset in %s', path)
        return path
    path = Path(args.data_path).expanduser()
    if not path.is_dir():
        raise DatasetError(f'--data-path {path} is not a folder')
    return path


def _image_folder(root: Path, split: str) -> RobustImageFolder:
    """The ``split`` folder; unreadable images are replaced (training) or skipped (validation)."""
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f'{folder} does not exist: --data-path must hold {split}/ with one folder per class')
    try:
        ds = RobustImageFolder(str(folder), on_unreadable='substitute' if split == 'train' else 'skip')
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise DatasetError(f'{folder} holds no images in class folders ({e})') from e
    if len(ds) == 0:
        raise DatasetError(f'{folder} holds no images')
    return ds


def _cifar100(root: Path, train: bool) -> tv_datasets.CIFAR100:
    try:
        return tv_datasets.CIFAR100(str(root), train=train, download=False)
    except RuntimeError as e:
        raise DatasetError(
            f'CIFAR-100 was not found under {root} (expected {root}/cifar-100-python/ as torchvision '
            f'unpacks it); it is never downloaded at run time') from e


class INatDataset(Dataset):
    """iNaturalist 2018/2019 from its annotation files, labels at a chosen taxonomy level.

    Classes are numbered in order of first appearance in the training annotations, as the DeiT
    release numbered them, so the training and validation splits agree.

    Args:
        root: folder with ``train{year}.json``, ``val{year}.json``, ``categories.json`` and the images
            at the ``file_name`` paths of the annotations.
        train: training or validation split.
        year: 2018 or 2019.
        category: taxonomy level of the label (``'name'`` = species, ``'genus'``, ``'family'``, ...).
        transform: image transform.

    Unreadable images are replaced by the next readable one in training and skipped (None) in
    validation, as in :class:`datasets.folder.RobustImageFolder`.
    """

    def __init__(self, root: Path, train: bool = True, year: int = 2018, category: str = 'name',
                 transform: Optional[Callable] = None) -> None:
        self.root = Path(root)
        self.transform = transform
        self.train = train
        self.unreadable = UnreadableCounter()
        split = 'train' if train else 'val'
        files = {name: self.root / name for name in (f'train{year}.json', f'{split}{year}.json', 'categories.json')}
        for path in files.values():
            if not path.is_file():
                raise DatasetError(f'iNaturalist {year}: {path} is missing (it is never downloaded at run time)')
        try:  # files of another layout: one line naming what is missing, not a KeyError
            categories = self._load(files['categories.json'])
            by_id = {int(c['id']): c for c in categories}
            if not categories or category not in categories[0]:
                raise DatasetError(f'iNaturalist categories have no {category!r} level')
            classes: Dict[str, int] = {}
            for ann in self._load(files[f'train{year}.json'])['annotations']:
                classes.setdefault(by_id[int(ann['category_id'])][category], len(classes))
            split_data = self._load(files[f'{split}{year}.json'])
            label_of = {int(a['image_id']): int(a['category_id']) for a in split_data['annotations']}
            self.samples: List[Tuple[str, int]] = [
                (str(self.root / img['file_name']), classes[by_id[label_of[int(img['id'])]][category]])
                for img in split_data['images']]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise DatasetError(f'the iNaturalist {year} annotations in {self.root} are not in the released layout '
                               f'({type(e).__name__}: {e})') from None
        self.classes = list(classes)
        self.nb_classes = len(classes)

    @staticmethod
    def _load(path: Path) -> Any:
        try:  # a regular file (iNaturalist's largest is about 300 MB), bounded nesting
            return read_structured(path, max_bytes=2 << 30, max_depth=16, what='iNaturalist annotations')
        except (OSError, UnsafeFileError) as e:
            raise DatasetError(str(e) if isinstance(e, UnsafeFileError) else f'cannot read {path}: {e}') from None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        if self.train:
            image, index = read_substituting(self.samples, index, self.unreadable)
        else:
            image = read_or_skip(self.samples[index][0], self.unreadable)
            if image is None:
                return None
        target = self.samples[index][1]
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def _subset(dataset: Dataset, limit: Optional[int]) -> Dataset:
    """At most ``limit`` samples, evenly spaced over the dataset (so every class keeps some)."""
    if not limit or limit >= len(dataset):
        return dataset
    step = len(dataset) / limit
    return Subset(dataset, [int(i * step) for i in range(limit)])


def build_dataset(is_train: bool, args: argparse.Namespace,
                  transform: Optional[Callable] = None) -> Tuple[Dataset, int]:
    """The training or validation split of ``--data-set`` under ``--data-path``.

    Args:
        is_train: training split (else validation).
        args: ``data_set``, ``data_path``, optional ``inat_category`` and ``subset`` (debug: use at
            most that many images per split).
        transform: image transform; None leaves it to :func:`attach_transform`.

    Returns:
        ``(dataset, num_classes)``; samples are ``(image, class_index)``.

    Raises:
        DatasetError: missing or empty folders, absent files, an unknown ``--data-set``.
    """
    root = resolve_data_path(args, announce=not is_train)  # every run builds the validation split
    name = args.data_set.upper()
    if name == 'IMNET':
        dataset = _image_folder(root, 'train' if is_train else 'val')
        num_classes = len(dataset.classes)
    elif name in ('CIFAR', 'CIFAR100'):
        dataset = _cifar100(root, is_train)
        num_classes = 100
    elif name in _INAT_YEARS:
        dataset = INatDataset(root, train=is_train, year=_INAT_YEARS[name],
                              category=getattr(args, 'inat_category', 'name'))
        num_classes = dataset.nb_classes
    else:
        raise DatasetError(f'unknown --data-set {args.data_set!r}; choose from {", ".join(DATA_SETS)}')
    if transform is not None:
        dataset.transform = transform
    dataset = _subset(dataset, getattr(args, 'subset', None))
    # IMNET is the released flag value for any ImageFolder tree: name the folder, not 'IMNET'
    source = f'{Path(root) / ("train" if is_train else "val")} (ImageFolder)' if name == 'IMNET' else name
    _logger.info('%s split %s: %d images, %d classes', 'training' if is_train else 'validation', source,
                 len(dataset), num_classes)
    return dataset, num_classes


def check_same_classes(train: Dataset, val: Dataset) -> None:
    """Raise :class:`DatasetError` if two ImageFolder splits name different class folders."""
    a = getattr(unwrap_subset(train), 'classes', None)
    b = getattr(unwrap_subset(val), 'classes', None)
    if isinstance(unwrap_subset(train), tv_datasets.ImageFolder) and a != b:
        only_train = sorted(set(a) - set(b))[:5]
        only_val = sorted(set(b) - set(a))[:5]
        raise DatasetError(f'train/ and val/ have different class folders (only in train: {only_train}, '
                        f'only in val: {only_val})')


def attach_transform(dataset: Dataset, transform: Callable) -> None:
    """Set the image transform of a dataset built by :func:`build_dataset` (through any subset)."""
    unwrap_subset(dataset).transform = transform


def build_transform(is_train: bool, args: argparse.Namespace, model: nn.Module) -> Callable:
    """The DeiT-recipe transform at the model's fine input size.

    Training: random-resized crop to ``S_f`` (``--train-interpolation``), horizontal flip,
    RandAugment ``--aa`` (``rand-m9-mstd0.5-inc1``), color jitter ``--color-jitter`` (ignored by
    timm when RandAugment is on), normalize, random erasing ``--reprob/--remode/--recount``.
    Evaluation: SPEC 1 (resize the short side to ``int(S_f / crop_pct)``, center crop ``S_f``).
    Mean, std and crop_pct come from the model's pretrained cfg. The coarse image is not made
    here: it is derived from the (mixed) fine batch during the forward pass.

    Args:
        is_train: training transform (else evaluation).
        args: the augmentation flags.
        model: the model (its cfg holds the fine input size).
    """
    if not is_train:
        return eval_transform(model)
    cfg = data_config(model)
    aa = args.aa if args.aa and args.aa.lower() != 'none' else None
    transform = create_transform(
        input_size=cfg['input_size'], is_training=True, color_jitter=args.color_jitter, auto_augment=aa,
        interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount, mean=cfg['mean'], std=cfg['std'],
        scale=tuple(getattr(args, 'crop_scale', None) or (0.08, 1.0)))
    return keep_zero_bit_posterize(transform)  # timm's posterize fails at 0 bits with Pillow 13
