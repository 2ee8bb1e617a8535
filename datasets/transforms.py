"""Image transforms derived from a model's pretrained cfg (crop_pct, interpolation, mean/std), and the
fix that keeps timm's posterize working under Pillow 13 (:func:`keep_zero_bit_posterize`)."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List

import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.auto_augment import AutoAugment, RandAugment

__all__ = ['data_config', 'eval_transform', 'eval_resize_size', 'augment_ops', 'keep_zero_bit_posterize']


def data_config(model: nn.Module) -> Dict[str, Any]:
    """timm's data config of ``model``: input size (the fine side), crop_pct, interpolation, mean, std."""
    return resolve_data_config({}, model=model)


def eval_transform(model: nn.Module) -> Callable:
    """Evaluation transform of SPEC 1.

    Resize the short side to ``int(S_f / crop_pct)`` (bicubic), center-crop ``S_f``, to tensor,
    normalize. ``crop_pct`` is 0.875 for CF-DeiT and 0.9 for CF-LV-ViT. The coarse image is not
    made here: the model (or the engine) derives it from the fine one on the fly.
    """
    cfg = data_config(model)
    return create_transform(**cfg, is_training=False)


def eval_resize_size(fine_size: int, crop_pct: float) -> int:
    """Short side before the center crop, ``floor(S_f / crop_pct)`` (256 for 224 at 0.875)."""
    return int(math.floor(fine_size / crop_pct))


def augment_ops(transform: Any) -> List[Any]:
    """timm ``AugmentOp`` objects inside a RandAugment/AutoAugment transform (or a Compose of them)."""
    if isinstance(transform, RandAugment):
        return list(transform.ops)
    if isinstance(transform, AutoAugment):
        return [op for sub_policy in transform.policy for op in sub_policy]
    return [op for t in getattr(transform, 'transforms', []) for op in augment_ops(t)]


class _ZeroBitPosterize:
    """timm's posterize that keeps working at 0 bits (an all-black image, as before Pillow 13).

    ``PosterizeIncreasing`` asks for 0 bits at magnitude 10, which ``rand-m9-mstd0.5`` reaches
    (a Gaussian magnitude is clipped to 10) for about 2% of its posterize ops; Pillow >= 13 raises
    ``ValueError`` there, which stops training at the first batch that draws it.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return self.fn(img, bits_to_keep, **kwargs)


def keep_zero_bit_posterize(transform: Any) -> Any:
    """Make the posterize ops inside a timm training ``transform`` accept 0 bits (see :class:`_ZeroBitPosterize`).

    Applied once to each training transform timm builds: :func:`datasets.build.build_transform` and
    :func:`datasets.token_labels.augment.build_token_label_transform`. Returns ``transform``, changed in place.
    """
    for op in augment_ops(transform):
        if op.name.startswith('Posterize') and not isinstance(op.aug_fn, _ZeroBitPosterize):
            op.aug_fn = _ZeroBitPosterize(op.aug_fn)
    return transform
