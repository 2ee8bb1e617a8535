"""Crash safety of training: SIGKILL at random moments never leaves an unusable checkpoint.

A tiny training run (subprocess) is killed many times at random moments; after each kill the
output folder must hold a checkpoint that loads (weights_only) and that ``--resume`` continues
from, and no temporary file may pose as a checkpoint.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import make_image_folder
from test_main_deit import NUM_CLASSES, TINY

from utils.checkpoint import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]
KILLS = 6


def _args(data: Path, out: Path, epochs: int, resume: bool):
    argv = [a for a in TINY]
    i = argv.index('--epochs')
    argv[i + 1] = str(epochs)
    argv += ['--data-path', str(data), '--output', str(out), '--no-model-ema', '--aa', 'none', '--mixup', '0',
             '--cutmix', '0', '--reprob', '0']
    if resume and (out / 'checkpoint.pth').exists():
        argv += ['--resume', str(out / 'checkpoint.pth')]
    return [sys.executable, str(ROOT / 'main_deit.py'), *argv]


@pytest.mark.skipif(sys.platform == 'win32', reason='SIGKILL')
def test_sigkill_at_random_moments_leaves_a_resumable_checkpoint(tmp_path):
    data = make_image_folder(tmp_path / 'data', {'train': 6, 'val': 2}, NUM_CLASSES)
    out = tmp_path / 'out'
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', MPLBACKEND='Agg')
    rng = random.Random(0)
    epochs_seen = []
    for kill in range(KILLS):
        proc = subprocess.Popen(_args(data, out, 400, resume=True), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait until the run has started saving (the first kill: until a checkpoint exists)
        deadline = time.time() + 120
        while time.time() < deadline and not (out / 'checkpoint.pth').exists():
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        checkpoint = load_checkpoint_file(out / 'checkpoint.pth')
        assert {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'} <= set(checkpoint)
        assert checkpoint['model']['head.weight'].shape[0] == NUM_CLASSES
        epochs_seen.append(int(checkpoint['epoch']))
        leftovers = [p.name for p in out.iterdir() if p.name.endswith('.pth') and p.name not in
                     ('checkpoint.pth', 'best_checkpoint.pth')]
        assert leftovers == []
    assert epochs_seen == sorted(epochs_seen)  # each resume continued, never went back
    # a last resume runs to completion from where the kills left it
    last = epochs_seen[-1]
    done = subprocess.run(_args(data, out, last + 2, resume=True), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(load_checkpoint_file(out / 'checkpoint.pth')['epoch']) == last + 1
    assert not list(out.glob('.*.tmp'))  # temporary files of killed saves are cleaned up at start-up
