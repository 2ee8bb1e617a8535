"""Token-label targets, made on the training device (SPEC 7): the soft targets of a batch
(:class:`TokenLabelTargets`), their label smoothing, and their computation from the label maps and the
recorded augmentation (:func:`token_label_targets`).

The top-K scores are scattered to dense (B, C, H, W) score maps, RoI-aligned
(``torchvision.ops.roi_align``) to the crop at ``label_size x label_size`` (the dense target) and at
1 x 1 (the class target), flipped and warped as the image was, passed through a softmax over classes
and label smoothing.

Two released behaviours are kept behind switches, defaulting to the release (what the paper's
CF-LV-ViT trained with); :data:`CROP_MODES` and :data:`SMOOTHING_MODES`:

- ``crop='transposed'``: the release (TokenLabeling's ``get_labelmaps_with_coords``) passed the crop
  as ``(top, left, bottom, right)`` to ``roi_align``, which reads ``(x1, y1, x2, y2)``, so its
  targets come from the crop mirrored about the map's diagonal, in the frame of the image after
  its horizontal flip (the release flipped the whole image and map before cropping).
  ``crop='image'`` reads the crop the image got.
- ``smoothing_mode='unnormalized'``: the released targets are ``(1 - s + s / C) * p + s / C`` (summing to
  ``1 + s / C``); ``'normalized'`` gives ``(1 - s) * p + s / C``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

__all__ = [
    'IDENTITY_THETA', 'TokenLabelTargets', 'SMOOTHING_MODES', 'smooth_distribution', 'dense_score_maps', 'CROP_MODES',
    'crop_rois', 'token_label_targets',
]

#: The ``theta`` of an image no geometric op moved (``F.affine_grid``'s identity).
IDENTITY_THETA = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


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


def dense_score_maps(label_maps: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Scatter top-K maps (B, 2, K, H, W) to dense score maps (B, C, H, W); other classes score 0."""
    scores = label_maps[:, 0].float()
    index = label_maps[:, 1].round().long()
    B, _, H, W = scores.shape
    return scores.new_zeros(B, num_classes, H, W).scatter_(1, index, scores)


#: Which part of the label map the targets are read from (``--token-label-crop``): ``'transposed'``
#: as released (the crop mirrored about the diagonal of the flipped image's frame), ``'image'`` the
#: crop the image got.
CROP_MODES = ('transposed', 'image')


def crop_rois(boxes: torch.Tensor, height: int, width: int, flips: Optional[torch.Tensor] = None,
              crop: str = 'image') -> torch.Tensor:
    """(B, 4) crop boxes -> (B, 5) ``roi_align`` boxes ``(batch index, x1, y1, x2, y2)`` in map pixels.

    Args:
        boxes: ``(top, left, height, width)`` as fractions of the image (before its flip).
        height, width: the label map's H and W (pixel i spans [i, i+1]; use ``aligned=True``).
        flips: (B,) bool, the crop is flipped afterwards (the caller flips the RoI-aligned target);
            used by ``crop='transposed'`` only.
        crop: ``'image'``: the crop itself. ``'transposed'``: the released box. The release flipped
            image and map first and cropped at ``(top, left')`` with ``left' = 1 - left - w`` in
            the flipped frame, then read ``x`` over ``[top, top + h]`` and ``y`` over ``[left', left' +
            w]``, both scaled by the map's W. On the unflipped map that is ``x`` over ``[top, top + h]``
            and ``y`` over ``[left, left + w]`` for an unflipped crop, and ``x`` over ``[1 - top - h, 1 -
            top]``, ``y`` over ``[1 - left - w, 1 - left]`` (then flipped by the caller) for a flipped one.
    """
    if crop not in CROP_MODES:
        raise ValueError(f'crop must be one of {CROP_MODES}, got {crop!r}')
    top, left, h, w = boxes.float().unbind(1)
    index = torch.arange(boxes.shape[0], device=boxes.device, dtype=torch.float32)
    if crop == 'image':
        return torch.stack([index, left * width, top * height, (left + w) * width, (top + h) * height], dim=1)
    if flips is not None:
        flipped = flips.to(device=boxes.device, dtype=torch.bool)
        top, left = torch.where(flipped, 1.0 - top - h, top), torch.where(flipped, 1.0 - left - w, left)
    return torch.stack([index, top * width, left * width, (top + h) * width, (left + w) * width], dim=1)


def token_label_targets(
        label_maps: torch.Tensor,
        boxes: torch.Tensor,
        flips: torch.Tensor,
        thetas: Optional[torch.Tensor],
        num_classes: int,
        label_size: int,
        smoothing: float = 0.0,
        crop: str = 'transposed',
        smoothing_mode: str = 'unnormalized',
) -> TokenLabelTargets:
    """Class and dense targets of a batch from its label maps and recorded augmentation.

    Args:
        label_maps: (B, 2, K, H, W) top-K scores and class indices over whole images.
        boxes: (B, 4) crop boxes ``(top, left, height, width)`` as fractions of the image.
        flips: (B,) bool, the crop was flipped horizontally.
        thetas: (B, 2, 3) geometric-augmentation maps (see
            :class:`~datasets.token_labels.augment.TokenLabelTransform`), or None.
        num_classes: C.
        label_size: side S of the dense target (2g: one cell per fine patch); 1 for class targets only.
        smoothing: label smoothing applied after the softmax.
        crop: :data:`CROP_MODES`: ``'transposed'`` (released) or ``'image'`` (see :func:`crop_rois`).
        smoothing_mode: :data:`SMOOTHING_MODES`: ``'unnormalized'`` (released)
            or ``'normalized'``.

    Returns:
        :class:`TokenLabelTargets` with ``cls`` (B, C) and ``dense`` (B, S*S, C) (None for S = 1),
        the scores RoI-aligned to the crop, flipped and warped as the image, softmaxed over classes.
    """
    maps = dense_score_maps(label_maps, num_classes)  # (B, C, H, W)
    rois = crop_rois(boxes, maps.shape[-2], maps.shape[-1], flips, crop)
    cls = roi_align(maps, rois, output_size=1, aligned=True).flatten(1)  # (B, C)
    cls = smooth_distribution(cls.softmax(dim=-1), smoothing, smoothing_mode)
    if label_size <= 1:
        return TokenLabelTargets(cls=cls, dense=None)
    dense = roi_align(maps, rois, output_size=label_size, aligned=True)  # (B, C, S, S)
    flips = flips.to(torch.bool).view(-1, 1, 1, 1)
    dense = torch.where(flips, dense.flip(-1), dense)
    if thetas is not None:
        warped = ~torch.isclose(thetas.float(), IDENTITY_THETA.to(thetas.device)).flatten(1).all(dim=1)
        rows = warped.nonzero().squeeze(1)
        if rows.numel():
            sub = dense[rows]
            grid = F.affine_grid(thetas[rows].float(), list(sub.shape), align_corners=False)
            # outside the crop (filled pixels) all scores are 0: a uniform distribution
            dense = dense.index_copy(0, rows, F.grid_sample(sub, grid, mode='bilinear', padding_mode='zeros',
                                                            align_corners=False))
    dense = dense.softmax(dim=1).flatten(2).transpose(1, 2)  # (B, S*S, C)
    dense = smooth_distribution(dense, smoothing, smoothing_mode)
    return TokenLabelTargets(cls=cls, dense=dense)

