"""Image folders and image lists that survive unreadable files; finding and listing image files.

:class:`RobustImageFolder` (an ImageFolder) and :class:`ImageList` (given ``(path, target)`` pairs,
e.g. one's own images) read their samples alike.

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
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

from .walk import class_folder_samples, decode_image, image_files

__all__ = ['DatasetError', 'RobustImageFolder', 'ImageList', 'UnreadableCounter', 'collate_skipping', 'unpack_batch',
           'open_image_folder', 'read_or_skip', 'read_substituting', 'rgb_loader', 'unreadable_images', 'unwrap_subset',
           'find_image_folder', 'list_image_folder', 'list_images', 'IMG_EXTENSIONS', 'MAX_CONSECUTIVE_UNREADABLE']

_logger = logging.getLogger(__name__)

#: ``'substitute'`` gives up (with a :class:`DatasetError`) after this many unreadable files in a row.
MAX_CONSECUTIVE_UNREADABLE = 32
ON_UNREADABLE = ('skip', 'substitute')
#: File name endings read as images (torchvision's ImageFolder list).
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


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


class _ReadsSamples:
    """``__getitem__`` of the datasets below: ``self.samples`` are ``(path, target)`` pairs read with
    ``self.loader`` as ``self.on_unreadable`` says; with ``self.return_index`` items end with the index."""
    samples: List[Tuple[str, int]]
    loader: Callable[[str], Image.Image]
    transform: Optional[Callable]
    on_unreadable: str
    unreadable: UnreadableCounter
    return_index: bool = False

    def _init_reading(self, on_unreadable: str, return_index: bool) -> None:
        if on_unreadable not in ON_UNREADABLE:
            raise ValueError(f'on_unreadable must be one of {ON_UNREADABLE}, not {on_unreadable!r}')
        self.on_unreadable = on_unreadable
        self.return_index = return_index
        self.unreadable = UnreadableCounter()

    def __getitem__(self, index: int) -> Optional[Tuple[Any, ...]]:
        if self.on_unreadable == 'substitute':
            sample, index = read_substituting(self.samples, index, self.unreadable, self.loader)
        else:
            sample = read_or_skip(self.samples[index][0], self.unreadable, self.loader)
            if sample is None:
                return None
        target = self.samples[index][1]
        if self.transform is not None:
            sample = self.transform(sample)
        return (sample, target, index) if self.return_index else (sample, target)


class RobustImageFolder(_ReadsSamples, ImageFolder):
    """``torchvision`` ImageFolder that decodes to RGB and survives unreadable images.

    Args:
        root: folder with one sub-folder per class.
        transform: image transform.
        on_unreadable: ``'skip'`` (the sample is None; use :func:`collate_skipping`) or
            ``'substitute'`` (the next readable image takes its place; see the module docstring).
        return_index: items are ``(image, target, index)`` instead of ``(image, target)``.

    ``unreadable`` counts the unreadable files met (all worker processes together).
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, on_unreadable: str = 'skip',
                 return_index: bool = False) -> None:
        super().__init__(root, transform=transform, loader=rgb_loader)
        self._init_reading(on_unreadable, return_index)

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


