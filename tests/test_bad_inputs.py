"""The bad-input matrix of the five scripts (README, "Safety and failure behaviour").

For every script -- ``main_deit.py``, ``main_lvvit.py``, ``dynamic_inference.py``, ``visualize.py``
and ``make_token_labels.py`` -- and every bad input that applies to it, the script either handles
it correctly (and the test checks the result) or ends with exit status 2 and a one-line message
that says what is wrong, never a traceback. Every test here also checks that no input file (images,
checkpoints, label maps) was modified, created or deleted.

All scripts run in this process (``main(argv)``) on a tiny model and a dataset with a corrupt JPEG,
a truncated PNG and grayscale / CMYK / RGBA images in every class-0 folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import stat
import subprocess
import zlib
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dynamic_inference
import main_deit
import main_lvvit
import make_token_labels
import visualize
from helpers import (
    BROKEN_FILES, UNREADABLE_FILES, log_lines, make_image_folder, one_line_error, run_main, tree_digest, write_broken_images,
)
from utils.common.checkpoint import load_checkpoint_file

pytestmark = pytest.mark.usefixtures('one_thread', 'own_logging')

NUM_CLASSES, G = 3, 2
ARCH = dict(embed_dim=48, depth=2, num_heads=3)
GOOD = {'train': 5, 'val': 2}  # readable PNGs per class; class0 also holds the BROKEN_FILES
READABLE = {split: NUM_CLASSES * n + len(BROKEN_FILES) - UNREADABLE_FILES for split, n in GOOD.items()}
TRAIN = ['--embed-dim', '48', '--depth', '2', '--num-heads', '3', '--coarse-stage-size', str(G), '--device', 'cpu',
         '--epochs', '1', '--warmup-epochs', '0', '--lr', '1e-3', '--print-freq', '1000', '--seed', '0',
         '--no-repeated-aug', '--aa', 'none']
DEIT = ['--model', 'cf_deit_tiny', '--no-amp', '--num_workers', '0', '--batch-size', '2', *TRAIN]
LVVIT = ['--model', 'cf_lvvit_tiny', '-j', '0', '-b', '2', *TRAIN]
EVAL_ARCH = ['--model', 'cf_deit_tiny', '--coarse-stage-size', str(G), '--model-kwargs',
             *[f'{k}={v}' for k, v in ARCH.items()]]


@pytest.fixture(scope='module')
def inputs(tmp_path_factory) -> Dict[str, Path]:
    """The read-only inputs: the dataset, a released-layout checkpoint, an empty tree, a tree with
    an empty class folder, and a file where a folder is expected."""
    root = tmp_path_factory.mktemp('inputs')
    data = make_image_folder(root / 'data', GOOD, NUM_CLASSES)
    for split in GOOD:
        write_broken_images(data / split / 'class0')
    torch.manual_seed(0)
    model = timm.create_model('cf_deit_tiny', coarse_stage_size=G, num_classes=NUM_CLASSES, **ARCH)
    torch.save({'model': model.state_dict()}, root / 'released.pth')
    (root / 'empty' / 'train').mkdir(parents=True)
    (root / 'empty' / 'val').mkdir(parents=True)
    hole = make_image_folder(root / 'hole', {'train': 2, 'val': 2}, NUM_CLASSES)
    for split in ('train', 'val'):
        for f in (hole / split / 'class1').iterdir():
            f.unlink()
    (root / 'notes.txt').write_text('not a folder\n')
    (root / 'garbage.pth').write_bytes(b'PK\x03\x04 this is not a checkpoint' * 10)
    return {'root': root, 'data': data, 'ckpt': root / 'released.pth', 'empty': root / 'empty',
            'hole': hole, 'file': root / 'notes.txt', 'garbage': root / 'garbage.pth'}


@pytest.fixture(scope='module')
def label_maps(inputs, tmp_path_factory) -> Path:
    """Label maps of the training images from the released checkpoint as teacher (made once)."""
    out = tmp_path_factory.mktemp('maps') / 'maps'
    argv = [str(inputs['data']), '--teacher', 'cf_deit_tiny', '--checkpoint', str(inputs['ckpt']), *EVAL_ARCH[2:],
            '--output', str(out), '-j', '0', '-b', '4']
    assert make_token_labels.main([a for a in argv if a != '--model']) == 0
    return out


@pytest.fixture(autouse=True)
def untouched_inputs(inputs):
    """No test may modify, create or delete a file among the inputs."""
    before = tree_digest(inputs['root'])
    yield
    assert tree_digest(inputs['root']) == before


def run(script, argv: List[str], capsys, caplog):
    """``(exit status, everything the run printed or logged)``; argparse's SystemExit gives its code.
    The script's signal handlers are gone afterwards."""
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    result = run_main(script, argv, capsys, caplog)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    return result


