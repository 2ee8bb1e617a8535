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

from helpers import TINY_DEIT as TINY
from helpers import TINY_DEIT_CLASSES as NUM_CLASSES
from helpers import make_image_folder

from utils.common.checkpoint import load_checkpoint_file

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


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.1)
    assert proc.poll() is None, 'the run ended before it could be interrupted'


@pytest.mark.skipif(sys.platform == 'win32', reason='POSIX signals')
def test_sigint_and_sigterm_end_every_loop_with_130_or_143(tmp_path):
    """SIGINT / SIGTERM sent to the whole process group (as a terminal's Ctrl-C and a scheduler do), with
    loader workers: training, label-map generation and evaluation end with 130 / 143, one line and no
    traceback; the last checkpoint and every label map written load."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    import models  # noqa: F401
    data = make_image_folder(tmp_path / 'data', {'train': 6, 'val': 2}, NUM_CLASSES)
    big = tmp_path / 'big'  # slow to decode: the evaluation loops are still running when the signal comes
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(tmp_path / 'b.png')
    for split in ('train', 'val'):
        for c in range(NUM_CLASSES):
            (big / split / f'class{c}').mkdir(parents=True)
            for i in range(150):
                os.link(tmp_path / 'b.png', big / split / f'class{c}' / f'{i}.png')
    torch.manual_seed(0)
    model = timm.create_model('cf_deit_tiny', coarse_stage_size=2, num_classes=NUM_CLASSES, embed_dim=48, depth=2,
                              num_heads=3)
    torch.save({'model': model.state_dict()}, tmp_path / 'ckpt.pth')
    arch = ['--model-kwargs', 'embed_dim=48', 'depth=2', 'num_heads=3']
    train = [a if a != '0' or prev != '--num_workers' else '2' for prev, a in zip([''] + TINY, TINY)]
    runs = {  # name: (argv, signal, ready when)
        'train-int': ([str(ROOT / 'main_deit.py'), *train, '--epochs', '400', '--data-path', str(data),
                       '--output', str(tmp_path / 'ti'), '--aa', 'none'], signal.SIGINT,
                      lambda: (tmp_path / 'ti' / 'checkpoint.pth').exists()),
        'train-term': ([str(ROOT / 'main_deit.py'), *train, '--epochs', '400', '--data-path', str(data),
                        '--output', str(tmp_path / 'tt'), '--aa', 'none'], signal.SIGTERM,
                       lambda: (tmp_path / 'tt' / 'checkpoint.pth').exists()),
        'labels': ([str(ROOT / 'make_token_labels.py'), str(big), '--teacher', 'cf_deit_tiny', '--checkpoint',
                    str(tmp_path / 'ckpt.pth'), '--coarse-stage-size', '2', *arch, '--output', str(tmp_path / 'maps'),
                    '-j', '2', '-b', '1', '--device', 'cpu'], signal.SIGTERM, lambda: 'to write' in _log('labels')),
        'eval': ([str(ROOT / 'dynamic_inference.py'), '--eval-mode', '0', '--data_url', str(big), '--checkpoint_path',
                  str(tmp_path / 'ckpt.pth'), '--model', 'cf_deit_tiny', '--coarse-stage-size', '2', *arch,
                  '--batch_size', '1', '--num-workers', '2', '--device', 'cpu', '--output-dir', str(tmp_path / 'di')],
                 signal.SIGINT, lambda: 'validation set:' in _log('eval')),
        'visualize': ([str(ROOT / 'visualize.py'), '--data-path', str(big / 'val'), '--resume',
                       str(tmp_path / 'ckpt.pth'),
                       '--model', 'cf_deit_tiny', '--coarse-stage-size', '2', *arch, '--batch-size', '1',
                       '--num-workers', '2', '--device', 'cpu', '--no-progress', '--output-dir', str(tmp_path / 'vis')],
                      signal.SIGTERM, lambda: 'images from' in _log('visualize')),
    }

    def _log(name: str) -> str:
        return b''.join((tmp_path / f'{name}.{s}').read_bytes() for s in ('out', 'err')).decode(errors='replace')

    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', MPLBACKEND='Agg', PYTHONUNBUFFERED='1')
    procs = {}
    stopped_in_step = {}
    for name, (argv, _, _) in runs.items():
        with open(tmp_path / f'{name}.out', 'wb') as out, open(tmp_path / f'{name}.err', 'wb') as err:
            procs[name] = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=out, stderr=err,
                                           start_new_session=True)  # its own process group, as at a terminal
    try:
        for name, (_, sig, ready) in runs.items():
            _wait_for(ready, procs[name])
            time.sleep(1.0)  # inside the loop, loader workers running
            os.killpg(procs[name].pid, sig)
        for name, (_, sig, _) in runs.items():
            code = procs[name].wait(timeout=120)
            text = _log(name)
            assert code == 128 + sig, f'{name}: exit {code}\n{text[-3000:]}'
            # SIGTERM inside a training step: the step checkpoint; during evaluation or start-up: plain interrupt
            said = ('stopped on request (SIGTERM) at a step boundary', 'interrupted') if name == 'train-term' \
                else ('interrupted',)
            assert 'Traceback' not in text and any(s in text for s in said), f'{name}:\n{text[-3000:]}'
            stopped_in_step[name] = said[0] in text
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for run in ('ti', 'tt'):
        checkpoint = load_checkpoint_file(tmp_path / run / 'checkpoint.pth')
        assert isinstance(checkpoint['epoch'], int) and checkpoint['model']['head.weight'].shape[0] == NUM_CLASSES
        assert not list((tmp_path / run).glob('.*.tmp'))
    # SIGTERM in a training step: that step finished, then a mid-epoch checkpoint (utils.train.checkpointing)
    assert (tmp_path / 'tt' / 'checkpoint_step.pth').exists() == stopped_in_step['train-term']
    if stopped_in_step['train-term']:
        step = load_checkpoint_file(tmp_path / 'tt' / 'checkpoint_step.pth')
        assert step['model']['head.weight'].shape[0] == NUM_CLASSES
    assert not (tmp_path / 'ti' / 'checkpoint_step.pth').exists()
    maps = list((tmp_path / 'maps').rglob('*.pt'))
    assert len(maps) < 2 * 3 * 150 // 2  # stopped early (train/ only: 450 images)
    for p in maps:  # every map written is complete
        assert load_checkpoint_file(p).shape[0] == 2


def test_a_process_with_a_leftover_loader_worker_still_exits(tmp_path):
    """A DataLoader iterator left alive (as a caught exception's traceback keeps one) has workers that ignore
    SIGTERM (utils.common.signals.quiet_worker_signals); multiprocessing's exit handler terminates them with
    SIGTERM and joins them, so without utils.common.signals' own exit hook the process would never end."""
    script = tmp_path / 'leftover.py'
    script.write_text(
        'import sys\n'
        f'sys.path.insert(0, {str(ROOT)!r})\n'
        'import torch\n'
        'from utils.common.signals import handle_stop_signals, quiet_worker_signals\n'
        'with handle_stop_signals():\n'
        '    loader = torch.utils.data.DataLoader(list(range(64)), batch_size=2, num_workers=2,\n'
        '                                         worker_init_fn=quiet_worker_signals)\n'
        '    KEEP = iter(loader)\n'
        '    next(KEEP)\n'
        'print("done", flush=True)\n')
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0 and 'done' in proc.stdout, proc.stderr[-2000:]
