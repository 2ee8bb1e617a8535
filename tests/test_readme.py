"""The README's own commands, run as a newcomer would: from a folder outside the repository.

Each test takes its command from README.md itself (so an edit that breaks a command breaks CI),
replaces only the placeholders a user would fill in (checkpoint and data paths, the model size
that fits CI), and runs it in a temporary folder with nothing of the repository on the path but
what the README says to set (``PYTHONPATH`` for library code; scripts run by their path).
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import timm
import torch

import models  # noqa: F401

from helpers import script_env

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()


def _section(title: str) -> str:
    start = README.index(f'## {title}')
    end = README.find('\n## ', start + 1)
    return README[start:end if end > 0 else None]


def _code_blocks(text: str, lang: str) -> List[str]:
    return re.findall(rf'```{lang}\n(.*?)```', text, flags=re.S)


def _command(prefix: str) -> List[str]:
    """The README's command line starting with ``prefix``, as argv with the script made a full path."""
    for block in _code_blocks(README, 'bash') + _code_blocks(README, ''):
        for line in block.splitlines():
            if line.startswith(prefix):
                argv = shlex.split(line.split('  #')[0])
                assert argv[0] == 'python' and argv[1].endswith('.py'), line
                return [sys.executable, str(ROOT / argv[1]), *argv[2:]]
    raise AssertionError(f'README.md has no command starting with {prefix!r}')


def _run(argv: List[str], cwd: Path, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env or script_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{argv}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}'
    return proc


def test_using_the_models_snippet_runs_outside_the_repository(tmp_path):
    snippet = _code_blocks(_section('Recipes'), 'python')[0]
    assert "REPO = '/path/to/CF-ViT'" in snippet and 'sys.path.insert(0, REPO)' in snippet  # runs from anywhere
    assert 'build_from_checkpoint(checkpoint)' in snippet
    # a stand-in for the quick start's checkpoint, in a training checkpoint's layout (it records its model)
    model = timm.create_model('cf_deit_tiny', coarse_stage_size=3, num_classes=6, embed_dim=48, depth=2, num_heads=3)
    args = argparse.Namespace(model='cf_deit_tiny', coarse_stage_size=3, embed_dim=48, depth=2, num_heads=3,
                              model_kwargs=[])
    torch.save({'model': model.state_dict(), 'args': args}, tmp_path / 'checkpoint.pth')
    lines = snippet.splitlines()
    (checkpoint_line,) = [i for i, line in enumerate(lines) if line.startswith('CHECKPOINT = ')]
    lines[checkpoint_line] = f'CHECKPOINT = {str(tmp_path / "checkpoint.pth")!r}'
    code = '\n'.join(lines).replace("'/path/to/CF-ViT'", repr(str(ROOT)))
    (tmp_path / 'snippet.py').write_text(code)
    env = script_env()
    env.pop('PYTHONPATH', None)  # the snippet sets the path itself
    proc = _run([sys.executable, 'snippet.py'], tmp_path, env)
    assert proc.stdout.strip().splitlines()[-1].startswith('cf_deit_tiny 3 (8, 6) [')


def test_cpu_smoke_run_and_one_evaluation_mode_outside_the_repository(tmp_path):
    smoke = _command('python main_deit.py --device cpu --model cf_deit_tiny')
    assert '--data-path' not in smoke  # the built-in data: nothing outside a clone is needed
    # as written, shortened for CI (argparse takes the last value): one epoch of 32 images, a narrow model
    _run(smoke + ['--epochs', '1', '--subset', '32', '--embed-dim', '48', '--depth', '2', '--num-heads', '3',
                  '--num_workers', '0'], tmp_path)
    ckpt = tmp_path / 'output' / 'deit' / 'checkpoint.pth'
    assert ckpt.is_file() and (tmp_path / 'output' / 'deit' / 'log.txt').is_file()

    mode0 = _command('python dynamic_inference.py --eval-mode 0 --data_url PATH')
    data = tmp_path / 'output' / 'data' / 'synthetic_shapes'
    assert data.is_dir()  # written by the smoke run in the folder it ran in
    fill = {'PATH': str(data), 'CKPT': str(ckpt), 'cf_deit_small': 'cf_deit_tiny', '7': '3', '64': '32'}
    argv = [fill.get(a, a) for a in mode0]
    proc = _run(argv + ['--num-workers', '0', '--output-dir', str(tmp_path / 'eval')], tmp_path)
    report = (tmp_path / 'eval' / 'anytime.json')
    assert report.is_file(), proc.stderr[-2000:]
    assert 'anytime_classification' in report.read_text()
