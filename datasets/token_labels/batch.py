"""The engine's batch transforms of CF-LV-ViT training: what turns a loader batch into images and
:class:`~datasets.token_labels.targets.TokenLabelTargets` on the device, with label maps
(:class:`TokenLabelBatch`) or without (:class:`ClassLabelBatch`), mixup/cutmix included."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .mixup import TokenLabelMixup
from .targets import CROP_MODES, SMOOTHING_MODES, TokenLabelTargets, smooth_distribution, token_label_targets

__all__ = ['TokenLabelBatch', 'ClassLabelBatch']


class TokenLabelBatch:
    """The engine's batch transform for token labeling: label-map records -> targets, then mixup.

    Args:
        num_classes: C.
        label_size: side of the dense target (2g), or 1 for class targets only.
        smoothing: label smoothing.
        mixup: a :class:`TokenLabelMixup`, or None.
        crop, smoothing_mode: the released behaviours by default (see :func:`token_label_targets`).
    """

    def __init__(self, num_classes: int, label_size: int, smoothing: float = 0.0,
                 mixup: Optional[TokenLabelMixup] = None, crop: str = 'transposed',
                 smoothing_mode: str = 'unnormalized') -> None:
        if crop not in CROP_MODES or smoothing_mode not in SMOOTHING_MODES:
            raise ValueError(f'crop must be one of {CROP_MODES} and smoothing_mode one of {SMOOTHING_MODES}, got '
                             f'{crop!r} and {smoothing_mode!r}')
        self.num_classes = int(num_classes)
        self.label_size = int(label_size)
        self.smoothing = float(smoothing)
        self.mixup = mixup
        self.crop, self.smoothing_mode = crop, smoothing_mode

    def __call__(self, images: torch.Tensor, records: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, TokenLabelTargets]:
        """``records``: the collated ``(labels, label maps, boxes, flips, thetas)`` on the device."""
        _, label_maps, boxes, flips, thetas = records
        targets = token_label_targets(label_maps, boxes, flips, thetas, self.num_classes, self.label_size,
                                      self.smoothing, self.crop, self.smoothing_mode)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return images, targets


class ClassLabelBatch:
    """Batch transform of training without label maps: class indices -> soft class targets.

    With mixup/cutmix (a timm ``Mixup``, which also smooths) the images and targets are mixed;
    otherwise the targets are smoothed one-hot vectors.

    Args:
        num_classes: C.
        smoothing: label smoothing (used when there is no mixup).
        mixup: timm ``Mixup`` or None.
    """

    def __init__(self, num_classes: int, smoothing: float = 0.0, mixup: Optional[Any] = None) -> None:
        self.num_classes = int(num_classes)
        self.smoothing = float(smoothing)
        self.mixup = mixup

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, TokenLabelTargets]:
        if self.mixup is not None:
            images, soft = self.mixup(images, labels)
        else:
            soft = smooth_distribution(F.one_hot(labels, self.num_classes).float(), self.smoothing)
        return images, TokenLabelTargets(cls=soft, dense=None)
