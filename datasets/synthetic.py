"""A procedurally generated image-classification set where coarse-to-fine matters.

Every image holds one class-defining shape on a cluttered background. Half of the shapes are
large (the coarse stage can tell them apart) and half are small (a circle and a ring, or a square
and a frame, only differ at the fine resolution). Each object's box is recorded, so one can check
the method's first claim: the re-split patches should fall on the object.

The set is deterministic from its seed (each image has its own generator seeded by
``(seed, split, index)``) and is written once to an ImageFolder on disk (``train/``, ``val/``,
``boxes.json``, ``classes.txt``); no image files live in git.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ['SYNTHETIC_CLASSES', 'default_synthetic_root', 'make_synthetic_dataset', 'draw_sample',
           'load_boxes']

_logger = logging.getLogger(__name__)

#: Class names, in ImageFolder (sorted folder) order.
SYNTHETIC_CLASSES: Tuple[str, ...] = ('0_circle', '1_ring', '2_square', '3_frame', '4_triangle', '5_cross')

#: Object side as a fraction of the image: large objects, small objects.
LARGE = (0.40, 0.62)
SMALL = (0.14, 0.22)


def default_synthetic_root() -> Path:
    """Where the built-in dataset is written: ``$CFVIT_DATA_DIR`` or ``./output/data``."""
    return Path(os.environ.get('CFVIT_DATA_DIR', Path('output') / 'data')) / 'synthetic_shapes'


def _color(rng: np.random.Generator, low: int, high: int) -> Tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))  # type: ignore[return-value]


def _draw_shape(draw: ImageDraw.ImageDraw, cls: int, box: Tuple[int, int, int, int],
                color: Tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    side = x1 - x0
    width = max(1, round(side * 0.18))  # stroke of hollow shapes
    if cls == 0:
        draw.ellipse(box, fill=color)
    elif cls == 1:
        draw.ellipse(box, outline=color, width=width)
    elif cls == 2:
        draw.rectangle(box, fill=color)
    elif cls == 3:
        draw.rectangle(box, outline=color, width=width)
    elif cls == 4:
        draw.polygon([(x0 + side / 2, y0), (x1, y1), (x0, y1)], fill=color)
    elif cls == 5:
        bar = max(1, round(side * 0.3))
        cx0 = x0 + (side - bar) // 2
        draw.rectangle((cx0, y0, cx0 + bar, y1), fill=color)
        draw.rectangle((x0, cx0 - x0 + y0, x1, cx0 - x0 + y0 + bar), fill=color)
    else:
        raise ValueError(f'unknown class {cls}')


def draw_sample(seed: int, split: str, index: int, image_size: int = 64) -> Tuple[Image.Image, int, List[int], bool]:
    """One image of the set.

    Returns:
        ``(image, class index, box [x0, y0, x1, y1] in pixels (end-exclusive), is_small)``.
    """
    digest = hashlib.sha256(f'{seed}/{split}/{index}'.encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], 'little'))
    s = image_size
    cls = int(rng.integers(len(SYNTHETIC_CLASSES)))
    small = bool(rng.random() < 0.5)

    # background: a colour gradient with noise, then clutter of strokes and dots
    c0, c1 = np.array(_color(rng, 0, 110)), np.array(_color(rng, 0, 110))
    t = np.linspace(0, 1, s)[:, None, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    bg = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (s, s, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(10, 22))):
        color = _color(rng, 40, 256)
        x, y = rng.integers(0, s, 2)
        if rng.random() < 0.6:
            dx, dy = rng.integers(-s // 5, s // 5 + 1, 2)
            draw.line((int(x), int(y), int(x + dx), int(y + dy)), fill=color, width=int(rng.integers(1, 3)))
        else:
            r = int(rng.integers(2, 4))
            draw.ellipse((int(x) - r, int(y) - r, int(x) + r, int(y) + r), fill=color)

    lo, hi = SMALL if small else LARGE
    side = max(4, int(round(s * rng.uniform(lo, hi))))
    x0, y0 = (int(v) for v in rng.integers(0, s - side + 1, 2))
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    color = _color(rng, 150, 256)
    _draw_shape(draw, cls, box, color)
    img = img.filter(ImageFilter.GaussianBlur(radius=0.4))
    return img, cls, [x0, y0, x0 + side, y0 + side], small


def _params(n_train: int, n_val: int, image_size: int, seed: int) -> Dict:
    return {'generator': 'synthetic_shapes/v1', 'n_train': n_train, 'n_val': n_val,
            'image_size': image_size, 'seed': seed, 'classes': list(SYNTHETIC_CLASSES)}


def make_synthetic_dataset(root: Optional[Path] = None, n_train: int = 2400, n_val: int = 600,
                           image_size: int = 64, seed: int = 0) -> Path:
    """Write the set to ``root`` once (reused when the same parameters are already there).

    The folder is built in a temporary sibling and renamed into place, so an interrupted run never
    leaves a half-written set behind.

    Returns:
        ``root``, holding ``train/<class>/*.png``, ``val/<class>/*.png``, ``boxes.json`` (relative
        path -> ``{"box": [x0, y0, x1, y1], "small": bool}``), ``classes.txt`` and ``params.json``.
    """
    root = Path(root) if root is not None else default_synthetic_root()
    params = _params(n_train, n_val, image_size, seed)
    marker = root / 'params.json'
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return root
        except (OSError, json.JSONDecodeError):
            pass
        raise FileExistsError(f'{root} holds another dataset; remove it or choose another folder')
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.', dir=root.parent))
    try:
        boxes: Dict[str, Dict] = {}
        for split, n in (('train', n_train), ('val', n_val)):
            for name in SYNTHETIC_CLASSES:
                (tmp / split / name).mkdir(parents=True)
            for i in range(n):
                img, cls, box, small = draw_sample(seed, split, i, image_size)
                rel = f'{split}/{SYNTHETIC_CLASSES[cls]}/{i:05d}.png'
                img.save(tmp / rel, compress_level=1)
                boxes[rel] = {'box': box, 'small': small}
        (tmp / 'boxes.json').write_text(json.dumps(boxes))
        (tmp / 'classes.txt').write_text(
            '# folder\tindex\tname\n' + ''.join(f'{c}\t{i}\t{c[2:]}\n' for i, c in enumerate(SYNTHETIC_CLASSES)))
        (tmp / 'params.json').write_text(json.dumps(params))
        if root.exists():  # a concurrent writer finished first
            shutil.rmtree(tmp)
            return root
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _logger.info('wrote the synthetic dataset (%d train / %d val images) to %s', n_train, n_val, root)
    return root


def load_boxes(root: Path) -> Dict[str, Dict]:
    """The object boxes of a synthetic set: relative image path -> ``{"box": [...], "small": bool}``."""
    return json.loads((Path(root) / 'boxes.json').read_text())
