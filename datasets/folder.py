"""An ImageFolder that survives unreadable files, and the loader built on it for evaluation."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import torch
from PIL import Image
from torchvision.datasets import ImageFolder

__all__ = ['DatasetError', 'RobustImageFolder', 'collate_skipping', 'open_image_folder']

_logger = logging.getLogger(__name__)


class DatasetError(RuntimeError):
    """A dataset folder that cannot be used, with a message meant for a person."""


def rgb_loader(path: str) -> Image.Image:
    """Decode any PIL-readable image (grayscale, CMYK, RGBA, palette) to RGB."""
    with open(path, 'rb') as f:
        img = Image.open(f)
        img.load()
    return img.convert('RGB')


class RobustImageFolder(ImageFolder):
    """``torchvision`` ImageFolder whose unreadable images come back as None (and are logged).

    Use it with :func:`collate_skipping`, which drops them from the batch and counts them.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None) -> None:
        super().__init__(root, transform=transform, loader=rgb_loader)

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except Exception as e:  # PIL raises many types for broken files
            _logger.warning('skipping unreadable image %s (%s)', path, e)
            return None
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


def open_image_folder(root: Path, transform: Optional[Callable] = None) -> RobustImageFolder:
    """Open ``root`` as an ImageFolder, turning torchvision's errors into one clear message."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f'dataset folder not found: {root}')
    try:
        return RobustImageFolder(str(root), transform=transform)
    except FileNotFoundError as e:
        raise DatasetError(f'no images in {root}: expected one sub-folder per class holding image files ({e})') from e
