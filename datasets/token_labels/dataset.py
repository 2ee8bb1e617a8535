"""The token-label training set: each image with its label map and its recorded augmentation."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from ..folder import UnreadableCounter, read_substituting
from .augment import TokenLabelTransform
from .maps import TokenLabelError, check_label_maps, label_map_path, load_label_map

__all__ = ['TokenLabelDataset']

PathLike = Union[str, os.PathLike]


class TokenLabelDataset(Dataset):
    """Training images with their label maps.

    Args:
        samples: ``(image path, class index)`` pairs of an ImageFolder.
        label_root: folder of the label maps (``<class folder>/<image stem>.pt``).
        num_classes: classes of the training set.
        transform: a :class:`~datasets.token_labels.augment.TokenLabelTransform` (attached later is fine).
        classes: class folder names (checked against the generator's ``token_labels.json``).
        check: check every map's presence and the first map's shape now.

    A sample is ``(image (3, S, S), (class index, label map (2, K, H, W), box (4,), flipped, theta
    (2, 3)))``. An unreadable image is replaced, with its label map, by the next readable one
    (logged, counted in ``unreadable``).
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], label_root: PathLike, num_classes: int,
                 transform: Optional[TokenLabelTransform] = None, classes: Optional[Sequence[str]] = None,
                 check: bool = True) -> None:
        if not samples:
            raise TokenLabelError('the training set holds no images')
        self.samples = list(samples)
        self.label_root = Path(label_root)
        self.num_classes = int(num_classes)
        self.classes = list(classes or [])
        self.transform = transform
        self.unreadable = UnreadableCounter()
        self.map_shape = check_label_maps(self.samples, label_root, num_classes, classes) if check else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Tuple[int, torch.Tensor, torch.Tensor, bool,
                                                                   torch.Tensor]]:
        if self.transform is None:
            raise RuntimeError('TokenLabelDataset needs a transform (build_token_label_transform)')
        img, index = read_substituting(self.samples, index, self.unreadable)
        path, label = self.samples[index]
        label_map = load_label_map(label_map_path(self.label_root, path), self.num_classes, self.map_shape)
        img, box, flip, theta = self.transform(img)
        return img, (label, label_map, box, flip, theta)

