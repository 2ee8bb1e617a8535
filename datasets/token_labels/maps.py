"""Label-map files (SPEC 7): where each image's map lives, reading and checking one, and checking
them all before training starts.

Label maps follow the TokenLabeling release: one file per training image at
``<label_root>/<class folder>/<image stem>.pt`` holding a tensor (2, K, H, W) on an H x W grid over
the whole image: ``[0]`` the teacher's top-K scores (logits; a class outside the top K counts as
logit 0), ``[1]`` their class indices (floats or integers, in ImageFolder class order).
``make_token_labels.py`` writes them, with an optional ``token_labels.json`` (:data:`METADATA_NAME`)
beside them naming the teacher and the classes.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset, Subset

from ..folder import DatasetError, rgb_loader
from ..safe_read import UnsafeFileError, read_structured

__all__ = [
    'TokenLabelError', 'LABEL_MAP_SUFFIX', 'METADATA_NAME', 'label_map_path', 'validate_label_map', 'load_label_map',
    'folder_samples', 'check_distinct_label_maps', 'check_label_maps',
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

LABEL_MAP_SUFFIX = '.pt'
#: Optional description written by make_token_labels.py beside the maps (teacher, classes, shape).
METADATA_NAME = 'token_labels.json'
#: Threads checking that the label maps exist (helps on network file systems).
STAT_THREADS = 16


class TokenLabelError(DatasetError):
    """A missing or malformed label map (message meant for a person)."""


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