# ------------------------------------------------------------------------------------------ images
def test_training_replaces_unreadable_images_and_decodes_the_rest(inputs, tmp_path, capsys, caplog):
    code, text = run(main_deit, [*DEIT, '--data-path', inputs['data'], '--output', tmp_path / 'o'], capsys, caplog)
    assert code == 0, text[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / 'o' / 'log.txt').read_text().splitlines()]
    # RandomSampler visits every index once; 5 * 3 + 5 = 20 files, batches of 2 drop nothing
    assert record['train_unreadable_images'] == UNREADABLE_FILES
    assert record['test_num_samples'] == READABLE['val'] and record['test_num_skipped'] == UNREADABLE_FILES
    assert 'corrupt.jpg' in text and 'truncated.png' in text and 'takes its place' in text
    assert f'{UNREADABLE_FILES} unreadable validation images were skipped' in text


def test_token_labeling_skips_unreadable_images_and_trains_on_the_rest(inputs, label_maps, tmp_path, capsys, caplog):
    maps = sorted(p.relative_to(label_maps).as_posix() for p in label_maps.rglob('*.pt'))
    assert len(maps) == READABLE['train']
    assert 'class0/corrupt.pt' not in maps and 'class0/cmyk.pt' in maps
    assert load_checkpoint_file(label_maps / 'class0' / 'cmyk.pt').shape[1:] == (NUM_CLASSES, 2 * G, 2 * G)
    code, text = run(main_lvvit, [*LVVIT, inputs['data'], '--token-label', '--token-label-data', label_maps,
                                  '--output', tmp_path / 'o'], capsys, caplog)
    assert code == 0, text[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / 'o' / 'log.txt').read_text().splitlines()]
    assert record['train_unreadable_images'] == UNREADABLE_FILES
    assert record['test_num_skipped'] == UNREADABLE_FILES
    assert 'have no label map because they cannot be read' in text


def test_evaluation_scripts_skip_and_count_unreadable_images(inputs, tmp_path, capsys, caplog):
    code, text = run(dynamic_inference, ['--eval-mode', '0', '--data_url', inputs['data'], '--checkpoint_path',
                                         inputs['ckpt'], *EVAL_ARCH, '--num-workers', '0', '--output-dir',
                                         tmp_path / 'di'], capsys, caplog)
    assert code == 0, text[-3000:]
    result = json.loads((tmp_path / 'di' / 'anytime.json').read_text())
    assert result['images'] == READABLE['val'] and result['skipped_images'] == UNREADABLE_FILES
    code, text = run(visualize, ['--data-path', inputs['data'] / 'val', '--resume', inputs['ckpt'], *EVAL_ARCH,
                                 '--num-workers', '0', '--no-progress', '--output-dir', tmp_path / 'vis'],
                     capsys, caplog)
    assert code == 0, text[-3000:]
    summary = json.loads((tmp_path / 'vis' / 'summary.json').read_text())
    assert summary['images'] == READABLE['val'] and summary['unreadable'] == UNREADABLE_FILES


# ------------------------------------------------------------------------------- batch sizes
def test_batch_size_one_everywhere(inputs, label_maps, tmp_path, capsys, caplog):
    """Batch size 1 trains (without mixup, which pairs images), evaluates and labels."""
    deit = [a if a != '2' or prev != '--batch-size' else '1' for prev, a in zip([''] + DEIT, DEIT)]
    code, text = run(main_deit, [*deit, '--mixup', '0', '--cutmix', '0', '--data-path', inputs['data'],
                                 '--output', tmp_path / 'deit'], capsys, caplog)
    assert code == 0, text[-3000:]
    assert json.loads((tmp_path / 'deit' / 'log.txt').read_text())['test_num_samples'] == READABLE['val']
    lv = [a if a != '2' or prev != '-b' else '1' for prev, a in zip([''] + LVVIT, LVVIT)]
    code, text = run(main_lvvit, [*lv, '--mixup', '0', '--cutmix', '0', inputs['data'], '--token-label',
                                  '--token-label-data', label_maps, '--output', tmp_path / 'lv'], capsys, caplog)
    assert code == 0, text[-3000:]
    code, text = run(dynamic_inference, ['--eval-mode', '2', '--threshold', '0.5', '--batch_size', '1', '--data_url',
                                         inputs['data'], '--checkpoint_path', inputs['ckpt'], *EVAL_ARCH,
                                         '--num-workers', '0', '--output-dir', tmp_path / 'di'], capsys, caplog)
    assert code == 0, text[-3000:]
    assert json.loads((tmp_path / 'di' / 'throughput.json').read_text())['images'] == READABLE['val']
    code, text = run(visualize, ['--data-path', inputs['data'] / 'val', '--resume', inputs['ckpt'], *EVAL_ARCH,
                                 '--batch-size', '1', '--num-workers', '0', '--no-progress', '--output-dir',
                                 tmp_path / 'vis'], capsys, caplog)
    assert code == 0, text[-3000:]
    code, text = run(make_token_labels, [inputs['data'], '--teacher', 'cf_deit_tiny', '--checkpoint', inputs['ckpt'],
                                         *EVAL_ARCH[2:], '--output', tmp_path / 'maps', '-j', '0', '-b', '1'],
                     capsys, caplog)
    assert code == 0, text[-3000:]
    for p in label_maps.rglob('*.pt'):  # batch 1 writes the same maps as batch 4
        torch.testing.assert_close(load_checkpoint_file(tmp_path / 'maps' / p.relative_to(label_maps)),
                                   load_checkpoint_file(p), rtol=1e-4, atol=1e-4)


