"""timm's batch-wise mixup/cutmix extended to token-label targets (:class:`TokenLabelMixup`)."""
from __future__ import annotations

import math
from typing import Any, Tuple

import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam

from .targets import TokenLabelTargets

__all__ = ['TokenLabelMixup', 'box_coverage']


class TokenLabelMixup(Mixup):
    """timm's batch-wise mixup/cutmix applied to images and token-label targets alike.

    Mixup blends images, class targets and dense targets with the same lambda. CutMix pastes a box
    of the flipped batch into the images; each dense cell takes the flipped batch's target in
    proportion to the share of the cell the box covers, and the class target the (corrected)
    lambda. Label smoothing was applied by
    :func:`~datasets.token_labels.targets.token_label_targets`. Only ``mode='batch'``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault('label_smoothing', 0.0)
        super().__init__(**kwargs)
        if self.mode != 'batch':
            raise ValueError(f'token labels support --mixup-mode batch only, got {self.mode!r}')

    def __call__(  # type: ignore[override]
            self, x: torch.Tensor, target: TokenLabelTargets) -> Tuple[torch.Tensor, TokenLabelTargets]:
        if x.shape[0] % 2:
            raise ValueError('mixup/cutmix need an even batch size')
        lam, use_cutmix = self._params_per_batch()
        if lam == 1.0:
            return x, target
        dense = target.dense
        if use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                x.shape, lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
            if dense is not None:
                cover = box_coverage((yl, yh, xl, xh), tuple(x.shape[-2:]), math.isqrt(dense.shape[1]))
                cover = cover.to(dense).view(1, -1, 1)  # (1, S*S, 1)
                dense = dense * (1.0 - cover) + dense.flip(0) * cover
        else:
            x_flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(x_flipped)
            if dense is not None:
                dense = dense * lam + dense.flip(0) * (1.0 - lam)
        cls = target.cls * lam + target.cls.flip(0) * (1.0 - lam)
        return x, TokenLabelTargets(cls=cls, dense=dense)


def box_coverage(box: Tuple[int, int, int, int], image_size: Tuple[int, int], side: int) -> torch.Tensor:
    """Share of each cell of a ``side x side`` grid over the image covered by a pixel box.

    Args:
        box: ``(y_low, y_high, x_low, x_high)`` in pixels, end-exclusive (timm's cutmix box).
        image_size: (H, W).
        side: grid side S.

    Returns:
        (S*S,) float32 in [0, 1], row-major.
    """
    yl, yh, xl, xh = box
    H, W = image_size

    def overlap(lo: float, hi: float, extent: int) -> torch.Tensor:
        cell = extent / side
        edges = torch.arange(side + 1, dtype=torch.float64) * cell
        covered = edges[1:].clamp(max=hi) - edges[:-1].clamp(min=lo)
        return (covered.clamp(min=0) / cell).float()  # (S,)

    return torch.outer(overlap(yl, yh, H), overlap(xl, xh, W)).flatten()
