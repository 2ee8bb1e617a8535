"""Issue 31, cause 5: names are neither assumed short nor assumed UTF-8.

Built for real on the file system: an image named with 251 bytes (legal: NAME_MAX is 255), a checkpoint
named with 236 bytes, a class folder and an image whose names are bytes that are not UTF-8. Temporary
names stay within NAME_MAX; names shown in figures and logs are escaped, never decoded blindly.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch

import dynamic_inference
import make_token_labels
import visualize
from utils.common.atomic import NAME_MAX, atomic_file, remove_stale_temp_files, temp_prefix
from utils.common.logs import setup_logging, shown_name

from helpers import make_image_folder, run_main

pytestmark = pytest.mark.usefixtures('one_thread', 'own_logging')

G = 2
ARCH = ['--model-kwargs', 'embed_dim=48', 'depth=2', 'num_heads=3']
LONG = 'i' * 247 + '.png'  # 251 bytes (legal: NAME_MAX is 255); its label map's temporary name was 264
NOT_UTF8 = os.fsdecode(b'caf\xe9')  # Latin-1 'cafe' with an accent: not UTF-8


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp('names')
    data = make_image_folder(root / 'data', {'train': 2, 'val': 2}, 2)
    for split in ('train', 'val'):
        shutil.copy(data / split / 'class0' / '0.png', data / split / 'class0' / LONG)
        (data / split / 'class1').rename(data / split / NOT_UTF8)
        (data / split / NOT_UTF8 / '0.png').rename(data / split / NOT_UTF8 / (os.fsdecode(b'\xff\xfe') + '.png'))
    torch.manual_seed(0)
    model = timm.create_model('cf_deit_tiny', coarse_stage_size=G, num_classes=2, embed_dim=48, depth=2, num_heads=3)
    ckpt = root / ('c' * 232 + '.pth')  # 236 bytes
    torch.save({'model': model.state_dict()}, ckpt)
    return {'data': data, 'ckpt': ckpt}


def test_temporary_names_stay_within_name_max(tmp_path):
    for name in ('checkpoint.pth', 'x' * NAME_MAX, 'é' * 127):
        target = tmp_path / name
        with atomic_file(target) as f:
            temp, = [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')]
            assert len(os.fsencode(temp)) <= NAME_MAX and temp.startswith(temp_prefix(name))
            f.write(b'data')
        assert target.read_bytes() == b'data'
    stale = tmp_path / (temp_prefix('x' * NAME_MAX) + 'k1ll3d00.tmp')  # left by a SIGKILL
    stale.write_bytes(b'half')
    assert remove_stale_temp_files(tmp_path, ['x' * NAME_MAX]) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(['checkpoint.pth', 'x' * NAME_MAX, 'é' * 127])


def test_a_251_byte_image_name_gets_its_label_map(inputs, tmp_path, capsys, caplog):
    out = tmp_path / 'maps'
    code, text = run_main(make_token_labels, [inputs['data'], '--teacher', 'cf_deit_tiny', '--checkpoint',
                                              inputs['ckpt'], '--coarse-stage-size', G, *ARCH, '--output', out,
                                              '-j', '0', '-b', '2'], capsys, caplog)
    assert code == 0, text[-3000:]
    maps = list(out.rglob('*.pt'))
    assert any(p.name == LONG[:-4] + '.pt' for p in maps), [p.name[:20] for p in maps]
    assert not list(out.rglob('*.tmp'))


def test_write_checkpoint_beside_a_236_byte_checkpoint_name(inputs, tmp_path, capsys, caplog):
    out = tmp_path / 'out'
    code, text = run_main(dynamic_inference, ['--eval-mode', '1', '--data_url', inputs['data'], '--checkpoint_path',
                                              inputs['ckpt'], '--model', 'cf_deit_tiny', '--coarse-stage-size', G,
                                              *ARCH, '--num-workers', '0', '--output-dir', out, '--write-checkpoint'],
                          capsys, caplog)
    assert code == 0, text[-3000:]
    written = Path(json.loads((out / 'budgeted.json').read_text())['written_checkpoint'])
    assert written.exists() and len(os.fsencode(written.name)) <= NAME_MAX
    assert written.name.endswith('_with_results.pth')


def test_visualize_draws_and_logs_names_that_are_not_utf8(inputs, tmp_path, capsys, caplog):
    out = tmp_path / 'vis'
    code, text = run_main(visualize, ['--data-path', inputs['data'] / 'val', '--resume', inputs['ckpt'], '--model',
                                      'cf_deit_tiny', '--coarse-stage-size', G, *ARCH, '--num-workers', '0',
                                      '--no-progress', '--output-dir', out, '--threshold', '0.5'], capsys, caplog)
    assert code == 0, text[-3000:]
    assert 'Traceback' not in text and 'TypeError' not in text
    assert list(out.glob('*.png'))


def test_a_log_line_with_a_name_that_is_not_utf8_is_escaped(tmp_path):
    assert shown_name(NOT_UTF8) == 'caf\\xe9'
    with open(tmp_path / 'log', 'w', encoding='utf-8') as stream:  # strict, as stdout is under a UTF-8 locale
        setup_logging(stream=stream, style='plain')
        logging.getLogger('names').info('skipping %s', NOT_UTF8)
    assert (tmp_path / 'log').read_text() == 'skipping caf\\xe9\n'
