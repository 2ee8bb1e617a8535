"""Shared fixtures: golden case discovery and a model builder from a golden case's config."""
from __future__ import annotations

import logging
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import timm  # noqa: E402

import models  # noqa: E402,F401  (registers the models)

DATA = Path(__file__).resolve().parent / 'data'
GOLDEN_DIR = Path(os.environ.get('CFVIT_GOLDEN_DIR', DATA / 'golden'))
REPO_GOLDEN_DIR = DATA / 'golden'

ARCH_TO_MODEL = {'CFVisionTransformer': 'cf_deit_small', 'CF_LV_ViT': 'cf_lvvit_small'}


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'cuda: needs a CUDA GPU (the CUDA tier: `pytest -m cuda tests`); skipped without one')


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f'no CUDA device: this torch {torch.__version__} is a CPU-only build'
    return f'no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})'


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=_no_cuda_reason())
    for item in items:
        if item.get_closest_marker('cuda') is not None:
            item.add_marker(skip)


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


@pytest.fixture
def own_logging():
    """Hide root-logger handlers that scripts run in earlier tests left behind (e.g. bound to a closed
    capture), so a script run in this test configures logging afresh."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [h for h in saved if type(h).__module__.startswith('_pytest')]
    yield
    root.handlers = saved


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=golden_case_files(), ids=lambda p: p.stem)
def golden_case(request):
    """(case dict, model with the case's weights in eval mode, x_coarse, x_fine)."""
    case = load_case(request.param)
    model = build_from_config(case['config'])
    model.load_state_dict(case['state_dict'], strict=True)
    model.eval()
    x_fine = case['x_fine_int8'].to(torch.float32) / case['x_fine_scale']
    return case, model, case['x_coarse'], x_fine
