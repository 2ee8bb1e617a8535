"""The token-label training augmentation: timm's recipe, with the geometry it applies recorded so
that the label map can follow the image (SPEC 7).

The random-resized crop records its box ``(top, left, height, width)`` as fractions of the image
(:class:`CropFlipWithBox`), the horizontal flip its flag, and geometric RandAugment ops (rotate, shear,
translate) their affine map; :class:`TokenLabelTransform` returns ``(image, box (4,), flipped, theta
(2, 3))``. The records are turned into targets on the device (:mod:`datasets.token_labels.targets`).
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, List, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.auto_augment import AugMixAugment
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.data.transforms_factory import transforms_imagenet_train

from ..transforms import augment_ops, data_config, keep_zero_bit_posterize
from .maps import TokenLabelError
from .targets import IDENTITY_THETA

__all__ = [
    'GEOMETRIC_OPS', 'CropFlipWithBox', 'pil_affine_matrix', 'TokenLabelTransform',
    'build_token_label_transform',
]

#: RandAugment/AutoAugment ops that move image content (the label map must move with it).
GEOMETRIC_OPS = frozenset({'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel',
                           'TranslateYRel'})


class CropFlipWithBox:
    """timm's random-resized crop and a horizontal flip that report the crop box and the flip.

    Args:
        crop: the ``RandomResizedCropAndInterpolation`` of timm's training transform (its size,
            scale, ratio and interpolation are used).
        hflip: flip probability.
    """

    def __init__(self, crop: RandomResizedCropAndInterpolation, hflip: float = 0.5) -> None:
        self.crop = crop
        self.hflip = float(hflip)

    def __call__(self, img: Image.Image) -> Tuple[Image.Image, torch.Tensor, bool]:
        """``(cropped image, box (top, left, height, width) as fractions of the image, flipped)``."""
        width, height = img.size
        i, j, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        img = TF.resized_crop(img, i, j, h, w, list(self.crop.size), interpolation)
        flip = self.hflip > 0 and torch.rand(1).item() < self.hflip
        if flip:
            img = TF.hflip(img)
        box = torch.tensor([i / height, j / width, h / height, w / width], dtype=torch.float32)
        return img, box, bool(flip)


def pil_affine_matrix(name: str, args: Sequence[float], size: Tuple[int, int]) -> np.ndarray:
    """The 3x3 map from output to input pixel coordinates of one of timm's geometric ops.

    PIL's AFFINE convention: the output pixel at continuous coordinates (x, y) (pixel i spans
    [i, i+1]) takes the input at ``(a x + b y + c, d x + e y + f)``; rotation is about the centre.
    """
    w, h = size
    if name == 'Rotate':
        angle = -math.radians(float(args[0]))
        a, b, d, e = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
        cx, cy = w / 2.0, h / 2.0
        c, f = cx - a * cx - b * cy, cy - d * cx - e * cy
    elif name == 'ShearX':
        a, b, c, d, e, f = 1.0, float(args[0]), 0.0, 0.0, 1.0, 0.0
    elif name == 'ShearY':
        a, b, c, d, e, f = 1.0, 0.0, 0.0, float(args[0]), 1.0, 0.0
    elif name in ('TranslateXRel', 'TranslateX'):
        shift = float(args[0]) * (w if name.endswith('Rel') else 1.0)
        a, b, c, d, e, f = 1.0, 0.0, shift, 0.0, 1.0, 0.0
    elif name in ('TranslateYRel', 'TranslateY'):
        shift = float(args[0]) * (h if name.endswith('Rel') else 1.0)
        a, b, c, d, e, f = 1.0, 0.0, 0.0, 0.0, 1.0, shift
    else:
        raise ValueError(f'{name} is not a geometric op')
    return np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])


class _RecordAffine:
    """Wraps a timm op function: applies it and appends its affine map to a shared log."""

    def __init__(self, fn: Callable, name: str, log: List[np.ndarray]) -> None:
        self.fn, self.name, self.log = fn, name, log

    def __call__(self, img: Image.Image, *args: Any, **kwargs: Any) -> Image.Image:
        self.log.append(pil_affine_matrix(self.name, args, img.size))
        return self.fn(img, *args, **kwargs)


def _grid_theta(pixel_map: np.ndarray, size: Tuple[int, int]) -> torch.Tensor:
    """A pixel-coordinate map as the (2, 3) ``theta`` of ``F.affine_grid`` (align_corners=False)."""
    w, h = size
    to_pixels = np.array([[w / 2.0, 0.0, w / 2.0], [0.0, h / 2.0, h / 2.0], [0.0, 0.0, 1.0]])
    theta = np.linalg.inv(to_pixels) @ pixel_map @ to_pixels
    return torch.tensor(theta[:2], dtype=torch.float32)


class TokenLabelTransform:
    """Training transform of :class:`~datasets.token_labels.dataset.TokenLabelDataset`: timm's recipe, with
    its geometry recorded.

    ``crop_flip`` (:class:`CropFlipWithBox`), then the ``secondary`` transforms (RandAugment or
    colour jitter) whose geometric ops append to ``log``, then ``final`` (to tensor, normalize,
    random erasing) -- the order of timm's ``create_transform``.
    """

    def __init__(self, crop_flip: CropFlipWithBox, secondary: Callable, final: Callable,
                 log: List[np.ndarray]) -> None:
        self.crop_flip, self.secondary, self.final, self.log = crop_flip, secondary, final, log

    def __call__(self, img: Image.Image) -> Tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor]:
        """``(image (3, S, S), box (4,), flipped, theta (2, 3))``.

        ``theta`` maps the augmented crop's normalized coordinates ([-1, 1], ``affine_grid``
        convention) to those of the crop before the geometric ops: identity without them.
        """
        img, box, flip = self.crop_flip(img)
        self.log.clear()
        img = self.secondary(img)
        total = np.eye(3)
        for m in self.log:  # op 1 first: out -> in of op n, ..., of op 1 = M_1 @ ... @ M_n
            total = total @ m
        theta = _grid_theta(total, img.size) if self.log else IDENTITY_THETA.clone()
        return self.final(img), box, flip, theta


def build_token_label_transform(args: Any, model: torch.nn.Module) -> TokenLabelTransform:
    """The token-label training transform at the model's fine input size, from timm's factory.

    Uses the flags of ``datasets.build.build_transform`` (``--aa``, ``--color-jitter``,
    ``--train-interpolation``, ``--reprob/--remode/--recount``, ``--crop-scale``) plus ``--hflip``.
    """
    cfg = data_config(model)
    aa = args.aa if args.aa and args.aa.lower() != 'none' else None
    if aa is not None and 'augmix' in aa:
        raise TokenLabelError('AugMix blends differently transformed copies of an image, which a label map '
                              'cannot follow: use a rand-* or AutoAugment policy with --token-label')
    primary, secondary, final = transforms_imagenet_train(
        img_size=cfg['input_size'][-2:], scale=tuple(getattr(args, 'crop_scale', None) or (0.08, 1.0)),
        hflip=0.0, color_jitter=args.color_jitter, auto_augment=aa, interpolation=args.train_interpolation,
        mean=cfg['mean'], std=cfg['std'], re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        separate=True)
    crop = primary.transforms[0]
    if not isinstance(crop, RandomResizedCropAndInterpolation) or len(primary.transforms) != 1:
        raise TokenLabelError(f'unexpected timm training transform {primary}')
    log: List[np.ndarray] = []
    keep_zero_bit_posterize(secondary)  # timm's posterize fails at 0 bits with Pillow 13
    for t in secondary.transforms:
        if isinstance(t, AugMixAugment):
            raise TokenLabelError('AugMix cannot be combined with label maps')
        for op in augment_ops(t):
            if op.name in GEOMETRIC_OPS:
                op.aug_fn = _RecordAffine(op.aug_fn, op.name, log)
    return TokenLabelTransform(CropFlipWithBox(crop, getattr(args, 'hflip', 0.5)), secondary, final, log)