class ImageList(_ReadsSamples, Dataset):
    """Given image files read like :class:`RobustImageFolder`'s: ``samples`` are ``(path, target)``
    pairs (target -1: unknown), e.g. one's own images or a subset of a folder (``visualize.py``)."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Optional[Callable] = None,
                 on_unreadable: str = 'skip', return_index: bool = False) -> None:
        self.samples = [(str(path), int(target)) for path, target in samples]
        self.loader = rgb_loader
        self.transform = transform
        self._init_reading(on_unreadable, return_index)

    def __len__(self) -> int:
        return len(self.samples)


def collate_skipping(batch: List[Optional[Tuple[Any, ...]]]) -> Tuple[Any, ...]:
    """Stack the readable samples of a batch: ``(images (B', C, H, W), targets (B',), n_skipped)``, and
    for items with their index (``return_index``) the (B',) dataset indices as a fourth entry."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    with_index = any(b is not None and len(b) > 2 for b in batch)
    long = torch.empty(0, dtype=torch.long)
    if not good:
        return (torch.empty(0), long, skipped, long) if with_index else (torch.empty(0), long, skipped)
    images = torch.stack([b[0] for b in good])
    targets = torch.tensor([b[1] for b in good], dtype=torch.long)
    if with_index:
        return images, targets, skipped, torch.tensor([b[2] for b in good], dtype=torch.long)
    return images, targets, skipped


def unpack_batch(batch: Sequence[Any], device: Optional[torch.device] = None
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], int, Optional[torch.Tensor]]:
    """``(images, targets, n_skipped, indices)`` of a loader batch: ``(images, targets)`` or
    :func:`collate_skipping`'s triple (indices None) or quadruple. Images and targets are moved to ``device``
    when given; images, targets and indices are None when the batch held no readable image."""
    images, targets = batch[0], batch[1]
    skipped = batch[2] if len(batch) > 2 else 0
    indices = batch[3] if len(batch) > 3 else None
    if images.numel() == 0:
        return None, None, skipped, None
    if device is not None:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    return images, targets, skipped, indices


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


# ---------------------------------------------------------------------------------------- listing files
def find_image_folder(data_path: Union[str, Path]) -> Path:
    """The ImageFolder to visualize: ``data_path/val`` if it exists, else ``data_path`` itself.

    Raises:
        DatasetError: the path is missing or not a folder, or it holds neither ``val/`` nor class
            folders (a root with only ``train/`` is refused rather than read as one class).
    """
    root = Path(data_path)
    if not root.exists():
        raise DatasetError(f'--data-path {root} does not exist')
    if not root.is_dir():
        raise DatasetError(f'--data-path {root} is not a folder (for single images use --img-path)')
    val = root / 'val'
    if val.is_dir():
        _logger.info('images: the validation split %s', val)
        return val
    subdirs = [p for p in root.iterdir() if p.is_dir()]
    if (root / 'train').is_dir():
        raise DatasetError(f'{root} has train/ but no val/ folder')
    if not subdirs:
        raise DatasetError(f'{root} has no val/ folder and no class folders (ImageFolder layout: '
                         f'{root}/val/<class>/<image>)')
    _logger.info('images: %s has no val/ folder, so it is read as the ImageFolder itself', root)
    return root


def list_image_folder(folder: Union[str, Path]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Classes and images of an ImageFolder, in torchvision's order.

    Args:
        folder: a folder of class folders.

    Returns:
        ``(classes, samples)``: the sorted class folder names (ImageFolder's class order, empty
        class folders included) and ``(path, class folder name)`` for every image file, sorted.

    Raises:
        DatasetError: no class folder, or no image file in any of them.
    """
    folder = Path(folder)
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DatasetError(f'{folder} has no class folders')
    samples, _ = class_folder_samples(str(folder), classes, IMG_EXTENSIONS)
    if not samples:
        raise DatasetError(f'no images ({", ".join(IMG_EXTENSIONS)}) in the class folders of {folder}')
    used = {n for _, n in samples}
    empty = [c for c in classes if c not in used]
    if empty:
        _logger.warning('%d class folder(s) without images: %s', len(empty), ', '.join(empty[:5]))
    return classes, samples


def list_images(img_path: Union[str, Path]) -> List[str]:
    """One's own images: a single file, or every image file under a folder (recursively, sorted).

    Raises:
        DatasetError: missing path, a file that is not a readable image, or a folder without images.
    """
    path = Path(img_path)
    if not path.exists():
        raise DatasetError(f'--img-path {path} does not exist')
    if path.is_file():
        try:
            rgb_loader(str(path))
        except Exception:  # PIL raises many types for broken files
            raise DatasetError(f'--img-path {path} is not an image that Pillow can read') from None
        return [str(path)]
    files = image_files(str(path), IMG_EXTENSIONS).files
    if not files:
        raise DatasetError(f'--img-path {path} holds no images ({", ".join(IMG_EXTENSIONS)})')
    return files
