"""Token-labeling data (SPEC 7): label maps, the augmentation they follow, dense targets.

Label maps follow the TokenLabeling release: one file per training image at
``<label_root>/<class folder>/<image stem>.pt`` holding a tensor (2, K, H, W) on an H x W grid over
the whole image: ``[0]`` the teacher's top-K scores (logits; a class outside the top K counts as
logit 0), ``[1]`` their class indices (floats or integers, in ImageFolder class order).

The pipeline, split between the loader workers and the training device:

1. Worker (:class:`TokenLabelDataset`, :class:`TokenLabelTransform`): the random-resized crop records
   its box ``(top, left, height, width)`` as fractions of the image, the horizontal flip its flag,
   and geometric RandAugment ops (rotate, shear, translate) their affine map; the sample is
   ``(image, (class index, label map (2, K, H, W), box (4,), flip, theta (2, 3)))``. Only the
   small top-K map crosses the process boundary.
2. Device (:class:`TokenLabelBatch`, the engine's batch transform): the top-K scores are scattered
   to dense (B, C, H, W) score maps, RoI-aligned (``torchvision.ops.roi_align``) to the crop at
   ``label_size x label_size`` (the dense target) and at 1 x 1 (the class target), flipped and
   warped as the image was, passed through a softmax over classes and label smoothing; then
   mixup/cutmix mix images and targets alike (:class:`TokenLabelMixup`).

Two released behaviours are kept behind switches, defaulting to the release (what the paper's
CF-LV-ViT trained with); :data:`CROP_MODES` and :data:`datasets.token_targets.SMOOTHING_MODES`:

- ``crop='transposed'``: the release (TokenLabeling's ``get_labelmaps_with_coords``) passed the crop
  as ``(top, left, bottom, right)`` to ``roi_align``, which reads ``(x1, y1, x2, y2)``, so its
  targets come from the crop mirrored about the map's diagonal, in the frame of the image after
  its horizontal flip (the release flipped the whole image and map before cropping).
  ``crop='image'`` reads the crop the image got.
- ``smoothing_mode='unnormalized'``: the released targets are ``(1 - s + s / C) * p + s / C`` (summing to
  ``1 + s / C``); ``'normalized'`` gives ``(1 - s) * p + s / C``.
"""
from __future__ import annotations

import logging
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment
from timm.data.mixup import cutmix_bbox_and_lam
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.data.transforms_factory import transforms_imagenet_train
from torch.utils.data import Dataset, Subset
from torchvision.ops import roi_align

from .token_targets import SMOOTHING_MODES, TokenLabelTargets, smooth_distribution

from .folder import DatasetError, UnreadableCounter, read_substituting, rgb_loader
from .transforms import data_config

