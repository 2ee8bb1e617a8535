"""ONNX export of both stages and early exit in onnxruntime (export_onnx.py, utils.inference.onnx_export/onnx_runtime).

The four golden configurations (CF-DeiT / CF-LV-ViT, g = 7 and 9, with the golden weights and
images) are exported with the tracing exporter (seconds); a tiny model goes through the default
dynamo exporter. Each exported pair must give PyTorch's early-exit logits within 1e-4, the same
top-1 and the same exit decisions at the golden cases' five thresholds (every row exits, none
does, some do), for batches of 1 and 5.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch

from helpers import ROOT, build_from_config, golden_case_files, load_case, make_image_folder

import export_onnx
from models.export import SeparableBilinear
from models.token_ops import coarse_from_fine
from utils.inference.onnx_export import export_early_exit
from utils.inference.onnx_runtime import ExportFolderError, OnnxEarlyExit

LOGITS = dict(rtol=1e-4, atol=1e-4)
pytestmark = pytest.mark.usefixtures('one_thread')


class CountingSession:
    """Wraps an onnxruntime session and counts the rows it was run on."""

    def __init__(self, session):
        self.session, self.rows = session, []

    def run(self, names, feeds):
        self.rows.append(next(iter(feeds.values())).shape[0])
        return self.session.run(names, feeds)


@pytest.fixture(scope='module', params=golden_case_files(), ids=lambda p: p.stem)
def exported_case(request, tmp_path_factory):
    case = load_case(request.param)
    model = build_from_config(case['config'])
    model.load_state_dict(case['state_dict'], strict=True)
    model.eval()
    out = tmp_path_factory.mktemp(request.param.stem)
    manifest = export_early_exit(model, out, exporter='torchscript')
    x_fine = case['x_fine_int8'].to(torch.float32) / case['x_fine_scale']
    return case, model, OnnxEarlyExit(out, threads=1), x_fine, manifest


@pytest.mark.parametrize('bilinear', [(224, 112), (288, 144), (64, 32)])
def test_separable_bilinear_is_torchs_interpolation(bilinear):
    fine, coarse = bilinear
    x = torch.randn(2, 3, fine, fine, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(SeparableBilinear(fine, coarse)(x), coarse_from_fine(x, (coarse, coarse)),
                               rtol=0, atol=2e-6)


def test_manifest_describes_the_model(exported_case):
    case, model, runtime, _, manifest = exported_case
    cfg = case['config']
    assert manifest['model'] == ('cf_deit_small' if cfg['arch'] == 'CFVisionTransformer' else 'cf_lvvit_small')
    assert manifest['coarse_stage_size'] == cfg['coarse_stage_size']
    assert manifest['img_size_list'] == cfg['img_size_list'] == runtime.img_size_list
    assert manifest['num_classes'] == cfg['num_classes'] == runtime.num_classes
    assert manifest['exporter']['opset'] == 18 and manifest['exporter']['exporter'] == 'torchscript'
    assert manifest['data_config']['mean'] == [0.485, 0.456, 0.406]
    assert manifest['data_config']['crop_pct'] == (0.875 if cfg['arch'] == 'CFVisionTransformer' else 0.9)
    g = manifest['gflops']
    assert 0 < g[0] < g[1] and manifest['stage_gflops']['fine'] == pytest.approx(g[1] - g[0])
    for stage in ('coarse', 'fine'):
        assert (runtime.folder / manifest['graphs'][stage]['file']).is_file()
    on_disk = json.loads((runtime.folder / 'manifest.json').read_text())
    assert on_disk == json.loads(json.dumps(manifest))


@pytest.mark.parametrize('batch', [1, 5])
@torch.no_grad()
def test_early_exit_matches_pytorch(exported_case, batch):
    case, model, runtime, x_fine, _ = exported_case
    counting = CountingSession(runtime._fine)
    runtime._fine = counting
    try:
        thresholds = [e['threshold'] for e in case['early_exit']]
        assert len(thresholds) == 5
        kinds = set()
        for start in range(0, x_fine.shape[0] - batch + 1, max(batch, 2)):
            x = x_fine[start:start + batch]
            for t in thresholds:
                ref = model.forward_details(x, t)
                counting.rows.clear()
                got = runtime.forward_details(x, t)
                assert torch.equal(got.exited, ref.exited), t
                torch.testing.assert_close(got.fine_logits, ref.fine_logits, **LOGITS)
                torch.testing.assert_close(got.coarse_logits, ref.coarse_logits, **LOGITS)
                torch.testing.assert_close(got.confidence, ref.confidence, rtol=0, atol=1e-5)
                assert torch.equal(got.fine_logits.argmax(1), ref.fine_logits.argmax(1))
                torch.testing.assert_close(runtime.forward_early_exit(x, t), ref.fine_logits, **LOGITS)
                n_on = int((~ref.exited).sum())
                # the fine graph ran once on exactly the rows that go on, or not at all
                assert counting.rows[:1] == ([n_on] if n_on else [])
                kinds.add('all' if n_on == 0 else 'none' if n_on == batch else 'some')
        assert kinds >= {'all', 'none'} and (batch == 1 or 'some' in kinds)
    finally:
        runtime._fine = counting.session


@torch.no_grad()
def test_both_stages_for_every_row_without_threshold(exported_case):
    case, model, runtime, x_fine, _ = exported_case
    model.set_informative_selection(True)  # as inference (and the fine graph) always selects
    ref = model.forward_details(x_fine)
    got = runtime.forward_details([coarse_from_fine(x_fine, (model.img_size_list[0],) * 2), x_fine])
    assert not got.exited.any()
    torch.testing.assert_close(got.fine_logits, case['sel_fine_logits'], **LOGITS)
    torch.testing.assert_close(got.fine_logits, ref.fine_logits, **LOGITS)
    torch.testing.assert_close(got.cls_attn, ref.cls_attn, rtol=0, atol=1e-5)
    assert got.important_coarse_index.shape == ref.important_coarse_index.shape


def tiny_model(**kwargs):
    kw = dict(coarse_stage_size=3, embed_dim=48, depth=4, num_heads=3, num_classes=3)
    kw.update(kwargs)
    torch.manual_seed(0)
    return timm.create_model('cf_deit_tiny', **kw).eval()


@torch.no_grad()
def test_dynamo_exporter_on_a_tiny_model(tmp_path):
    model = tiny_model()
    manifest = export_early_exit(model, tmp_path / 'dyn')
    assert manifest['exporter']['exporter'] == 'dynamo' and 'onnxscript' in manifest['exporter']
    runtime = OnnxEarlyExit(tmp_path / 'dyn', threads=1)
    x = torch.randn(5, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    conf = model.forward_details(x).confidence.sort().values
    for t in (0.0, float(conf[2]) - 1e-4, 1.01):
        ref = model.forward_details(x, t)
        got = runtime.forward_details(x, t)
        assert torch.equal(got.exited, ref.exited)
        torch.testing.assert_close(got.fine_logits, ref.fine_logits, **LOGITS)
        torch.testing.assert_close(runtime.forward_early_exit(x[:1], t), ref.fine_logits[:1], **LOGITS)


def test_dynamic_quantization_writes_int8_linear_layers(tmp_path):
    import onnx
    model = tiny_model()
    manifest = export_early_exit(model, tmp_path / 'q', exporter='torchscript', quantize='dynamic')
    assert manifest['quantize'] == 'dynamic'
    ops = {n.op_type for n in onnx.load(str(tmp_path / 'q' / 'fine.onnx')).graph.node}
    assert 'MatMulInteger' in ops or 'DynamicQuantizeMatMul' in ops, ops
    runtime = OnnxEarlyExit(tmp_path / 'q', threads=1)
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.forward_details(x)
    got = runtime.forward_details(x)
    assert got.fine_logits.shape == ref.fine_logits.shape
    assert (got.fine_logits - ref.fine_logits).abs().max() < 0.5  # int8: close, not equal


# --------------------------------------------------------------------------- scripts and bad input
@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny')
    model = tiny_model()
    path = root / 'tiny.pth'
    args = {'model': 'cf_deit_tiny', 'coarse_stage_size': 3, 'embed_dim': 48, 'depth': 4, 'num_heads': 3}
    torch.save({'model': model.state_dict(), 'args': args}, path)
    out = root / 'export'
    assert export_onnx.main(['--checkpoint_path', str(path), '--output-dir', str(out), '--exporter', 'torchscript']) == 0
    return path, out


def run_script(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'HF_HUB_OFFLINE': '1', 'MPLBACKEND': 'Agg'})


def test_export_script_writes_a_folder_from_a_training_checkpoint(tiny_checkpoint):
    _, out = tiny_checkpoint
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['model'] == 'cf_deit_tiny' and manifest['coarse_stage_size'] == 3
    assert manifest['img_size_list'] == [48, 96] and manifest['num_classes'] == 3
    assert manifest['checkpoint'].endswith('tiny.pth')
    assert sorted(p.name for p in out.iterdir()) == ['coarse.onnx', 'fine.onnx', 'manifest.json']


def test_refuses_to_overwrite_an_export(tiny_checkpoint, capsys):
    path, out = tiny_checkpoint
    before = (out / 'manifest.json').read_bytes()
    assert export_onnx.main(['--checkpoint_path', str(path), '--output-dir', str(out)]) == 2
    assert 'already holds' in capsys.readouterr().err
    assert (out / 'manifest.json').read_bytes() == before


def test_dynamic_inference_onnxruntime_backend_matches_torch(tiny_checkpoint, tmp_path):
    path, out = tiny_checkpoint
    data = make_image_folder(tmp_path / 'data', {'val': 4}, num_classes=3, size=(100, 100))
    results = {}
    for backend in ('torch', 'onnxruntime'):
        src = ['--backend', 'onnxruntime', str(out)] if backend == 'onnxruntime' else ['--checkpoint_path', str(path)]
        for mode, name in ((0, 'anytime'), (2, 'throughput')):
            res = run_script('dynamic_inference.py', *src, '--eval-mode', str(mode), '--data_url', str(data),
                             '--batch_size', '5', '--num-workers', '0', '--threshold', '0.4', '--output-dir',
                             str(tmp_path / f'{backend}{mode}'), '--device', 'cpu')
            assert res.returncode == 0, res.stderr
            results[backend, mode] = json.loads((tmp_path / f'{backend}{mode}' / f'{name}.json').read_text())
    assert results['onnxruntime', 0]['anytime_classification'] == results['torch', 0]['anytime_classification']
    assert results['onnxruntime', 0]['backend'] == 'onnxruntime'
    for key in ('top1', 'top5', 'exit_share', 'images'):
        assert results['onnxruntime', 2][key] == results['torch', 2][key], key
    assert results['onnxruntime', 2]['flop'] == pytest.approx(results['torch', 2]['flop'])
    res = run_script('dynamic_inference.py', '--backend', 'onnxruntime', str(out), '--eval-mode', '3',
                     '--output-dir', str(tmp_path / 'report'))
    assert res.returncode == 0, res.stderr
    assert 'gflops' in res.stdout and 'cf_deit_tiny' in res.stdout
    assert json.loads((tmp_path / 'report' / 'export_manifest.json').read_text())['num_classes'] == 3


def one_line_error(res, *words):
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in res.stderr, res.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_export_folders(tiny_checkpoint, tmp_path):
    _, out = tiny_checkpoint
    other = tmp_path / 'other'
    export_early_exit(tiny_model(coarse_stage_size=2), other, exporter='torchscript')

    def folder(name, change):
        d = tmp_path / name
        shutil.copytree(out, d)
        change(d)
        return d

    cases = {
        'missing': (folder('missing', lambda d: (d / 'fine.onnx').unlink()), ['fine graph', 'missing']),
        'foreign': (folder('foreign', lambda d: shutil.copy(other / 'fine.onnx', d / 'fine.onnx')), ['SHA-256']),
        'manifest of another model': (folder('manifest', lambda d: shutil.copy(other / 'manifest.json', d)),
                                      ['SHA-256']),
        'not ours': (folder('notours', lambda d: (d / 'manifest.json').write_text('{"format": "x"}')),
                     ['not a CF-ViT']),
        'no folder': (tmp_path / 'nowhere', ['not found']),
    }
    for name, (d, words) in cases.items():
        with pytest.raises(ExportFolderError):
            OnnxEarlyExit(d)
        res = run_script('dynamic_inference.py', '--backend', 'onnxruntime', str(d), '--eval-mode', '3',
                         '--output-dir', str(tmp_path / 'o'))
        one_line_error(res, *words)
    # a manifest edited to describe another model, its hashes kept: the graphs' shapes disagree
    edited = folder('edited', lambda d: None)
    m = json.loads((edited / 'manifest.json').read_text())
    m['img_size_list'], m['num_classes'] = [64, 128], 7
    (edited / 'manifest.json').write_text(json.dumps(m))
    with pytest.raises(ExportFolderError, match='manifest of another model'):
        OnnxEarlyExit(edited)


def test_export_script_bad_input(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    not_cf = tmp_path / 'deit.pth'
    torch.save({'model': timm.create_model('deit_tiny_patch16_224', num_classes=3, depth=1).state_dict()}, not_cf)
    res = run_script('export_onnx.py', '--checkpoint_path', str(not_cf), '--output-dir', str(tmp_path / 'a'))
    one_line_error(res, 'does not fit')
    no_head = tmp_path / 'nohead.pth'
    torch.save({'model': {'w': torch.zeros(1)}}, no_head)
    one_line_error(run_script('export_onnx.py', '--checkpoint_path', str(no_head), '--output-dir', str(tmp_path / 'b')),
                   'not a classification checkpoint')
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    one_line_error(run_script('export_onnx.py', '--checkpoint_path', str(path), '--output-dir', str(blocker / 'sub')),
                   'output folder')
    one_line_error(run_script('export_onnx.py', '--checkpoint_path', str(tmp_path / 'missing.pth')))


@pytest.mark.filterwarnings("ignore:Setting 'keep_initializers_as_inputs=False':UserWarning")  # torch's, at opset 7
@pytest.mark.parametrize('opset, message', [
    (21, '--opset 21: the torchscript exporter writes opsets up to 20 (the default is 18)'),
    (7, '--opset 7: ONNX export failed on expand, which is not implemented for opset 7'),
])
def test_an_opset_the_torchscript_exporter_cannot_write_is_bad_input(tmp_path, opset, message):
    from utils.common.errors import BadInputError
    with pytest.raises(BadInputError) as info:
        export_early_exit(tiny_model(coarse_stage_size=2), tmp_path / 'x', exporter='torchscript', opset=opset)
    assert str(info.value).startswith(message) and '\n' not in str(info.value)
    assert not (tmp_path / 'x' / 'manifest.json').exists()
    leftovers = [p.name for p in (tmp_path / 'x').iterdir()] if (tmp_path / 'x').exists() else []
    assert not [n for n in leftovers if n.endswith('.onnx') or n.startswith('.export-')], leftovers


def test_opset_flag_has_onnx_lower_bound(capsys):
    with pytest.raises(SystemExit):
        export_onnx.get_args_parser().parse_args(['--checkpoint_path', 'x', '--opset', '3'])
    assert 'argument --opset: must be at least 7, got 3' in capsys.readouterr().err
