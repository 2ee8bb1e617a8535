"""Issue 31, cause 3: every training flag is checked when it is parsed, against the registry or range its
consumer accepts (timm's optimizers, schedulers and augmentations; sane worker counts and timeouts;
rendezvous schemes), in both training scripts; a run that would train nothing says so.

Each case runs the script's ``main`` in this process with the bad value and checks exit status 2, no
traceback, and the one line naming the flag.
"""
from __future__ import annotations

import argparse

import pytest

import main_deit
import main_lvvit
from utils.common.checkpoint import load_checkpoint_file
from utils.train.args import get_args_parser

from helpers import make_image_folder, one_line_error, run_main

pytestmark = pytest.mark.usefixtures('one_thread', 'own_logging')

TRAIN = ['--model', 'cf_deit_tiny', '--embed-dim', '48', '--depth', '2', '--num-heads', '3', '--coarse-stage-size',
         '2', '--device', 'cpu', '--no-amp', '--num_workers', '0', '--batch-size', '2', '--warmup-epochs', '0',
         '--lr', '1e-3', '--print-freq', '1000', '--seed', '0', '--no-repeated-aug', '--aa', 'none', '--mixup', '0',
         '--cutmix', '0', '--reprob', '0', '--no-model-ema']

BAD_FLAGS = [
    (['--opt', 'bogus'], "timm has no optimizer 'bogus'"),
    (['--opt', 'sgd_adamw'], "timm has no optimizer 'sgd_adamw'"),
    (['--sched', 'bogus'], "timm has no scheduler 'bogus'"),
    (['--aa', 'rand-bogus9'], "timm cannot build the augmentation policy 'rand-bogus9'"),
    (['--aa', 'bogus'], "timm cannot build the augmentation policy 'bogus'"),
    (['--remode', 'bogus'], "argument --remode: invalid choice: 'bogus'"),
    (['--train-interpolation', 'bogus'], "argument --train-interpolation: invalid choice: 'bogus'"),
    (['--opt-betas', '0.9'], 'argument --opt-betas: expected 2 arguments'),
    (['--cutmix-minmax', '0.9', '0.1'], 'argument --cutmix-minmax: MIN must be below MAX, got 0.9 0.1'),
    (['--cutmix-minmax', '0.5', '0.5'], 'argument --cutmix-minmax: MIN must be below MAX'),
    (['--dist-timeout', 'nan'], 'argument --dist-timeout: must be a finite number'),
    (['--dist-timeout', '1e300'], 'argument --dist-timeout: must be in (0, 10080]'),
    (['--dist-timeout', '-5'], 'argument --dist-timeout: must be in (0, 10080]'),
    (['--dist-timeout', '0'], 'argument --dist-timeout: must be in (0, 10080]'),
    (['--dist_url', 'bogus://'], "expected env://, tcp://HOST:PORT or file:///PATH, got 'bogus://'"),
    (['--dist_url', 'tcp://'], "got 'tcp://'"),
    (['--lr-noise', '0.2', '0.5', '0.9'], 'argument --lr-noise: takes START or START END, got 3 values'),
    (['--lr-noise', '0.5', '0.2'], 'argument --lr-noise: START [END]: non-negative, END above START'),
    (['--num-workers', '2147483647'], 'must be at most 256 loader processes'),
    (['--num-workers', '-1'], 'must be at least 0, got -1'),
]


@pytest.mark.parametrize('script', [main_deit, main_lvvit], ids=['main_deit', 'main_lvvit'])
@pytest.mark.parametrize('flags, message', BAD_FLAGS, ids=[' '.join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_value_is_one_line_when_parsed(script, flags, message, tmp_path, capsys, caplog):
    code, text = run_main(script, [*flags, '--output', tmp_path / 'out'], capsys, caplog)
    one_line_error(code, text, message)
    assert not (tmp_path / 'out').exists()  # refused before anything was made


@pytest.mark.parametrize('flags', [
    ['--opt', 'lookahead_adamw'], ['--opt', 'SGD'], ['--sched', 'none'], ['--sched', 'step'],
    ['--aa', 'augmix-m5-w4-d2'], ['--aa', 'original'], ['--aa', 'v0'], ['--aa', 'rand-m9-mstd0.5-inc1'],
    ['--opt-betas', '0.9', '0.999'], ['--cutmix-minmax', '0.1', '0.9'], ['--dist_url', 'tcp://127.0.0.1:1234'],
    ['--dist_url', 'file:///tmp/x'], ['--num-workers', '256'], ['--train-interpolation', 'random'], ['--lr-noise', '0.4'],
    ['--lr-noise', '0.4', '0.9']])
def test_the_values_their_consumers_take_still_parse(flags):
    args = argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(flags)
    assert args is not None


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), {'train': 2, 'val': 1}, 3)