def test_mixup_with_an_odd_batch_is_refused(inputs, tmp_path, capsys, caplog):
    deit = [a if a != '2' or prev != '--batch-size' else '3' for prev, a in zip([''] + DEIT, DEIT)]
    code, text = run(main_deit, [*deit, '--data-path', inputs['data'], '--output', tmp_path / 'o'], capsys, caplog)
    one_line_error(code, text, '--batch-size must be even')


def test_batch_larger_than_the_dataset(inputs, tmp_path, capsys, caplog):
    """Training refuses (every batch would be dropped); evaluation runs one partial batch."""
    big = [a if a != '2' or prev != '--batch-size' else '64' for prev, a in zip([''] + DEIT, DEIT)]
    code, text = run(main_deit, [*big, '--data-path', inputs['data'], '--output', tmp_path / 'o'], capsys, caplog)
    one_line_error(code, text, 'fewer than --batch-size 64')
    big = [a if a != '2' or prev != '-b' else '64' for prev, a in zip([''] + LVVIT, LVVIT)]
    code, text = run(main_lvvit, [*big, inputs['data'], '--output', tmp_path / 'lv'], capsys, caplog)
    one_line_error(code, text, 'fewer than --batch-size 64')
    code, text = run(dynamic_inference, ['--eval-mode', '0', '--batch_size', '1000', '--data_url', inputs['data'],
                                         '--checkpoint_path', inputs['ckpt'], *EVAL_ARCH, '--num-workers', '0',
                                         '--output-dir', tmp_path / 'di'], capsys, caplog)
    assert code == 0, text[-3000:]
    assert json.loads((tmp_path / 'di' / 'anytime.json').read_text())['images'] == READABLE['val']


# --------------------------------------------------------------------------------- the matrix
def _argv(script: str, data: str, inputs: Dict[str, Path], tmp: Path, extra: List[str]) -> List[str]:
    """A valid command line of ``script`` on ``data``, then ``extra`` (later flags win)."""
    if script == 'main_deit':
        return [*DEIT, '--data-path', data, '--output', tmp / 'o', *extra]
    if script == 'main_lvvit':
        return [*LVVIT, data, '--output', tmp / 'o', *extra]
    if script == 'dynamic_inference':
        return ['--eval-mode', '0', '--data_url', data, '--checkpoint_path', inputs['ckpt'], *EVAL_ARCH,
                '--num-workers', '0', '--output-dir', tmp / 'o', *extra]
    if script == 'visualize':
        return ['--data-path', f'{data}/val', '--resume', inputs['ckpt'], *EVAL_ARCH, '--num-workers', '0',
                '--no-progress', '--output-dir', tmp / 'o', *extra]
    return [data, '--teacher', 'cf_deit_tiny', '--checkpoint', inputs['ckpt'], *EVAL_ARCH[2:], '--output', tmp / 'o',
            '-j', '0', *extra]


TRAINING = ('main_deit', 'main_lvvit')
SCRIPTS = {'main_deit': main_deit, 'main_lvvit': main_lvvit, 'dynamic_inference': dynamic_inference,
           'visualize': visualize, 'make_token_labels': make_token_labels}
