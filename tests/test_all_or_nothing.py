"""Issue 31, cause 4: an output of several files is all or nothing (and cause 8: what round 3 left).

``export_onnx.py`` builds its graphs and manifest in a staging folder and moves them into place, the
manifest last. Tested for real: a file-size limit (RLIMIT_FSIZE, the kernel refusing the write with
EFBIG as a full disk refuses it with ENOSPC) that stops the export half way, and the leftovers of a
crashed export (graphs without a manifest, a staging folder) that the next run must replace.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import export_onnx
from utils.common.atomic import sha256_file
from utils.inference.onnx_export import GRAPH_FILES, MANIFEST_NAME

from helpers import one_line_error, run_main, script_env

pytest.importorskip('onnxruntime')
pytestmark = pytest.mark.usefixtures('one_thread', 'own_logging')

ROOT = Path(__file__).resolve().parents[1]
ARCH = ['--model', 'cf_deit_tiny', '--coarse-stage-size', '2', '--model-kwargs', 'embed_dim=48', 'depth=2',
        'num_heads=3', '--exporter', 'torchscript']


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('ckpt')
    torch.manual_seed(0)
    model = timm.create_model('cf_deit_tiny', coarse_stage_size=2, num_classes=3, embed_dim=48, depth=2, num_heads=3)
    torch.save({'model': model.state_dict()}, root / 'model.pth')
    return root / 'model.pth'


def _complete(out: Path) -> None:
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for entry in manifest['graphs'].values():
        assert sha256_file(out / entry['file']) == entry['sha256']
    assert not [p for p in out.iterdir() if p.name.startswith('.export-')]


def test_an_export_stopped_half_way_leaves_nothing_and_the_same_command_then_succeeds(checkpoint, tmp_path, capsys,
                                                                                     caplog):
    reference = tmp_path / 'reference'
    code, text = run_main(export_onnx, ['--checkpoint_path', checkpoint, *ARCH, '--output-dir', reference], capsys,
                          caplog)
    assert code == 0, text[-3000:]
    sizes = sorted((reference / name).stat().st_size for name in GRAPH_FILES.values())
    limit = sizes[-1] - 1  # the larger graph cannot be written: the export stops after the smaller one

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / 'export'
    argv = [sys.executable, str(ROOT / 'export_onnx.py'), '--checkpoint_path', str(checkpoint), *ARCH,
            '--output-dir', str(out)]
    proc = subprocess.run(argv, cwd=tmp_path, env=script_env(), preexec_fn=limited, capture_output=True, text=True,
                          timeout=600)
    one_line_error(proc.returncode, proc.stdout + proc.stderr, 'cannot write the export')
    assert not out.exists() or not [p.name for p in out.iterdir()], list(out.iterdir())  # no graph, no staging
    out.mkdir(exist_ok=True)  # an existing (empty) folder stops half way alike
    proc = subprocess.run(argv, cwd=tmp_path, env=script_env(), preexec_fn=limited, capture_output=True, text=True,
                          timeout=600)
    one_line_error(proc.returncode, proc.stdout + proc.stderr, 'cannot write the export')
    assert not list(out.iterdir())
    proc = subprocess.run(argv, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _complete(out)


def test_the_leftovers_of_a_crashed_export_are_recognised_and_replaced(checkpoint, tmp_path, capsys, caplog):
    out = tmp_path / 'export'
    (out / '.export-k1ll3d.tmp').mkdir(parents=True)  # a staging folder of an export killed while writing
    (out / '.export-k1ll3d.tmp' / 'fine.onnx').write_bytes(b'\x08\x07half')
    (out / 'coarse.onnx').write_bytes(b'\x08\x07half a graph')  # moved into place, then the crash
    code, text = run_main(export_onnx, ['--checkpoint_path', checkpoint, *ARCH, '--output-dir', out], capsys, caplog)
    assert code == 0, text[-3000:]
    assert 'an export that was interrupted before it finished; replacing it' in text
    _complete(out)
    # a complete export is still never replaced unless asked
    before = (out / MANIFEST_NAME).read_bytes()
    code, text = run_main(export_onnx, ['--checkpoint_path', checkpoint, *ARCH, '--output-dir', out], capsys, caplog)
    one_line_error(code, text, 'already holds manifest.json, coarse.onnx, fine.onnx')
    assert (out / MANIFEST_NAME).read_bytes() == before


# ---------------------------------------------------------------------------------------------- cause 8
def test_a_manifest_whose_graph_entry_is_a_list_is_one_line(checkpoint, tmp_path, capsys, caplog):
    import dynamic_inference
    out = tmp_path / 'export'
    code, text = run_main(export_onnx, ['--checkpoint_path', checkpoint, *ARCH, '--output-dir', out], capsys, caplog)
    assert code == 0, text[-3000:]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest['graphs']['coarse'] = ['coarse.onnx']
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, text = run_main(dynamic_inference, ['--backend', 'onnxruntime', out, '--eval-mode', '3', '--output-dir',
                                              tmp_path / 'o'], capsys, caplog)
    assert 'Traceback' not in text, text[-3000:]  # mode 3 prints the manifest as it is
    code, text = run_main(dynamic_inference, ['--backend', 'onnxruntime', out, '--eval-mode', '2', '--data_url',
                                              tmp_path / 'nothing', '--output-dir', tmp_path / 'o2'], capsys, caplog)
    one_line_error(code, text, 'names no coarse graph')


def test_model_kwargs_that_load_weights_are_one_line(checkpoint, tmp_path, capsys, caplog):
    overlay = '{"pretrained": true, "pretrained_cfg_overlay": {"file": "/etc/passwd"}}'
    code, text = run_main(export_onnx, ['--checkpoint_path', checkpoint, '--model', 'cf_deit_tiny',
                                        '--coarse-stage-size', '2', '--model-kwargs', overlay, '--output-dir',
                                        tmp_path / 'e'], capsys, caplog)
    one_line_error(code, text, '--model-kwargs pretrained, pretrained_cfg_overlay: a model argument may not choose '
                               'the weights')


def test_label_maps_at_another_size_than_a_cf_teacher_takes_are_one_line(checkpoint, tmp_path, capsys, caplog):
    import make_token_labels
    from helpers import make_image_folder
    data = make_image_folder(tmp_path / 'data', {'train': 1}, 3)
    code, text = run_main(make_token_labels, [data, '--teacher', 'cf_deit_tiny', '--checkpoint', checkpoint,
                                              '--coarse-stage-size', '2', '--model-kwargs', 'embed_dim=48', 'depth=2',
                                              'num_heads=3', '--input-size', '48', '--output', tmp_path / 'maps',
                                              '-j', '0'], capsys, caplog)
    one_line_error(code, text, '--input-size 48: the CF teacher takes 64 px images')
