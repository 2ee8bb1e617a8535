"""The soft targets of a token-labeling batch (:class:`TokenLabelTargets`), their label smoothing, and
the batch transform of training without label maps (:class:`ClassLabelBatch`)."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['TokenLabelTargets', 'SMOOTHING_MODES', 'smooth_distribution', 'ClassLabelBatch']


class TokenLabelTargets(NamedTuple):
    """Soft targets of one training batch.

    Attributes:
        cls: (B, C) class distribution of each image (already smoothed and mixup/cutmix-mixed,
            not MixToken-mixed: the loss does that with the box the model drew).
        dense: (B, S*S, C) one distribution per cell of a row-major S x S grid over the crop, or
            None (class targets only).
    """
    cls: torch.Tensor
    dense: Optional[torch.Tensor] = None


#: How token-label targets are smoothed (``--token-label-smoothing``): ``'unnormalized'`` as released,
#: ``(1 - s + s / C) * p + s / C`` (the one-hot ``on_value`` applied to a distribution; it sums to
#: ``1 + s / C``), or ``'normalized'``, ``(1 - s) * p + s / C`` (a distribution).
SMOOTHING_MODES = ('unnormalized', 'normalized')


def smooth_distribution(p: torch.Tensor, smoothing: float, mode: str = 'normalized') -> torch.Tensor:
    """Label smoothing of distributions over the last dimension (see :data:`SMOOTHING_MODES`).

    ``'normalized'``: ``(1 - s) * p + s / C``; ``'unnormalized'`` (the released token-label targets):
    ``(1 - s + s / C) * p + s / C``.
    """
    if mode not in SMOOTHING_MODES:
        raise ValueError(f'smoothing mode must be one of {SMOOTHING_MODES}, got {mode!r}')
    if smoothing <= 0:
        return p
    off = smoothing / p.shape[-1]
    on = 1.0 - smoothing + (off if mode == 'unnormalized' else 0.0)
    return p * on + off


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