ALL = tuple(SCRIPTS)
# (case, scripts, data (a key of ``inputs`` or a missing path), extra flags, message per script or for all;
# 'OK: <message>' means the input is handled: exit 0 with that warning)
CASES = [
    ('missing-data', ALL, 'missing', [], {
        'main_deit': 'is not a folder', 'main_lvvit': 'is not a folder', 'dynamic_inference': 'not found',
        'visualize': 'does not exist', 'make_token_labels': 'not found'}),
    ('empty-data', ALL, 'empty', [], {
        'main_deit': 'no images', 'main_lvvit': 'no images', 'dynamic_inference': 'no images',
        'visualize': 'no class folders', 'make_token_labels': 'no images'}),
    # training and labelling refuse a class without images; visualize warns and shows the other classes
    ('empty-class-folder', ALL, 'hole', [], {
        'main_deit': 'class1', 'main_lvvit': 'class1', 'dynamic_inference': 'class1',
        'visualize': 'OK: 1 class folder(s) without images: class1', 'make_token_labels': 'class1'}),
    ('data-is-a-file', ALL, 'file', [], {
        'main_deit': 'is not a folder', 'main_lvvit': 'is not a folder', 'dynamic_inference': 'not found',
        'visualize': 'notes.txt', 'make_token_labels': 'notes.txt'}),
    ('unknown-model', ('main_deit', 'main_lvvit', 'dynamic_inference', 'visualize'), 'data',
     ['--model', 'cf_resnet_tiny'], 'cf_resnet_tiny'),
    ('unknown-teacher', ('make_token_labels',), 'data', ['--teacher', 'cf_resnet_tiny'], 'cf_resnet_tiny'),
    ('coarse-stage-size-0', ALL, 'data', ['--coarse-stage-size', '0'], 'must be at least 1, got 0'),
    ('coarse-stage-size-text', ALL, 'data', ['--coarse-stage-size', 'seven'], "expected a positive integer, got 'seven'"),
    ('coarse-stage-size-other', ('dynamic_inference', 'visualize', 'make_token_labels'), 'data',
     ['--coarse-stage-size', '3'], 'pos_embed'),
    ('threshold-above-1', ('dynamic_inference', 'visualize'), 'data', ['@MODE2', '--threshold', '1.5'],
     'must be in [0, 1]'),
    ('threshold-below-0', ('dynamic_inference', 'visualize'), 'data', ['@MODE2', '--threshold', '-0.1'],
     'must be in [0, 1]'),
    ('batch-size-0', ALL, 'data', ['--batch-size', '0'], 'must be at least 1, got 0'),
    ('output-not-writable', ALL, 'data', ['@OUTPUT_UNDER_FILE'], 'notes.txt'),
    ('missing-checkpoint', ('dynamic_inference', 'visualize', 'make_token_labels'), 'data', ['@MISSING_CKPT'],
     'not found'),
    ('missing-resume', ('main_deit', 'main_lvvit'), 'data', ['--resume', '@MISSING'], 'not found'),
    ('garbage-checkpoint', ALL, 'data', ['@GARBAGE_CKPT'], 'not a PyTorch checkpoint'),
    # flag values checked at parse time: argparse's line names the flag
    ('num-workers-negative', ALL, 'data', ['@WORKERS', '-1'], 'must be at least 0, got -1'),
    ('device-bogus', ALL, 'data', ['--device', 'bogus'], "argument --device: not a device: 'bogus'"),
    ('lr-nan', TRAINING, 'data', ['--lr', 'nan'], 'argument --lr: must be a finite number, got nan'),
    ('epochs-0', TRAINING, 'data', ['--epochs', '0'], 'argument --epochs: must be at least 1, got 0'),
    ('smoothing-2', TRAINING, 'data', ['--smoothing', '2'], 'argument --smoothing: must be in [0, 1), got 2'),
    ('subset-negative', TRAINING, 'data', ['--subset', '-3'], 'argument --subset: must be at least 1, got -3'),
    ('embed-dim-not-divisible', TRAINING, 'data', ['--embed-dim', '50'], 'cannot build cf_'),
    ('map-size-negative', ('make_token_labels',), 'data', ['--map-size', '-1'],
     'argument --map-size: must be at least 1, got -1'),
    ('panel-size-huge', ('visualize',), 'data', ['--panel-size', '100000'],
     'argument --panel-size/--panel_size: must be at most 2048, got 100000'),
    ('threshold-nan', ('dynamic_inference', 'visualize'), 'data', ['--threshold', 'nan'], 'must be a finite number'),
]
MATRIX = [pytest.param(script, data, extra, message if isinstance(message, str) else message[script],
                       id=f'{script}-{case}')
          for case, scripts, data, extra, message in CASES for script in scripts]


@pytest.mark.parametrize('script,data,extra,message', MATRIX)
def test_bad_input_matrix(script, data, extra, message, inputs, tmp_path, capsys, caplog):
    data_path = str(inputs[data]) if data in inputs else str(tmp_path / 'no' / 'such' / 'folder')
    garbage = inputs['garbage']
    flag = {'main_deit': '--resume', 'main_lvvit': '--resume', 'dynamic_inference': '--checkpoint_path',
            'visualize': '--resume', 'make_token_labels': '--checkpoint'}[script]
    output = {'main_deit': '--output', 'main_lvvit': '--output', 'make_token_labels': '--output'}.get(
        script, '--output-dir')
    expanded: List[str] = []
    for a in extra:
        if a == '@OUTPUT_UNDER_FILE':
            expanded += [output, str(inputs['file'] / 'out')]
        elif a == '@MISSING_CKPT':
            expanded += [flag, str(tmp_path / 'missing.pth')]
        elif a == '@GARBAGE_CKPT':
            expanded += [flag, str(garbage)]
        elif a == '@MODE2':
            expanded += ['--eval-mode', '2'] if script == 'dynamic_inference' else []
        elif a == '@MISSING':
            expanded.append(str(tmp_path / 'missing.pth'))
        elif a == '@WORKERS':
            expanded.append({'main_deit': '--num_workers', 'main_lvvit': '-j', 'make_token_labels': '-j'}.get(
                script, '--num-workers'))
        elif a == '--batch-size' and script in ('main_lvvit', 'make_token_labels'):
            expanded.append('-b')
        else:
            expanded.append(a)
    code, text = run(SCRIPTS[script], _argv(script, data_path, inputs, tmp_path, expanded), capsys, caplog)
    if message.startswith('OK: '):
        assert code == 0 and message[4:] in text, text[-3000:]
    else:
        one_line_error(code, text, message)


