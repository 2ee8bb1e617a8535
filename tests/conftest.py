"""Shared fixtures and hooks: the CUDA marker, the golden cases, logging and thread settings (plain helpers
live in ``helpers.py``)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from helpers import build_from_config, golden_case_files, load_case  # noqa: E402


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
