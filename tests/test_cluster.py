"""Training on a cluster that fails: ``--resume auto``, mid-epoch checkpoints (``--save-interval-steps``, a
stop request), one failing process stopping all, several nodes.

The in-process tests use the tiny CF-DeiT of ``helpers.TINY_DEIT``; the launch tests run ``torchrun`` with
two gloo processes on the loopback, each subprocess with a bounded timeout. Faults are injected with the
hidden ``--debug-fault RANK:EPOCH:STEP:kill|data`` (first attempt of a job only).
"""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

import main_deit
from utils.common import signals
from utils.common.checkpoint import load_checkpoint_file

from helpers import TINY_DEIT as TINY
from helpers import TINY_DEIT_CLASSES as NUM_CLASSES
from helpers import TINY_LVVIT, free_port, log_lines, make_image_folder, script_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory) -> Path:
    """7 training images per class (21: 5 steps of 4 on one process, with a leftover) and 2 validation ones."""
    return make_image_folder(tmp_path_factory.mktemp('cluster_data'), {'train': 7, 'val': 2}, NUM_CLASSES)


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_checkpoint_file(a / 'checkpoint.pth'), load_checkpoint_file(b / 'checkpoint.pth')
    assert x['epoch'] == y['epoch']
    for key in ('model', 'model_ema'):
        assert (x[key] is None) == (y[key] is None), key
        for name, tensor in (x[key] or {}).items():
            torch.testing.assert_close(y[key][name], tensor, rtol=0, atol=0, msg=f'{key}.{name}')
    for pid, state in x['optimizer']['state'].items():
        for name, tensor in state.items():
            torch.testing.assert_close(y['optimizer']['state'][pid][name], tensor, rtol=0, atol=0)
    assert x['lr_scheduler'] == y['lr_scheduler']


def _stop_at(monkeypatch, calls: int) -> None:
    """The stop predicate turns true at its ``calls``-th check (one check per step)."""
    count = {'n': 0}

    def predicate() -> bool:
        count['n'] += 1
        return count['n'] == calls
    monkeypatch.setattr(signals, 'preemption_requested', predicate)


# ---------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize('sampler', ['repeated-aug', 'random'])
def test_stop_mid_epoch_then_resume_auto_equals_uninterrupted(image_folder, tmp_path, monkeypatch, sampler):
    """The full recipe (RandAugment, mixup/cutmix, random erasing, drop path, EMA): stopped by a request at
    epoch 1 step 2 (exit 143, checkpoint_step.pth), resumed with --resume auto: the same weights, optimizer,
    schedule and log as a run that never stopped."""
    argv = TINY + ['--data-path', str(image_folder), '--epochs', '3', '--selection-start-epoch', '1']
    if sampler == 'random':
        argv += ['--no-repeated-aug']
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert main_deit.main(argv + ['--output', str(full)]) == 0
    assert len(log_lines(full)) == 3
    _stop_at(monkeypatch, 5 + 2)  # 5 steps per epoch (21 images, batch 4): epoch 1, after its 2nd step
    assert main_deit.main(argv + ['--output', str(part), '--resume', 'auto']) == signals.EXIT_STOPPED
    step_ckpt = load_checkpoint_file(part / 'checkpoint_step.pth')
    assert (step_ckpt['epoch'], step_ckpt['step_in_epoch'], step_ckpt['world_size']) == (1, 2, 1)
    assert len(log_lines(part)) == 1
    monkeypatch.setattr(signals, 'preemption_requested', lambda: False)
    assert main_deit.main(argv + ['--output', str(part), '--resume', 'auto']) == 0
    _assert_same_weights(full, part)
    assert [r['train_loss'] for r in log_lines(part)] == [r['train_loss'] for r in log_lines(full)]