__all__ = [
    'TokenLabelError', 'LABEL_MAP_SUFFIX', 'METADATA_NAME', 'label_map_path', 'load_label_map',
    'validate_label_map', 'check_label_maps', 'folder_samples', 'CropFlipWithBox', 'TokenLabelTransform',
    'build_token_label_transform', 'keep_zero_bit_posterize', 'TokenLabelDataset', 'dense_score_maps',
    'CROP_MODES', 'crop_rois', 'token_label_targets', 'TokenLabelMixup', 'TokenLabelBatch', 'box_coverage',
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

LABEL_MAP_SUFFIX = '.pt'
#: Optional description written by make_token_labels.py beside the maps (teacher, classes, shape).
METADATA_NAME = 'token_labels.json'
#: Threads checking that the label maps exist (helps on network file systems).
STAT_THREADS = 16
#: RandAugment/AutoAugment ops that move image content (the label map must move with it).
GEOMETRIC_OPS = frozenset({'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel',
                           'TranslateYRel'})


class TokenLabelError(DatasetError):
    """A missing or malformed label map (message meant for a person)."""


# ---------------------------------------------------------------------------------------------- files
def label_map_path(label_root: PathLike, image_path: PathLike) -> Path:
    """``<label_root>/<class folder>/<image stem>.pt`` of an image in an ImageFolder tree."""
    return Path(_label_map_str(os.fspath(label_root), os.fspath(image_path)))


def _label_map_str(label_root: str, image_path: str) -> str:
    # plain string operations: this runs for every training image before training starts
    folder, name = os.path.split(image_path)
    return os.path.join(label_root, os.path.basename(folder), os.path.splitext(name)[0] + LABEL_MAP_SUFFIX)


def _all_exist(paths: Sequence[str], chunk: int = 8192) -> List[bool]:
    """``os.path.isfile`` of every path, chunks checked in parallel (stat waits on I/O, not the GIL)."""
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(max_workers=STAT_THREADS) as pool:
        return [ok for part in pool.map(lambda c: [os.path.isfile(p) for p in c], chunks) for ok in part]


def validate_label_map(label_map: Any, path: PathLike, num_classes: int,
                       expected_shape: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """Check a loaded label map and return it as float32 (2, K, H, W).

    Raises:
        TokenLabelError: not a tensor, wrong shape (or not the shape of the other maps), more
            entries than classes, class indices outside ``[0, num_classes)``, non-finite scores.
    """
    if not isinstance(label_map, torch.Tensor):
        raise TokenLabelError(f'label map {path} holds a {type(label_map).__name__}, expected a tensor '
                              f'(2, K, H, W) of top-K scores and class indices')
    shape = tuple(label_map.shape)
    if label_map.dim() != 4 or shape[0] != 2 or min(shape) < 1:
        raise TokenLabelError(f'label map {path} has shape {shape}, expected (2, K, H, W): [0] top-K scores, '
                              f'[1] their class indices')
    if expected_shape is not None and shape[1:] != tuple(expected_shape):
        raise TokenLabelError(f'label map {path} has shape {shape}, but the first label map has '
                              f'{(2, *expected_shape)}: all maps must share K, H and W')
    if shape[1] > num_classes:
        raise TokenLabelError(f'label map {path} keeps the top {shape[1]} classes, but the dataset has only '
                              f'{num_classes} classes')
    label_map = label_map.float()
    index = label_map[1]
    if not torch.isfinite(label_map).all():
        raise TokenLabelError(f'label map {path} holds NaN or infinite values')
    bad = (index < 0) | (index > num_classes - 1) | (index != index.round())
    if bad.any():
        value = index[bad][0].item()
        raise TokenLabelError(
            f'label map {path} holds class index {value:g}, but the dataset has {num_classes} classes '
            f'(indices 0..{num_classes - 1} in class-folder order): the maps were made for another class set')
    return label_map


def load_label_map(path: PathLike, num_classes: int,
                   expected_shape: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """Read and check one label map (``weights_only``: a label file never runs code).

    Raises:
        TokenLabelError: missing, unreadable or malformed (see :func:`validate_label_map`).
    """
    path = Path(path)
    try:
        label_map = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise TokenLabelError(f'label map {path} is missing') from None
    except Exception as e:  # truncated zip, pickle of a foreign type, garbage bytes
        text = str(e).strip().splitlines()
        raise TokenLabelError(f'cannot read label map {path}: {type(e).__name__}: {text[0] if text else ""}') from e
    return validate_label_map(label_map, path, num_classes, expected_shape)


def folder_samples(dataset: Dataset) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``(samples, class names)`` of an ImageFolder, or of a Subset of one (``--subset``)."""
    indices = None
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices] if indices is not None else list(dataset.indices)
        dataset = dataset.dataset
    samples = getattr(dataset, 'samples', None)
    if samples is None:
        raise TokenLabelError(f'token labels need an ImageFolder training set (class folders of images), '
                              f'got {type(dataset).__name__}')
    if indices is not None:
        samples = [samples[i] for i in indices]
    return list(samples), list(getattr(dataset, 'classes', []))


def check_distinct_label_maps(samples: Sequence[Tuple[str, Any]], paths: Sequence[PathLike]) -> None:
    """Raise :class:`TokenLabelError` naming two images whose label maps would be one file (same
    class folder and file stem, e.g. ``a.jpg`` and ``a.png``)."""
    if len(set(paths)) == len(paths):
        return
    seen: Dict[str, str] = {}
    for (image, _), path in zip(samples, paths):
        if str(path) in seen:
            raise TokenLabelError(f'images {seen[str(path)]} and {image} share the label map {path} (same class '
                                  f'folder and file stem): rename one of them')
        seen[str(path)] = image


def check_label_maps(samples: Sequence[Tuple[str, int]], label_root: PathLike, num_classes: int,
                     classes: Optional[Sequence[str]] = None) -> Tuple[int, int, int]:
    """Check before training that every image has a label map and that the first map fits.

    Args:
        samples: ``(image path, class index)`` pairs.
        label_root: the ``--token-label-data`` folder.
        num_classes: classes of the training set.
        classes: class folder names, compared with ``token_labels.json`` when the generator wrote one.

    Returns:
        ``(K, H, W)`` of the maps (every other map is checked against it when loaded).

    Unreadable images may lack a map (the generator skips them, training replaces them).

    Raises:
        TokenLabelError: naming the first readable image without a map, two images sharing one map
            file, or what is wrong with the first map.
    """
    root = Path(label_root)
    if not root.is_dir():
        raise TokenLabelError(f'--token-label-data {root} is not a folder (expected <class folder>/<image '
                              f'stem>.pt label maps; make them with make_token_labels.py)')
    meta_path = root / METADATA_NAME
    if classes and (meta_path.exists() or meta_path.is_symlink()):  # a pipe or link is refused below, not skipped
        from .safe_read import UnsafeFileError, read_structured
        try:  # a regular file of bounded size and nesting, with a list of class names
            meta = read_structured(meta_path, what='the label-map metadata', schema={'classes': ([str], None)})
        except (OSError, UnsafeFileError) as e:
            raise TokenLabelError(str(e) if isinstance(e, UnsafeFileError) else f'cannot read {meta_path}: {e}') from None
        if meta.get('classes') and list(meta['classes']) != list(classes):
            raise TokenLabelError(f'the label maps in {root} were made for {len(meta["classes"])} other classes '
                                  f'({", ".join(meta["classes"][:3])}, ...) than the training set\'s '
                                  f'{len(classes)} ({", ".join(list(classes)[:3])}, ...)')
    paths = [_label_map_str(str(root), image) for image, _ in samples]
    check_distinct_label_maps(samples, paths)
    exists = _all_exist(paths)
    missing = [i for i, ok in enumerate(exists) if not ok]
    for i in missing:  # an unreadable image needs no map (training replaces it); stops at the first readable one
        try:
            rgb_loader(samples[i][0])
        except Exception:  # PIL raises many types for broken files
            continue
        raise TokenLabelError(f'{len(missing)} of {len(samples)} training images have no label map, e.g. '
                              f'{paths[i]} for {samples[i][0]}; make them with make_token_labels.py')
    if len(missing) == len(samples):
        raise TokenLabelError(f'none of the {len(samples)} training images can be read')
    if missing:
        _logger.warning('%d training images have no label map because they cannot be read; training replaces each '
                        'by the next readable image', len(missing))
    shape = tuple(load_label_map(paths[exists.index(True)], num_classes).shape[1:])
    _logger.info('label maps in %s: %d files of shape %s', root, len(samples), (2, *shape))
    return shape  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- transforms
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


IDENTITY_THETA = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


class TokenLabelTransform:
    """Training transform of :class:`TokenLabelDataset`: timm's recipe, with its geometry recorded.

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


def _augment_ops(transform: Any) -> List[Any]:
    """timm ``AugmentOp`` objects inside a RandAugment/AutoAugment transform (or a Compose of them)."""
    if isinstance(transform, RandAugment):
        return list(transform.ops)
    if isinstance(transform, AutoAugment):
        return [op for sub_policy in transform.policy for op in sub_policy]
    return [op for t in getattr(transform, 'transforms', []) for op in _augment_ops(t)]


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
    """Make the posterize ops inside ``transform`` accept 0 bits (see :class:`_ZeroBitPosterize`)."""
    for op in _augment_ops(transform):
        if op.name.startswith('Posterize') and not isinstance(op.aug_fn, _ZeroBitPosterize):
            op.aug_fn = _ZeroBitPosterize(op.aug_fn)
    return transform


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
    keep_zero_bit_posterize(secondary)
    for t in secondary.transforms:
        if isinstance(t, AugMixAugment):
            raise TokenLabelError('AugMix cannot be combined with label maps')
        for op in _augment_ops(t):
            if op.name in GEOMETRIC_OPS:
                op.aug_fn = _RecordAffine(op.aug_fn, op.name, log)
    return TokenLabelTransform(CropFlipWithBox(crop, getattr(args, 'hflip', 0.5)), secondary, final, log)


# ---------------------------------------------------------------------------------------------- dataset
class TokenLabelDataset(Dataset):
    """Training images with their label maps.

    Args:
        samples: ``(image path, class index)`` pairs of an ImageFolder.
        label_root: folder of the label maps (``<class folder>/<image stem>.pt``).
        num_classes: classes of the training set.
        transform: a :class:`TokenLabelTransform` (attached later is fine).
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


# ---------------------------------------------------------------------------------------------- targets
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
        thetas: (B, 2, 3) geometric-augmentation maps (see :class:`TokenLabelTransform`), or None.
        num_classes: C.
        label_size: side S of the dense target (2g: one cell per fine patch); 1 for class targets only.
        smoothing: label smoothing applied after the softmax.
        crop: :data:`CROP_MODES`: ``'transposed'`` (released) or ``'image'`` (see :func:`crop_rois`).
        smoothing_mode: :data:`datasets.token_targets.SMOOTHING_MODES`: ``'unnormalized'`` (released)
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


class TokenLabelMixup(Mixup):
    """timm's batch-wise mixup/cutmix applied to images and token-label targets alike.

    Mixup blends images, class targets and dense targets with the same lambda. CutMix pastes a box
    of the flipped batch into the images; each dense cell takes the flipped batch's target in
    proportion to the share of the cell the box covers, and the class target the (corrected)
    lambda. Label smoothing was applied by :func:`token_label_targets`. Only ``mode='batch'``.
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