def test_a_run_that_would_train_nothing_says_so(data, tmp_path, capsys, caplog):
    out = tmp_path / 'out'
    code, text = run_main(main_deit, [*TRAIN, '--data-path', data, '--start_epoch', '5', '--epochs', '1', '--output',
                                      out], capsys, caplog)
    one_line_error(code, text, 'nothing to train: --start_epoch 5 is not below --epochs 1')
    assert 'best fine top-1 -1.000' not in text
    # a finished run resumed with the same --epochs, or stopped before where it starts
    code, text = run_main(main_deit, [*TRAIN, '--data-path', data, '--epochs', '1', '--output', out], capsys, caplog)
    assert code == 0, text[-3000:]
    before = (out / 'checkpoint.pth').read_bytes()
    code, text = run_main(main_deit, [*TRAIN, '--data-path', data, '--epochs', '1', '--output', out, '--resume',
                                      out / 'checkpoint.pth'], capsys, caplog)
    one_line_error(code, text, 'nothing to train: the run would start at epoch 1 (after')
    code, text = run_main(main_deit, [*TRAIN, '--data-path', data, '--epochs', '3', '--stop-at-epoch', '1',
                                      '--output', out, '--resume', out / 'checkpoint.pth'], capsys, caplog)
    one_line_error(code, text, '--stop-at-epoch 1')
    assert (out / 'checkpoint.pth').read_bytes() == before
    assert load_checkpoint_file(out / 'checkpoint.pth')['epoch'] == 0


def test_class_folders_renamed_since_training_are_refused_on_resume_and_eval(data, tmp_path, capsys, caplog):
    """Decided (issue 31, cause 9): a training checkpoint records its class folders in label order; resuming
    or evaluating it on folders renamed since (same count, so nothing else would notice) is one line."""
    import shutil
    moved = tmp_path / 'data'
    shutil.copytree(data, moved)
    out = tmp_path / 'out'
    code, text = run_main(main_deit, [*TRAIN, '--data-path', moved, '--epochs', '2', '--stop-at-epoch', '1',
                                      '--output', out], capsys, caplog)
    assert code == 0, text[-3000:]
    assert load_checkpoint_file(out / 'checkpoint.pth')['classes'] == ['class0', 'class1', 'class2']
    for split in ('train', 'val'):  # class0 renamed: it now sorts last, every label shifts
        (moved / split / 'class0').rename(moved / split / 'class9')
    resume = [*TRAIN, '--data-path', moved, '--epochs', '2', '--output', out, '--resume', out / 'checkpoint.pth']
    code, text = run_main(main_deit, resume, capsys, caplog)
    one_line_error(code, text, "trained with label 0 = class folder 'class0', but in this data set label 0 is 'class1'")
    code, text = run_main(main_deit, [*TRAIN, '--data-path', moved, '--eval', '--resume', out / 'checkpoint.pth'],
                          capsys, caplog)
    one_line_error(code, text, "trained with label 0 = class folder 'class0'")


def test_usable_device_is_the_one_device_check(monkeypatch):
    import torch

    from utils.common.errors import BadInputError
    from utils.common.flags import default_device, usable_device
    assert usable_device('cpu') == torch.device('cpu')
    assert default_device() == ('cuda' if torch.cuda.is_available() else 'cpu')
    with pytest.raises(BadInputError, match=r"^--device 'bogus' is not a device"):
        usable_device('bogus')
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match='^--device cuda:1: CUDA is not available on this machine'):
            usable_device('cuda:1')

    def broken(*args, **kwargs):
        raise RuntimeError('driver failure')
    monkeypatch.setattr(torch, 'empty', broken)
    with pytest.raises(BadInputError, match="^device 'cpu' is not available: driver failure$"):
        usable_device('cpu')