def test_main_lvvit_stop_mid_epoch_then_resume_auto_equals_uninterrupted(image_folder, tmp_path, monkeypatch):
    """The same for main_lvvit.py (MixToken, mixup/cutmix, EMA ranking, its next-epoch schedule)."""
    import main_lvvit
    argv = TINY_LVVIT + [str(image_folder), '--epochs', '2', '--model-ema', '--mixup', '0.8', '--cutmix', '1.0']
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert main_lvvit.main(argv + ['--output', str(full)]) == 0
    _stop_at(monkeypatch, 3)  # 5 steps per epoch: epoch 0, after its 3rd step
    assert main_lvvit.main(argv + ['--output', str(part), '--resume', 'auto']) == signals.EXIT_STOPPED
    assert not (part / 'checkpoint.pth').exists()
    monkeypatch.setattr(signals, 'preemption_requested', lambda: False)
    assert main_lvvit.main(argv + ['--output', str(part), '--resume', 'auto']) == 0
    _assert_same_weights(full, part)
    assert [r['train_loss'] for r in log_lines(part)] == [r['train_loss'] for r in log_lines(full)]


def test_save_interval_writes_step_checkpoints_and_changes_nothing(image_folder, tmp_path):
    argv = TINY + ['--data-path', str(image_folder), '--epochs', '2', '--no-model-ema']
    plain, saving = tmp_path / 'plain', tmp_path / 'saving'
    assert main_deit.main(argv + ['--output', str(plain)]) == 0
    assert main_deit.main(argv + ['--output', str(saving), '--save-interval-steps', '3']) == 0
    _assert_same_weights(plain, saving)
    last = load_checkpoint_file(saving / 'checkpoint_step.pth')
    assert (last['epoch'], last['step_in_epoch']) == (1, 4)  # global steps 3, 6, 9: the last is epoch 1, step 4
    assert len(last['process_states']) == 1 and set(last['process_states'][0]) == {'rng', 'meter'}


def test_resume_auto_without_checkpoint_starts_fresh(image_folder, tmp_path, caplog):
    out = tmp_path / 'out'
    assert main_deit.main(TINY + ['--data-path', str(image_folder), '--epochs', '1', '--output', str(out),
                                  '--resume', 'auto']) == 0
    assert 'no checkpoint in' in caplog.text and 'starting a new run' in caplog.text
    assert load_checkpoint_file(out / 'checkpoint.pth')['epoch'] == 0


def test_resume_auto_falls_back_to_the_previous_good_checkpoint(image_folder, tmp_path, caplog):
    argv = TINY + ['--data-path', str(image_folder), '--epochs', '2', '--no-model-ema']
    out = tmp_path / 'out'
    assert main_deit.main(argv + ['--output', str(out), '--stop-at-epoch', '1']) == 0
    (out / 'checkpoint_step.pth').write_bytes(b'garbage: a checkpoint a disk error truncated')
    assert main_deit.main(argv + ['--output', str(out), '--resume', 'auto']) == 0
    assert 'skipping' in caplog.text and 'checkpoint_step.pth' in caplog.text
    assert 'continuing at epoch 1' in caplog.text
    assert [r['epoch'] for r in log_lines(out)] == [0, 1]


def test_resume_auto_never_starts_over_silently(image_folder, tmp_path, caplog):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'checkpoint.pth').write_bytes(b'not a checkpoint')
    before = (out / 'checkpoint.pth').read_bytes()
    code = main_deit.main(TINY + ['--data-path', str(image_folder), '--output', str(out), '--resume', 'auto'])
    assert code == main_deit.EXIT_BAD_INPUT
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert 'no checkpoint in' in error and 'not starting over' in error
    assert (out / 'checkpoint.pth').read_bytes() == before  # the user's file is left as it was


def test_resume_auto_needs_an_output_folder(image_folder, caplog):
    assert main_deit.main(TINY + ['--data-path', str(image_folder), '--resume', 'auto']) == main_deit.EXIT_BAD_INPUT
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert '--resume auto' in error and '--output_dir' in error


