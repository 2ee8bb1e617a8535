"""Small builders and constants shared by the test modules (pytest puts tests/ on sys.path: ``from helpers import
...``); no test module imports another (``tests/test_layout.py`` checks it)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
from functools import partial
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import timm
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also importable from outside pytest (tests/ alone on the path)
    sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401  (registers the models)

__all__ = ['make_image_folder', 'write_broken_images', 'tree_digest', 'log_lines', 'free_port', 'script_env',
           'run_main', 'one_line_error', 'golden_case_files', 'load_case', 'build_from_config',
           'ROOT', 'DATA', 'GOLDEN_DIR', 'REPO_GOLDEN_DIR', 'BROKEN_FILES', 'UNREADABLE_FILES',
           'TINY_DEIT', 'TINY_DEIT_CLASSES', 'TINY_LVVIT', 'TINY_LVVIT_CLASSES']

DATA = Path(__file__).resolve().parent / 'data'
GOLDEN_DIR = Path(os.environ.get('CFVIT_GOLDEN_DIR', DATA / 'golden'))
REPO_GOLDEN_DIR = DATA / 'golden'

ARCH_TO_MODEL = {'CFVisionTransformer': 'cf_deit_small', 'CF_LV_ViT': 'cf_lvvit_small'}

#: ``main_deit.py`` flags of a CF-DeiT small enough to train on the CPU in seconds (with a
#: :func:`make_image_folder` of :data:`TINY_DEIT_CLASSES` classes).
TINY_DEIT = [
    '--model', 'cf_deit_tiny', '--embed-dim', '48', '--depth', '4', '--num-heads', '3', '--coarse-stage-size', '2',
    '--device', 'cpu', '--no-amp', '--num_workers', '0', '--batch-size', '4', '--epochs', '2',
    '--lr', '1e-3', '--unscale-lr', '--warmup-epochs', '1', '--warmup-lr', '1e-4', '--min-lr', '1e-5',
    '--print-freq', '1000', '--seed', '3',
]
TINY_DEIT_CLASSES = 3
#: ``main_lvvit.py`` flags of a CF-LV-ViT small enough to train on the CPU in seconds (data of
#: :data:`TINY_LVVIT_CLASSES` classes in ``tests/test_main_lvvit.py``).
TINY_LVVIT = [
    '--model', 'cf_lvvit_tiny', '--embed-dim', '48', '--depth', '2', '--num-heads', '3', '--coarse-stage-size', '2',
    '--device', 'cpu', '-j', '0', '-b', '4', '--epochs', '1', '--warmup-epochs', '1', '--warmup-lr', '1e-4',
    '--lr', '1e-3', '--print-freq', '1000', '--seed', '3',
]
TINY_LVVIT_CLASSES = 4


def make_image_folder(root: Path, per_class: Dict[str, int], num_classes: int = 3, size=(40, 48),
                      seed: int = 0) -> Path:
    """``root/<split>/class<c>/<i>.png``: ``per_class[split]`` random PNGs per class, each class
    with a learnable colour signal. Returns ``root``."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in per_class.items():
        for c in range(num_classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                pixels[..., c % 3] = 220 if c < 3 else 30  # a class signal
                Image.fromarray(pixels).save(folder / f'{i}.png')
    return root


#: What :func:`write_broken_images` writes: file name -> readable (decodes to RGB) or not.
BROKEN_FILES = {'corrupt.jpg': False, 'truncated.png': False, 'gray.png': True, 'cmyk.jpg': True, 'rgba.png': True}
UNREADABLE_FILES = sum(not ok for ok in BROKEN_FILES.values())


def write_broken_images(folder: Path, size=(40, 48)) -> None:
    """A corrupt JPEG, a truncated PNG, and grayscale / CMYK / RGBA images into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    rgb.save(folder / 'full.jpg')
    jpeg = (folder / 'full.jpg').read_bytes()
    (folder / 'full.jpg').unlink()
    (folder / 'corrupt.jpg').write_bytes(jpeg[:20] + bytes(200) + b'\xff\xd9')  # header kept, data garbled
    rgb.save(folder / 'full.png')
    png = (folder / 'full.png').read_bytes()
    (folder / 'full.png').unlink()
    (folder / 'truncated.png').write_bytes(png[:len(png) // 3])
    rgb.convert('L').save(folder / 'gray.png')
    rgb.convert('CMYK').save(folder / 'cmyk.jpg')
    rgb.convert('RGBA').save(folder / 'rgba.png')


def tree_digest(*roots: Path) -> Dict[str, str]:
    """SHA-256 of every file under ``roots`` (or of the file itself), with its size and mtime."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob('*') if p.is_file())
        for p in files:
            st = p.stat()
            out[str(p)] = f'{hashlib.sha256(p.read_bytes()).hexdigest()} {st.st_size} {st.st_mtime_ns}'
    return out


def log_lines(out: Path) -> List[dict]:
    """The records of a training run's ``log.txt``."""
    return [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def script_env() -> Dict[str, str]:
    """Environment of a script run as a subprocess: offline, one thread, no inherited launcher variables."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    return env


def run_main(script, argv, capsys, caplog):
    """``(exit status, everything the run printed or logged)`` of ``script.main(argv)`` in-process;
    argparse's SystemExit gives its code."""
    with caplog.at_level(logging.INFO):
        try:
            code = script.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    out, err = capsys.readouterr()
    return code, '\n'.join([out, err, caplog.text])


def one_line_error(code: int, text: str, message: str) -> None:
    """Exit status 2, no traceback, and ``message`` on one line of the output."""
    assert code == 2, text[-3000:]  # EXIT_BAD_INPUT
    assert 'Traceback' not in text, text[-3000:]
    assert any(message in line for line in text.splitlines()), f'{message!r} not in:\n{text[-3000:]}'


# ---------------------------------------------------------------------------------------------- golden cases
def golden_case_files(directory: Path = GOLDEN_DIR) -> List[Path]:
    """Case files (``*.pt`` with a ``config``) of a golden folder; dynamic_evaluate.pt is not a case."""
    return sorted(p for p in directory.glob('*.pt') if p.name != 'dynamic_evaluate.pt')


def load_case(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location='cpu', weights_only=True)


def build_from_config(cfg: Dict[str, Any]) -> torch.nn.Module:
    """The model a golden case describes, built through the timm registry."""
    target = list(cfg['target_index'])
    start = target[0]
    assert target == list(range(start, cfg['depth'])), f'non-contiguous selection blocks {target}'
    eps = float(cfg['norm_layer'].split('eps=')[1].rstrip(')'))
    kwargs = dict(
        img_size_list=cfg['img_size_list'], patch_size=cfg['patch_size'], embed_dim=cfg['embed_dim'],
        depth=cfg['depth'], num_heads=cfg['num_heads'], mlp_ratio=cfg['mlp_ratio'], qkv_bias=cfg['qkv_bias'],
        num_classes=cfg['num_classes'], drop_rate=cfg.get('drop_rate', 0.0),
        drop_path_rate=cfg.get('drop_path_rate', 0.0), informative_ratio=cfg['alpha'],
        attn_ema_beta=cfg['ema_beta'], selection_start_block=start,
        norm_layer=partial(torch.nn.LayerNorm, eps=eps),
    )
    if cfg['arch'] == 'CF_LV_ViT':
        assert cfg.get('p_emb', '4_2') == '4_2'
        kwargs.update(skip_lam=cfg['skip_lam'], mix_token=cfg.get('mix_token', True))
    return timm.create_model(ARCH_TO_MODEL[cfg['arch']], **kwargs)
