"""Issue 31, cause 6: a stop signal while a script starts (importing torch and timm) is one line and
128 + the signal number, never a traceback or a silent 143.

Each script is started for real and signalled as soon as it has installed its start-up handler (read
from the kernel's ``SigCgt`` mask of the process), while its imports still run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import script_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ['main_deit.py', 'main_lvvit.py', 'dynamic_inference.py', 'visualize.py', 'make_token_labels.py',
           'export_onnx.py', 'quickstart.py']


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (Python has none of its own)."""
    try:
        status = Path(f'/proc/{pid}/status').read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith('SigCgt:')), 16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not Path('/proc/self/status').exists(), reason='needs /proc to see when the handler is in place')
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
@pytest.mark.parametrize('script', SCRIPTS)
def test_a_stop_signal_while_starting_is_one_line(script, signum, tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / script), '--help'], cwd=tmp_path, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _catches_sigterm(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (proc.returncode, err[-3000:])
    assert 'Traceback' not in err and 'RecursionError' not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f'{script}: interrupted'), err[-3000:]
    assert not list(tmp_path.iterdir())  # nothing written


def test_figures_are_drawn_whatever_mplbackend_says(tmp_path):
    """Decided (issue 31, cause 9): the scripts write PNG files only, with matplotlib's Agg backend;
    ``MPLBACKEND=bogus`` (which makes importing matplotlib raise) changes nothing."""
    import timm
    import torch

    import models  # noqa: F401
    from helpers import make_image_folder
    data = make_image_folder(tmp_path / 'data', {'val': 1}, 2)
    torch.manual_seed(0)
    model = timm.create_model('cf_deit_tiny', coarse_stage_size=2, num_classes=2, embed_dim=48, depth=2, num_heads=3)
    torch.save({'model': model.state_dict()}, tmp_path / 'm.pth')
    proc = subprocess.run([sys.executable, str(ROOT / 'dynamic_inference.py'), '--eval-mode', '1', '--data_url',
                           str(data), '--checkpoint_path', str(tmp_path / 'm.pth'), '--model', 'cf_deit_tiny',
                           '--coarse-stage-size', '2', '--model-kwargs', 'embed_dim=48', 'depth=2', 'num_heads=3',
                           '--num-workers', '0', '--output-dir', str(tmp_path / 'out')],
                          env=dict(script_env(), MPLBACKEND='bogus'), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / 'out' / 'budgeted_batch_classification.png').stat().st_size > 0
