"""Make ``docs/visualize_example.png``: visualize.py run on images this script draws itself.

The images are procedural (one bold shape, large or small, on a cluttered background), so the
picture in the README needs no photograph from any dataset. The model has random weights until a
trained checkpoint is published; pass ``--resume CKPT`` to use one.

    .venv/bin/python docs/make_visualize_example.py [--resume CKPT] [--model cf_deit_tiny]
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple,
           outline: tuple, width: int) -> None:
    """Draw a star, ring, triangle or square of radius ``r`` centred at (cx, cy)."""
    if kind == 'ring':
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r / 3)))
    elif kind == 'star':
        pts = [(cx + (r if i % 2 == 0 else r / 2.3) * math.cos(math.pi * i / 5 - math.pi / 2),
                cy + (r if i % 2 == 0 else r / 2.3) * math.sin(math.pi * i / 5 - math.pi / 2)) for i in range(10)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    elif kind == 'triangle':
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    else:
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)


def synthetic_image(seed: int, size: int = 224) -> Image.Image:
    """One object (its size drawn between 6% and 35% of the side) on a cluttered background."""
    rng = random.Random(seed)
    base = tuple(rng.randint(150, 230) for _ in range(3))
    im = Image.new('RGB', (size, size), base)
    draw = ImageDraw.Draw(im)
    for _ in range(70):  # clutter: small pale strokes and blobs
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        s = rng.uniform(2, size / 14)
        colour = tuple(min(255, max(0, c + rng.randint(-60, 60))) for c in base)
        if rng.random() < 0.5:
            draw.line((x, y, x + rng.uniform(-3, 3) * s, y + rng.uniform(-3, 3) * s), fill=colour, width=2)
        else:
            draw.ellipse((x - s, y - s, x + s, y + s), fill=colour)
    kind = rng.choice(['star', 'ring', 'triangle', 'square'])
    r = size * rng.uniform(0.06, 0.35)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = rng.choice([(200, 30, 40), (20, 60, 190), (20, 140, 60), (240, 170, 0), (120, 30, 150)])
    _shape(draw, kind, cx, cy, r, fill, outline=(20, 20, 20), width=2)
    return im


def write_synthetic_images(folder: Path, count: int, seed: int = 0, size: int = 224) -> List[Path]:
    """Write ``count`` synthetic PNGs into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f'synthetic_{i:03d}.png'
        synthetic_image(seed * 10007 + i, size).save(path)
        paths.append(path)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='cf_deit_tiny')
    p.add_argument('--resume', default='')
    p.add_argument('--num-images', type=int, default=8)
    p.add_argument('--panel-size', type=int, default=160)
    p.add_argument('--out', default=str(ROOT / 'docs' / 'visualize_example.png'))
    args = p.parse_args(argv)

    import visualize
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / 'images'
        write_synthetic_images(images, args.num_images)
        out_dir = Path(tmp) / 'out'
        argv = ['--model', args.model, '--img-path', str(images), '--output-dir', str(out_dir),
                '--num-images', str(args.num_images), '--panel-size', str(args.panel_size),
                '--num-workers', '0', '--device', 'cpu']
        if args.resume:
            argv += ['--resume', args.resume]
        code = visualize.main(argv)
        if code:
            return code
        pngs = [out_dir / 'fine_stage.png', out_dir / 'coarse_exit.png']
        png = next(p for p in pngs if p.exists())
        # A 256-colour palette keeps the committed picture small; the script itself writes full RGB.
        Image.open(png).convert('RGB').quantize(256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f'wrote {args.out} ({os.path.getsize(args.out) // 1024} KB) from {png.name}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