# ---------------------------------------------------------------------------------------------- torchrun
def _torchrun(launch, argv, timeout=420):
    """Run a torchrun job to its end (bounded: a hang fails the test with the job's output so far)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', *launch, 'main_deit.py', *argv]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f'torchrun did not end within {timeout} s; its output:\n{(e.stderr or b"")[-6000:]!r}')


def _digest(prefix: Path):
    return [json.loads(Path(f'{prefix}.rank{r}.json').read_text())['model'] for r in (0, 1)]


@pytest.fixture(scope='module')
def two_process_reference(image_folder, tmp_path_factory):
    """An uninterrupted two-process run (2 epochs, 5 steps each) and its digests."""
    out = tmp_path_factory.mktemp('reference')
    proc = _torchrun(['--nproc_per_node=2', f'--master_port={free_port()}'], _dist_args(image_folder, out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, _digest(out / 'digest')


def _dist_args(data: Path, out: Path, *extra: str):
    argv = [a for a in TINY]
    argv[argv.index('--batch-size') + 1] = '2'
    return [*argv, '--epochs', '2', '--no-repeated-aug', '--data-path', str(data), '--output', str(out),
            '--debug-weights-digest', str(out / 'digest'), *extra]


@pytest.mark.parametrize('interval', [0, 2])
def test_torchrun_restart_after_sigkill_equals_uninterrupted(image_folder, tmp_path, two_process_reference, interval):
    """(1) no interval: the restarted job resumes from checkpoint.pth and redoes epoch 1; (2) --save-interval-steps 2,
    killed at epoch 1 step 3 (between the saves after global steps 6 and 8... i.e. epoch 1 steps 1 and 3): resumes
    mid-epoch. Both finish by themselves with the uninterrupted run's weights."""
    ref_out, ref_digest = two_process_reference
    out = tmp_path / 'out'
    extra = ['--resume', 'auto', '--debug-fault', '1:1:3:kill']
    if interval:
        extra += ['--save-interval-steps', str(interval)]
    proc = _torchrun(['--nproc_per_node=2', f'--master_port={free_port()}', '--max-restarts=1'],
                     _dist_args(image_folder, out, *extra))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'exitcode: -9' in proc.stderr  # the SIGKILLed process
    assert proc.stderr.count('distributed: 2 processes, gloo backend') == 2  # the first attempt and the restart
    if interval:
        assert 'continuing epoch 1 after step' in proc.stderr
    else:
        assert 'continuing at epoch 1' in proc.stderr
    assert _digest(out / 'digest') == ref_digest
    _assert_same_weights(ref_out, out)


def test_two_nodes_train_like_one_node_with_two_processes(image_folder, tmp_path, two_process_reference):
    """(3) two launches of torchrun --nnodes=2 --nproc_per_node=1 meeting at a c10d rendezvous on 127.0.0.1."""
    ref_out, ref_digest = two_process_reference
    out = tmp_path / 'out'
    launch = ['--nnodes=2', '--nproc_per_node=1', '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{free_port()}',
              '--rdzv-id=cfvit-test']
    cmd = [sys.executable, '-m', 'torch.distributed.run', *launch, 'main_deit.py', *_dist_args(image_folder, out)]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        results = [node.communicate(timeout=420) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, err) in zip(nodes, results):
        assert node.returncode == 0, err[-4000:]
    assert _digest(out / 'digest') == ref_digest
    _assert_same_weights(ref_out, out)


def test_a_failing_process_stops_the_job_quickly_with_its_message(image_folder, tmp_path):
    """(4) process 1 cannot read its training data at epoch 0 step 2: both processes stop at that step,
    process 1 with its own message and exit status 2, process 0 naming it; torchrun ends without a restart
    wait or a collective timeout."""
    out = tmp_path / 'out'
    proc = _torchrun(['--nproc_per_node=2', f'--master_port={free_port()}'],
                     _dist_args(image_folder, out, "--debug-fault", "1:0:2:data"), timeout=180)
    ended = datetime.now()
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if ' ERROR ' in line]
    assert any(line.endswith(' ERROR 32 images in a row could not be read (injected by --debug-fault)')
               for line in errors), proc.stderr[-4000:]  # process 1, its own message
    assert any('ERROR process 1 stopped the run at epoch 0, step 2: 32 images in a row could not be read' in line
               for line in errors)  # process 0
    assert 'exitcode: 2' in proc.stderr  # bad input: exit status 2 (both exit with it; torchrun names the first seen)
    # within seconds of the error, not after the process-group timeout (30 minutes by default)
    first_error = datetime.combine(ended.date(), datetime.strptime(errors[0].split()[0], '%H:%M:%S').time())
    assert (ended - first_error).total_seconds() < 30
    # one line per process, no worker traceback (torchrun prints its own summary)
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith('File "') and '/utils/' in line]