def test_matrix_covers_every_script_and_the_issue_list():
    covered = {(case, script) for case, scripts, *_ in CASES for script in scripts}
    for script in SCRIPTS:
        for case in ('missing-data', 'empty-data', 'empty-class-folder', 'coarse-stage-size-0', 'batch-size-0',
                     'output-not-writable', 'garbage-checkpoint'):
            assert (case, script) in covered
    assert len(MATRIX) >= 60


# ---------------------------------------------------------------------------------- disk full
@pytest.fixture
def disk_full(monkeypatch):
    """Every atomic write (checkpoints, label maps, JSON results, logs) fails with ENOSPC after
    writing part of its temporary file, as on a full disk."""
    import contextlib

    import utils.common.atomic
    real = utils.common.atomic.atomic_file  # every module writes through this one

    @contextlib.contextmanager
    def full(path, mode='wb'):
        with real(path, mode) as f:
            yield f
            f.write(b'\0' if 'b' in mode else '\0')
            raise OSError(28, 'No space left on device')
    monkeypatch.setattr(utils.common.atomic, 'atomic_file', full)


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 16 MB tmpfs mounted at ``tmp_path/o`` (the scripts' output folder), unmounted after;
    skipped with the reason when this machine does not let the test mount one."""
    mount = tmp_path / 'o'
    mount.mkdir()
    try:
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(mount)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f'cannot mount a tmpfs: {e}')
    if done.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs: {done.stderr.strip() or done.returncode}')
    try:
        yield mount
    finally:
        subprocess.run(['umount', '-l', str(mount)], capture_output=True, timeout=30)


def fill_up(folder: Path) -> None:
    """Write a filler file in ``folder`` until its file system has no byte left."""
    fd = os.open(folder / 'filler', os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while os.write(fd, bytes(size)):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.mark.filterwarnings('error::pytest.PytestUnhandledThreadExceptionWarning')  # a thread's traceback fails
@pytest.mark.parametrize('full', ['patched', 'real'])
@pytest.mark.parametrize('script', ['main_deit', 'make_token_labels', 'dynamic_inference', 'visualize'])
def test_disk_full_keeps_previous_outputs(script, full, inputs, tmp_path, capsys, caplog, request):
    """A run whose saves hit a full disk stops with one line (exit 2); the previous run's files stay as
    they were and no temporary file is left. ``real``: the output folder is a small tmpfs, filled up for
    real, so torch's zip writer, matplotlib and TensorBoard meet ENOSPC themselves."""
    if full == 'real':
        request.getfixturevalue('small_filesystem')
    argv = _argv(script, str(inputs['data']), inputs, tmp_path, [])
    if script == 'dynamic_inference':
        argv += ['--eval-mode', '1', '--write-checkpoint']
    code, text = run(SCRIPTS[script], argv, capsys, caplog)
    assert code == 0, text[-3000:]
    if script == 'make_token_labels':
        next(iter((tmp_path / 'o').rglob('*.pt'))).unlink()  # one map to write again
    elif script == 'main_deit':
        argv += ['--resume', str(tmp_path / 'o' / 'checkpoint.pth'), '--epochs', '2']
    def outputs():  # a new TensorBoard event file per run is expected
        return {k: v for k, v in tree_digest(tmp_path / 'o').items() if '/tensorboard/' not in k and 'filler' not in k}
    before = outputs()
    if full == 'real':
        fill_up(tmp_path / 'o')
    else:
        request.getfixturevalue('disk_full')
    code, text = run(SCRIPTS[script], argv, capsys, caplog)
    one_line_error(code, text, 'No space left on device')
    assert outputs() == before
    assert not list((tmp_path / 'o').rglob('*.tmp'))


# ------------------------------------------------------------------------ leftovers and empty sets
def test_stale_temp_files_of_killed_saves_are_removed(inputs, tmp_path, capsys, caplog):
    """A save killed mid-write leaves ``.checkpoint.pth.<random>.tmp``: the next training run in that folder
    deletes it (and nothing else); ``--eval`` leaves the folder alone."""
    out = tmp_path / 'o'
    out.mkdir()
    stale = out / '.checkpoint.pth.k3j2_x9.tmp'
    stale.write_bytes(b'partial pickle')
    foreign = out / '.notes.txt.abc.tmp'
    foreign.write_bytes(b'not ours')
    code, text = run(main_deit, [*DEIT, '--data-path', inputs['data'], '--output', out], capsys, caplog)
    assert code == 0, text[-3000:]
    assert not stale.exists() and foreign.exists()
    assert 'removed 1 temporary files of an interrupted save' in text
    stale.write_bytes(b'partial pickle')
    code, text = run(main_deit, [*DEIT, '--data-path', inputs['data'], '--output', out, '--eval', '--resume',
                                 out / 'checkpoint.pth'], capsys, caplog)
    assert code == 0, text[-3000:]
    assert stale.exists()


def test_validation_without_a_readable_image_is_refused(inputs, tmp_path, capsys, caplog):
    data = make_image_folder(tmp_path / 'data', {'train': 2}, NUM_CLASSES)
    for c in range(NUM_CLASSES):
        (data / 'val' / f'class{c}').mkdir(parents=True)
        (data / 'val' / f'class{c}' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really')
    code, text = run(main_deit, [*DEIT, '--data-path', data, '--output', tmp_path / 'o'], capsys, caplog)
    one_line_error(code, text, 'no readable validation images (3 unreadable)')


def test_training_set_without_a_readable_image_is_one_line_even_from_a_worker(inputs, tmp_path, capsys, caplog):
    """The error raised in a DataLoader worker reaches the user without the worker's traceback."""
    data = make_image_folder(tmp_path / 'data', {'val': 1}, NUM_CLASSES)
    for c in range(NUM_CLASSES):
        (data / 'train' / f'class{c}').mkdir(parents=True)
        for i in range(2):
            (data / 'train' / f'class{c}' / f'{i}.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really')
    argv = [a if prev != '--num_workers' else '1' for prev, a in zip([''] + DEIT, DEIT)]
    code, text = run(main_deit, [*argv, '--data-path', data, '--output', tmp_path / 'o'], capsys, caplog)
    one_line_error(code, text, '6 images in a row from')
    assert 'Original Traceback' not in text


# ===================================================================== inputs made for real, at the boundaries
# (datasets/walk.py, utils/common/flags.py, utils/common/run_folder.py, utils/common/signals.py)
@pytest.fixture(scope='module')
def hostile(tmp_path_factory) -> Dict[str, Path]:
    """A dataset with two symlink loops and a FIFO in every split, and a 16-bit PNG; its own digest."""
    root = tmp_path_factory.mktemp('hostile')
    data = make_image_folder(root / 'data', {'train': 2, 'val': 2}, NUM_CLASSES)
    for split in ('train', 'val'):
        os.symlink('.', data / split / 'class0' / 'again')
        os.symlink('..', data / split / 'class0' / 'up')  # into the split: every class folder again
        os.mkfifo(data / split / 'class1' / 'pipe.JPEG')
        Image.fromarray(np.full((40, 48), 40000, dtype=np.uint16)).save(data / split / 'class2' / 'deep.png')
    return {'root': root, 'data': data}


def _hostile_digest(root: Path) -> Dict[str, str]:
    """Digest of the regular files (pipes and link loops not followed) and of the links and pipes themselves."""
    out = {}
    for dirpath, dirs, files in os.walk(root):  # os.walk does not follow links to folders
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                out[str(p)] = f'{hashlib.sha256(p.read_bytes()).hexdigest()} {st.st_mtime_ns}'
            elif not stat.S_ISDIR(st.st_mode):
                out[str(p)] = f'{stat.S_IFMT(st.st_mode)} {os.readlink(p) if p.is_symlink() else ""} {st.st_mtime_ns}'
    return out


HOSTILE_IMAGES = NUM_CLASSES * 2 + 1  # the PNGs and the 16-bit one; the loops add nothing, the FIFO is skipped


@pytest.mark.parametrize('script', ['main_deit', 'dynamic_inference', 'visualize', 'make_token_labels'])
def test_link_loops_and_fifos_neither_repeat_images_nor_hang(script, hostile, inputs, tmp_path, capsys, caplog):
    before = _hostile_digest(hostile['root'])
    code, text = run(SCRIPTS[script], _argv(script, str(hostile['data']), inputs, tmp_path, []), capsys, caplog)
    assert code == 0, text[-3000:]
    assert 'pipe.JPEG is not a regular file' in text and 'a link loop' in text
    out = tmp_path / 'o'
    if script == 'main_deit':
        assert log_lines(out)[0]['test_num_samples'] == HOSTILE_IMAGES
    elif script == 'dynamic_inference':
        assert json.loads((out / 'anytime.json').read_text())['images'] == HOSTILE_IMAGES
    elif script == 'visualize':
        assert json.loads((out / 'summary.json').read_text())['images'] == HOSTILE_IMAGES
    else:
        assert len(list(out.rglob('*.pt'))) == HOSTILE_IMAGES
    assert _hostile_digest(hostile['root']) == before


def test_every_pil_mode_decodes_to_scaled_8bit_rgb(tmp_path):
    """16-bit and 32-bit integer and float images are scaled, not clipped to white."""
    from datasets.folder import RobustImageFolder
    from datasets.walk import decode_image
    cases = {
        'i16.png': (Image.fromarray(np.full((4, 6), 40000, dtype=np.uint16)), 156),   # 40000 / 257
        'i32.tif': (Image.fromarray(np.full((4, 6), 65535, dtype=np.int32)), 255),
        'f.tif': (Image.fromarray(np.full((4, 6), 0.5, dtype=np.float32)), 128),
        'la.png': (Image.new('LA', (6, 4), (100, 255)), 100),
        'pal.png': (Image.new('L', (6, 4), 60).convert('P'), 60),
        'one.png': (Image.new('1', (6, 4), 1), 255),
    }
    for name, (img, value) in cases.items():
        img.save(tmp_path / name)
        rgb = decode_image(str(tmp_path / name))
        assert rgb.mode == 'RGB' and rgb.size == (6, 4), name
        assert np.asarray(rgb)[0, 0].tolist() == [value] * 3, name
    assert Image.open(tmp_path / 'i16.png').mode.startswith('I;16')  # really a 16-bit file
    folder = tmp_path / 'folder' / 'c'
    folder.mkdir(parents=True)
    (tmp_path / 'i16.png').rename(folder / 'i16.png')
    image, _ = RobustImageFolder(str(tmp_path / 'folder'))[0]
    assert np.asarray(image).max() == 156


def test_headers_beyond_the_limits_and_crafted_files_are_unreadable(tmp_path):
    from datasets.walk import MAX_PIXELS, UnreadableImageError, decode_image
    Image.new('L', (2_000_000, 1)).save(tmp_path / 'strip.png')  # a tiny file, a huge resize
    assert (tmp_path / 'strip.png').stat().st_size < 50_000
    png = (tmp_path / 'strip.png').read_bytes()
    side = int(MAX_PIXELS ** 0.5) + 1
    ihdr = side.to_bytes(4, 'big') * 2 + png[24:29]  # IHDR declares side x side, with a valid CRC
    big = png[:16] + ihdr + zlib.crc32(b'IHDR' + ihdr).to_bytes(4, 'big') + png[33:]
    (tmp_path / 'bomb.png').write_bytes(big)
    (tmp_path / 'crafted.tif').write_bytes(b'II*\x00\x08\x00\x00\x00\x01\x00\x00\x01\x03\x00' + bytes(40))
    os.mkfifo(tmp_path / 'pipe.png')
    for name, message in [('strip.png', 'aspect ratio'), ('bomb.png', 'more than the limit'), ('crafted.tif', 'crafted'),
                          ('pipe.png', 'not a regular file')]:
        with pytest.raises(UnreadableImageError, match=message):
            decode_image(str(tmp_path / name))


# ------------------------------------------------------------------------------------- checkpoints
def _bad_checkpoints(root: Path, good: Path) -> Dict[str, Path]:
    """Checkpoints whose fields have the wrong type or shape, each from the good one."""
    base = torch.load(good, weights_only=True)
    head = dict(base['model'], **{'head.weight': torch.tensor(1.0)})
    made = {
        'epoch-string': dict(base, epoch='three', optimizer={'state': {}, 'param_groups': []}),
        'flop-not-a-list': dict(base, flop='1.1 GFLOPs'),
        'zero-dim-head': {'model': head},
        'args-nonsense': dict(base, args=argparse.Namespace(model='cf_deit_tiny', coarse_stage_size='seven')),
        'args-open-a-file': dict(base, args=argparse.Namespace(
            model='cf_deit_tiny', coarse_stage_size=G, model_kwargs=[f'checkpoint_path={root / "other.pth"}'])),
        'args-overlay': dict(base, args=argparse.Namespace(
            model='cf_deit_tiny', model_kwargs=["pretrained_cfg_overlay={'file': '/etc/passwd'}"])),
        'results-ragged': dict(base, budgeted_batch_classification=[[0.1, 0.2], [50.0]]),
    }
    paths = {}
    for name, ckpt in made.items():
        paths[name] = root / f'{name}.pth'
        torch.save(ckpt, paths[name])
    torch.save(base, root / 'other.pth')
    return paths


CKPT_CASES = [  # (case, message)
    ('epoch-string', "epoch is 'three'"), ('flop-not-a-list', 'flop is'), ('zero-dim-head', 'head.weight of shape []'),
    ('args-nonsense', "args.coarse_stage_size is 'seven'"),
    ('args-open-a-file', 'sets checkpoint_path, which a checkpoint may not choose'),
    ('args-overlay', 'sets pretrained_cfg_overlay'), ('results-ragged', 'budgeted_batch_classification is'),
]


@pytest.mark.parametrize('script', ALL)
def test_checkpoint_fields_of_the_wrong_type_or_shape_are_one_line(script, inputs, tmp_path_factory, tmp_path,
                                                                   capsys, caplog):
    root = tmp_path_factory.mktemp('badckpt')
    paths = _bad_checkpoints(root, inputs['ckpt'])
    before = tree_digest(root)
    flag = {'dynamic_inference': '--checkpoint_path', 'make_token_labels': '--checkpoint'}.get(script, '--resume')
    for case, message in CKPT_CASES:
        argv = _argv(script, str(inputs['data']), inputs, tmp_path / case, [flag, paths[case]])
        code, text = run(SCRIPTS[script], argv, capsys, caplog)
        one_line_error(code, text, message)
    assert tree_digest(root) == before
    assert not (root / 'other.pth.opened').exists()


def test_missing_ema_and_another_optimizer_are_one_line(inputs, tmp_path, capsys, caplog):
    argv = _argv('make_token_labels', str(inputs['data']), inputs, tmp_path, ['--use-ema'])
    code, text = run(make_token_labels, argv, capsys, caplog)
    one_line_error(code, text, "has no 'model_ema' weights")
    code, text = run(main_deit, [*DEIT, '--data-path', inputs['data'], '--output', tmp_path / 'a'], capsys, caplog)
    assert code == 0, text[-3000:]
    for opt in ('sgd', 'adam'):  # adam: the same state kinds, but the checkpoint says adamw
        code, text = run(main_deit, [*DEIT, '--data-path', inputs['data'], '--output', tmp_path / 'b', '--opt', opt,
                                     '--epochs', '2', '--resume', tmp_path / 'a' / 'checkpoint.pth'], capsys, caplog)
        one_line_error(code, text, f'holds the state of --opt adamw, but this run uses --opt {opt}')


# ------------------------------------------------------------------------------------- output folders
@pytest.mark.parametrize('script', ALL)
def test_output_inside_the_data_is_refused(script, inputs, tmp_path, capsys, caplog):
    inside = inputs['data'] / ('val' if script in ('dynamic_inference', 'visualize') else 'train') / 'runs'
    output = {'dynamic_inference': '--output-dir', 'visualize': '--output-dir'}.get(script, '--output')
    code, text = run(SCRIPTS[script], _argv(script, str(inputs['data']), inputs, tmp_path, [output, inside]),
                     capsys, caplog)
    one_line_error(code, text, 'is inside the input folder')
    assert not inside.exists()


@pytest.mark.parametrize('script', ALL)
def test_a_second_run_on_a_folder_is_refused_and_a_dead_runs_lock_taken_over(script, inputs, tmp_path, capsys, caplog):
    from utils.common.run_folder import LOCK_NAME, RunLock
    out = tmp_path / 'o'
    out.mkdir()
    name = LOCK_NAME if script != 'make_token_labels' else '.cfvit-run.shard0of1.lock'
    with RunLock(out, name):  # another run holds the folder
        code, text = run(SCRIPTS[script], _argv(script, str(inputs['data']), inputs, tmp_path, []), capsys, caplog)
        one_line_error(code, text, 'is in use by another run (pid')
    dead = 'pid 4194305 on elsewhere: main_deit.py'  # left by a killed run (the kernel dropped its flock)
    (out / name).write_text(dead + '\n')
    code, text = run(SCRIPTS[script], _argv(script, str(inputs['data']), inputs, tmp_path, []), capsys, caplog)
    assert code == 0, text[-3000:]
    assert f'took over the lock of {dead}' in text and not (out / name).exists()


def test_resume_from_a_file_named_like_a_temp_file_keeps_it(inputs, tmp_path, capsys, caplog):
    out = tmp_path / 'o'
    code, text = run(main_deit, [*DEIT, '--data-path', inputs['data'], '--output', out], capsys, caplog)
    assert code == 0, text[-3000:]
    named = out / '.checkpoint.pth.X.tmp'
    named.write_bytes((out / 'checkpoint.pth').read_bytes())
    code, text = run(main_deit, [*DEIT, '--data-path', inputs['data'], '--output', out, '--epochs', '2',
                                 '--resume', named], capsys, caplog)
    assert code == 0, text[-3000:]
    assert named.is_file() and log_lines(out)[-1]['epoch'] == 1
