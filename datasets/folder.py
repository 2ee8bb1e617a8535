"""Image folders that survive unreadable files.

Folders are listed by :func:`datasets.walk.class_folder_samples` (each folder once, link loops
and non-regular files skipped) and every image is decoded by :func:`datasets.walk.decode_image`
(every PIL mode to 8-bit RGB, 16-bit scaled; header limits before decoding). A file PIL
cannot decode (corrupt JPEG, truncated PNG, not an image) is handled in one of two ways:

- ``'skip'`` (evaluation): the sample comes back as None; :func:`collate_skipping` drops it from
  the batch and counts it, so the reported accuracy is over the readable images only.
- ``'substitute'`` (training): the next readable image of the dataset (in index order) takes its
  place, so every batch stays full (Mixup/CutMix need even batches, DDP needs the same number of
  steps on every process). Each replacement is logged and counted in an :class:`UnreadableCounter`
  shared with the loader's worker processes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from .walk import class_folder_samples, decode_image

__all__ = ['DatasetError', 'RobustImageFolder', 'UnreadableCounter', 'collate_skipping', 'open_image_folder',
           'read_or_skip', 'read_substituting', 'rgb_loader', 'unreadable_images', 'unwrap_subset',
           'MAX_CONSECUTIVE_UNREADABLE']

_logger = logging.getLogger(__name__)

#: ``'substitute'`` gives up (with a :class:`DatasetError`) after this many unreadable files in a row.
MAX_CONSECUTIVE_UNREADABLE = 32
ON_UNREADABLE = ('skip', 'substitute')


class DatasetError(RuntimeError):
    """A dataset folder that cannot be used, with a message meant for a person."""


def rgb_loader(path: str) -> Image.Image:
    """Decode any PIL-readable image (every mode, 16-bit included) to 8-bit RGB (:func:`decode_image`)."""
    return decode_image(path)


class UnreadableCounter:
    """How many unreadable images a dataset has met, counted across loader worker processes.

    The count lives in a shared-memory tensor, so increments made in DataLoader workers are seen
    by the main process (fork or spawn). Increments are not locked: with unreadable files being
    rare, a lost increment between two workers is possible but harmless.
    """

    def __init__(self) -> None:
        self._count = torch.zeros(1, dtype=torch.int64).share_memory_()

    def add(self, n: int = 1) -> None:
        self._count += n

    def reset(self) -> None:
        self._count.zero_()

    @property
    def value(self) -> int:
        return int(self._count.item())


def read_or_skip(path: str, counter: Optional[UnreadableCounter] = None,
                 loader: Callable[[str], Image.Image] = rgb_loader,
                 then: str = 'skipped') -> Optional[Image.Image]:
    """The decoded image, or None for a file that cannot be decoded (logged with ``then``, counted)."""
    try:
        return loader(path)
    except Exception as e:  # PIL raises many types for broken files
        if counter is not None:
            counter.add()
        _logger.warning('unreadable image %s (%s): %s', path, e, then)
        return None


def read_substituting(samples: Sequence[Tuple[str, int]], index: int,
                      counter: Optional[UnreadableCounter] = None,
                      loader: Callable[[str], Image.Image] = rgb_loader) -> Tuple[Image.Image, int]:
    """``(RGB image, index of the sample read)``: ``samples[index]``, or if its file cannot be
    decoded, the next readable sample (wrapping around); each unreadable file is logged and counted.

    Raises:
        DatasetError: :data:`MAX_CONSECUTIVE_UNREADABLE` files in a row cannot be read.
    """
    n = len(samples)
    for k in range(min(n, MAX_CONSECUTIVE_UNREADABLE)):
        i = (index + k) % n
        image = read_or_skip(samples[i][0], counter, loader, 'the next image of the dataset takes its place')
        if image is not None:
            return image, i
    raise DatasetError(f'{min(n, MAX_CONSECUTIVE_UNREADABLE)} images in a row from {samples[index][0]} cannot be '
                       f'read: is this an image folder? Remove or replace the broken files')


class RobustImageFolder(ImageFolder):
    """``torchvision`` ImageFolder that decodes to RGB and survives unreadable images.

    Args:
        root: folder with one sub-folder per class.
        transform: image transform.
        on_unreadable: ``'skip'`` (the sample is None; use :func:`collate_skipping`) or
            ``'substitute'`` (the next readable image takes its place; see the module docstring).

    ``unreadable`` counts the unreadable files met (all worker processes together).
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, on_unreadable: str = 'skip') -> None:
        if on_unreadable not in ON_UNREADABLE:
            raise ValueError(f'on_unreadable must be one of {ON_UNREADABLE}, not {on_unreadable!r}')
        super().__init__(root, transform=transform, loader=rgb_loader)
        self.on_unreadable = on_unreadable
        self.unreadable = UnreadableCounter()

    @staticmethod
    def make_dataset(directory: str, class_to_idx: Dict[str, int], extensions: Optional[Tuple[str, ...]] = None,
                     is_valid_file: Optional[Callable[[str], bool]] = None,
                     allow_empty: bool = False) -> List[Tuple[str, int]]:
        """torchvision's listing, by :func:`datasets.walk.class_folder_samples`: each folder is entered
        once (a symlink loop neither repeats images nor hangs), FIFOs and other non-regular files are
        skipped with a warning."""
        if extensions is None or is_valid_file is not None:
            return ImageFolder.make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        found, _ = class_folder_samples(str(directory), sorted(class_to_idx), extensions)
        samples = [(path, class_to_idx[name]) for path, name in found]
        empty = sorted(set(class_to_idx) - {name for _, name in found})
        if empty and not allow_empty:
            raise FileNotFoundError(f'Found no valid file for the classes {", ".join(empty)}. '
                                    f'Supported extensions are: {", ".join(extensions)}')
        return samples

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        if self.on_unreadable == 'substitute':
            sample, index = read_substituting(self.samples, index, self.unreadable, self.loader)
        else:
            sample = read_or_skip(self.samples[index][0], self.unreadable, self.loader)
            if sample is None:
                return None
        target = self.samples[index][1]
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, target


def collate_skipping(batch: List[Optional[Tuple[torch.Tensor, int]]]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the readable samples of a batch: ``(images (B', C, H, W), targets (B',), n_skipped)``."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([b[0] for b in good])
    targets = torch.tensor([b[1] for b in good], dtype=torch.long)
    return images, targets, skipped


def unwrap_subset(dataset: Any) -> Any:
    """The dataset under any number of ``torch.utils.data.Subset`` wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def unreadable_images(dataset: Any, reset: bool = False) -> int:
    """How many unreadable images ``dataset`` (through any ``Subset``) has met so far in this
    process and its loader workers; 0 for datasets that count none. ``reset`` starts again."""
    counter = getattr(unwrap_subset(dataset), 'unreadable', None)
    if not isinstance(counter, UnreadableCounter):
        return 0
    value = counter.value
    if reset:
        counter.reset()
    return value


def open_image_folder(root: Path, transform: Optional[Callable] = None,
                      on_unreadable: str = 'skip') -> RobustImageFolder:
    """Open ``root`` as a :class:`RobustImageFolder`, turning torchvision's errors into one clear message."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f'dataset folder not found: {root}')
    try:
        return RobustImageFolder(str(root), transform=transform, on_unreadable=on_unreadable)
    except FileNotFoundError as e:
        raise DatasetError(f'no images in {root}: expected one sub-folder per class holding image files ({e})') from e
