"""dynamic_inference.py end to end, the budgeted sweep against the release, and per-stage GFLOPs."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from helpers import REPO_GOLDEN_DIR, build_from_config, load_case

import dynamic_inference
from datasets import eval_transform
from utils.inference.early_exit import DEFAULT_THRESHOLDS, budgeted_sweep, dynamic_evaluate, sweep_from_predictions
from utils.inference.flops import stage_gflops

TINY = {'embed_dim': 48, 'depth': 4, 'num_heads': 3}
FLOPS_REF = json.loads((REPO_GOLDEN_DIR / 'flops.json').read_text())


# ------------------------------------------------------------------------------ budgeted sweep
def test_golden_dynamic_evaluate():
    d = torch.load(REPO_GOLDEN_DIR / 'dynamic_evaluate.pt', weights_only=True)
    gflops, acc = d['budgeted_batch_classification']
    loop = [dynamic_evaluate(d['probs'], d['targets'], d['flop'], t) for t in d['thresholds']]
    assert [a for a, _ in loop] == acc
    np.testing.assert_allclose([f for _, f in loop], gflops, rtol=1e-6)
    sweep = budgeted_sweep(d['probs'], d['targets'], d['flop'], [t[0] for t in d['thresholds']])
    assert sweep[1] == acc
    np.testing.assert_allclose(sweep[0], gflops, rtol=1e-6)
    assert d['anytime_classification'] == [40.5, 80.5]


def test_sweep_equals_loop_at_exact_boundaries():
    g = torch.Generator().manual_seed(0)
    n, c = 300, 4
    probs = torch.rand(2, n, c, generator=g).softmax(-1)
    # put coarse maxima exactly on thresholds (0.5 is exact in float32, 0.07 and 0.29 are not)
    for i, v in enumerate([0.5, 0.07, 0.29, 0.99, 0.3]):
        probs[0, i] = torch.tensor([v, (1 - v) / 3, (1 - v) / 3, (1 - v) / 3])
    targets = torch.randint(0, c, (n,), generator=g)
    flops = [1.25, 4.5]
    sweep = budgeted_sweep(probs, targets, flops)
    for p in range(100):
        acc, f = dynamic_evaluate(probs, targets, flops, [DEFAULT_THRESHOLDS[p], -1])
        assert sweep[1][p] == acc and sweep[0][p] == pytest.approx(f, rel=1e-6)


def test_sweep_is_fast():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(50_000, generator=g)
    cc, fc = torch.rand(50_000, generator=g) > 0.3, torch.rand(50_000, generator=g) > 0.2
    t0 = time.perf_counter()
    gflops, acc = sweep_from_predictions(conf, cc, fc, [1.1, 4.0])
    assert time.perf_counter() - t0 < 1.0  # generous: milliseconds in practice
    assert len(gflops) == len(acc) == 100


# ------------------------------------------------------------------------------ GFLOPs
@pytest.mark.parametrize('name', ['cf_deit_small', 'cf_lvvit_small'])
@pytest.mark.parametrize('g', [7, 9])
def test_full_size_gflops_match_release(name, g):
    model = timm.create_model(name, coarse_stage_size=g)
    ref = FLOPS_REF[f'{name}_c{g}']
    coarse, total = stage_gflops(model)
    assert coarse == pytest.approx(ref['gflops_coarse'], rel=0.01)
    assert total == pytest.approx(ref['gflops_coarse_plus_fine_selection'], rel=0.01)
    assert stage_gflops(model, selection=False)[1] == pytest.approx(
        ref['gflops_coarse_plus_fine_no_selection'], rel=0.01)
    if (name, g) == ('cf_deit_small', 7):
        assert [round(coarse, 3), round(total, 3)] == [1.102, 4.022]


@pytest.mark.parametrize('case', ['deit_c7', 'deit_c9', 'lvvit_c7', 'lvvit_c9'])
def test_small_model_gflops_match_release(case):
    model = build_from_config(load_case(REPO_GOLDEN_DIR / f'{case}.pt')['config'])
    ref = FLOPS_REF[f'small_test_{case}']
    coarse, total = stage_gflops(model)
    assert coarse == pytest.approx(ref['gflops_coarse'], rel=0.01)
    assert total == pytest.approx(ref['gflops_coarse_plus_fine_selection'], rel=0.01)


# ------------------------------------------------------------------------------ the script
def _write_folder(root: Path, classes=3, per_class=5, seed=0):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / 'val' / f'class{c}'
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (70 + 3 * i, 90, 3), dtype=np.uint8)).save(d / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('di')
    data = _write_folder(root / 'data')
    ckpts = {}
    for name in ('cf_deit_tiny', 'cf_lvvit_tiny'):
        for g in (2, 3):
            torch.manual_seed(g)
            m = timm.create_model(name, coarse_stage_size=g, num_classes=3, **TINY)
            path = root / f'{name}_{g}.pth'
            torch.save({'model': m.state_dict(), 'flop': [0.5, 1.0]}, path)
            ckpts[name, g] = path
    return root, data, ckpts


def run(setup, tmp_path, mode, name='cf_deit_tiny', g=2, *extra):
    root, data, ckpts = setup
    out = tmp_path / f'out_{mode}'
    argv = ['--eval-mode', str(mode), '--data_url', str(data) + '/', '--batch_size', '4', '--model', name,
            '--model-kwargs', json.dumps(TINY), '--checkpoint_path', str(ckpts[name, g]),
            '--coarse-stage-size', str(g), '--num-workers', '0', '--output-dir', str(out), *extra]
    return dynamic_inference.main(argv), out


def reference(setup, name, g, threshold=None):
    """Per-image outcome computed directly with the model, for comparison with the script."""
    root, data, ckpts = setup
    model = timm.create_model(name, coarse_stage_size=g, num_classes=3, **TINY)
    model.load_state_dict(torch.load(ckpts[name, g], weights_only=True)['model'])
    model.eval().set_informative_selection(True)
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(str(data / 'val'), eval_transform(model))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        out = model.forward_details(x, threshold)
    return model, out, y


@pytest.mark.parametrize('name,g', [('cf_deit_tiny', 2), ('cf_lvvit_tiny', 3)])
def test_mode0_anytime(setup, tmp_path, name, g, capsys):
    rc, out = run(setup, tmp_path, 0, name, g)
    assert rc == 0
    res = json.loads((out / 'anytime.json').read_text())
    model, ref, y = reference(setup, name, g)
    expected = [100 * ref.coarse_logits.argmax(1).eq(y).double().mean().item(),
                100 * ref.fine_logits.argmax(1).eq(y).double().mean().item()]
    assert res['images'] == 15 and res['skipped_images'] == 0
    assert res['anytime_classification'] == pytest.approx(expected)
    assert res['flop'] == pytest.approx(stage_gflops(model))
    printed = capsys.readouterr().out
    assert 'anytime_classification :' in printed and 'flops :' in printed
    assert 'the checkpoint stores flop=' in printed  # the stored [0.5, 1.0] disagrees with the count


def test_mode1_budgeted_writes_results_and_never_touches_the_input(setup, tmp_path):
    root, data, ckpts = setup
    before = ckpts['cf_deit_tiny', 2].read_bytes()
    rc, out = run(setup, tmp_path, 'budgeted', 'cf_deit_tiny', 2, '--write-checkpoint')
    assert rc == 0
    assert ckpts['cf_deit_tiny', 2].read_bytes() == before
    res = json.loads((out / 'budgeted.json').read_text())
    gflops, acc = res['budgeted_batch_classification']
    assert len(gflops) == len(acc) == 100 and res['thresholds'][:2] == [0.0, 0.01]
    model, ref, y = reference(setup, 'cf_deit_tiny', 2)
    expected = sweep_from_predictions(ref.confidence, ref.coarse_logits.argmax(1).eq(y),
                                      ref.fine_logits.argmax(1).eq(y), res['flop'])
    assert acc == pytest.approx(expected[1]) and gflops == pytest.approx(expected[0])
    png = out / 'budgeted_batch_classification.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert Image.open(png).size == (720, 600)
    written = out / 'cf_deit_tiny_2_with_results.pth'
    ck = torch.load(written, weights_only=True)
    assert ck['budgeted_batch_classification'] == [gflops, acc]
    assert ck['anytime_classification'] == res['anytime_classification']
    assert torch.equal(ck['model']['head.weight'], torch.load(ckpts['cf_deit_tiny', 2], weights_only=True)['model']['head.weight'])
    # mode 3 reads it back
    rc, out3 = run(setup, tmp_path / 'r', 3, 'cf_deit_tiny', 2)
    assert rc == 0


@pytest.mark.parametrize('batch', ['4', '1'])
def test_mode2_throughput(setup, tmp_path, batch):
    model, ref, y = reference(setup, 'cf_deit_tiny', 3)
    # halfway between two neighbouring confidences: a threshold equal to one image's confidence
    # would make its exit depend on the last bit, which differs between batch sizes on some CPUs
    c = ref.confidence.sort().values
    threshold = float((c[7] + c[8]) / 2)
    root, data, ckpts = setup
    out = tmp_path / 'out'
    rc = dynamic_inference.main([
        '--eval-mode', 'throughput', '--data-url', str(data), '--batch-size', batch, '--model', 'cf_deit_tiny',
        '--model-kwargs', json.dumps(TINY), '--checkpoint-path', str(ckpts['cf_deit_tiny', 3]),
        '--coarse-stage-size', '3', '--num-workers', '0', '--output-dir', str(out), '--threshold', str(threshold)])
    assert rc == 0
    res = json.loads((out / 'throughput.json').read_text())
    _, ref, y = reference(setup, 'cf_deit_tiny', 3, threshold)
    assert res['images'] == 15
    assert res['timed_images'] == 15 - 2 * int(batch)  # two warm-up batches excluded
    assert res['exit_share'] == pytest.approx(ref.exited.double().mean().item())
    assert res['top1'] == pytest.approx(100 * ref.fine_logits.argmax(1).eq(y).double().mean().item())
    assert res['average_gflops'] == pytest.approx(
        res['exit_share'] * res['flop'][0] + (1 - res['exit_share']) * res['flop'][1])
    assert res['throughput'] == pytest.approx(res['timed_images'] / res['seconds'])


def test_mode2_compiled_gives_the_same_predictions(setup, tmp_path, monkeypatch):
    """--compile runs the compiled stages (torch.compile's 'eager' backend here, no C++ build)."""
    calls = []
    real = torch.compile

    def eager_compile(fn, **kwargs):
        calls.append(getattr(fn, '__name__', fn))
        return real(fn, **dict(kwargs, backend='eager'))
    monkeypatch.setattr(torch, 'compile', eager_compile)
    root, data, ckpts = setup
    argv = ['--eval-mode', '2', '--data-url', str(data), '--batch-size', '4', '--model', 'cf_deit_tiny',
            '--model-kwargs', json.dumps(TINY), '--checkpoint-path', str(ckpts['cf_deit_tiny', 3]),
            '--coarse-stage-size', '3', '--num-workers', '0', '--threshold', '0.4']
    assert dynamic_inference.main(argv + ['--output-dir', str(tmp_path / 'eager')]) == 0
    assert calls == []
    assert dynamic_inference.main(argv + ['--compile', '--output-dir', str(tmp_path / 'compiled')]) == 0
    assert calls == ['forward_coarse', 'forward_fine']
    eager, compiled = (json.loads((tmp_path / d / 'throughput.json').read_text()) for d in ('eager', 'compiled'))
    for key in ('images', 'top1', 'top5', 'exit_share', 'average_gflops'):
        assert compiled[key] == eager[key], key


def test_mode3_report_of_a_released_checkpoint(tmp_path, capsys):
    path = REPO_GOLDEN_DIR / 'deit_c7_synthetic_checkpoint.pth'
    rc = dynamic_inference.main(['--eval-mode', '3', '--checkpoint_path', str(path), '--output-dir', str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    # printed as modes 0 and 1 print theirs; the JSON keeps the stored values
    assert 'flop : [0.02158, 0.08995]' in printed
    assert 'anytime_classification : [40.50, 80.50]' in printed
    assert '..., 75.50, 77.00, 79.50]]' in printed
    assert (tmp_path / 'budgeted_batch_classification.png').exists()
    res = json.loads((tmp_path / 'checkpoint_results.json').read_text())
    assert len(res['budgeted_batch_classification'][0]) == 100
    assert res['flop'] == [0.021575616, 0.089947776] and res['anytime_classification'] == [40.5, 80.5]


# ------------------------------------------------------------------------------ bad input
def _error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith('dynamic_inference.py: error: ')
    return err[-1]


def test_bad_inputs(setup, tmp_path, capsys):
    root, data, ckpts = setup
    base = ['--batch_size', '4', '--model', 'cf_deit_tiny', '--model-kwargs', json.dumps(TINY),
            '--coarse-stage-size', '2', '--num-workers', '0', '--output-dir', str(tmp_path / 'o')]
    ck = ['--checkpoint_path', str(ckpts['cf_deit_tiny', 2])]

    assert dynamic_inference.main(['--eval-mode', '0', '--data_url', str(tmp_path / 'nope'), *ck, *base]) == 2
    assert 'dataset folder not found' in _error(capsys)
    (tmp_path / 'noval').mkdir()
    assert dynamic_inference.main(['--eval-mode', '0', '--data_url', str(tmp_path / 'noval'), *ck, *base]) == 2
    assert 'no val/ folder' in _error(capsys)
    (tmp_path / 'empty' / 'val').mkdir(parents=True)
    assert dynamic_inference.main(['--eval-mode', '0', '--data_url', str(tmp_path / 'empty'), *ck, *base]) == 2
    assert 'no images in' in _error(capsys)
    assert dynamic_inference.main(['--eval-mode', '0', '--data_url', str(data),
                                   '--checkpoint_path', str(tmp_path / 'missing.pth'), *base]) == 2
    assert 'checkpoint not found' in _error(capsys)
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(ckpts['cf_deit_tiny', 2].read_bytes()[:1000])
    assert dynamic_inference.main(['--eval-mode', '0', '--data_url', str(data), '--checkpoint_path', str(bad), *base]) == 2
    assert 'truncated or not a PyTorch checkpoint' in _error(capsys)
    other = ['--checkpoint_path', str(ckpts['cf_lvvit_tiny', 2])]
    assert dynamic_inference.main(['--eval-mode', '0', '--data_url', str(data), *other, *base]) == 2
    msg = _error(capsys)
    assert 'does not fit cf_deit_tiny' in msg and 'missing keys: blocks.0.attn.qkv.bias' in msg
    assert 'unexpected keys: patch_embed.conv1.weight' in msg
    with pytest.raises(SystemExit) as e:  # checked by argparse
        dynamic_inference.main(['--eval-mode', '2', '--threshold', '1.5', '--data_url', str(data), *ck, *base])
    assert e.value.code == 2 and 'argument --threshold: must be in [0, 1], got 1.5' in capsys.readouterr().err
    wrong_grid = [a if a != '2' else '3' for a in base]
    assert dynamic_inference.main(['--eval-mode', '0', '--data_url', str(data), *ck, *wrong_grid]) == 2
    assert 'pos_embed_list.0' in _error(capsys)
    four = tmp_path / 'four'
    _write_folder(four, classes=4, per_class=1)
    assert dynamic_inference.main(['--eval-mode', '0', '--data_url', str(four), *ck, *base]) == 2
    assert 'has 4 classes but the checkpoint head has 3' in _error(capsys)
    with pytest.raises(SystemExit) as e:
        dynamic_inference.main(['--eval-mode', '0', '--model', 'resnet50', *ck])
    assert e.value.code == 2 and "invalid choice: 'resnet50'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dynamic_inference.main(['--eval-mode', 'fastest', *ck])
    assert "unknown eval mode 'fastest'" in capsys.readouterr().err
    bare = tmp_path / 'bare.pth'
    torch.save(torch.load(ckpts['cf_deit_tiny', 2], weights_only=True)['model'], bare)
    assert dynamic_inference.main(['--eval-mode', '3', '--checkpoint_path', str(bare), '--output-dir', str(tmp_path / 'o3')]) == 2
    assert 'stores no evaluation results' in _error(capsys)


def test_unreadable_images_are_skipped_and_counted(setup, tmp_path, capsys):
    root, data, ckpts = setup
    broken = tmp_path / 'broken'
    _write_folder(broken, classes=3, per_class=2)
    (broken / 'val' / 'class0' / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really')
    Image.new('L', (50, 60), 128).save(broken / 'val' / 'class1' / 'gray.png')
    Image.new('RGBA', (50, 60)).save(broken / 'val' / 'class1' / 'rgba.png')
    Image.new('CMYK', (50, 60)).save(broken / 'val' / 'class2' / 'cmyk.jpg')
    rc = dynamic_inference.main([
        '--eval-mode', '0', '--data_url', str(broken), '--batch_size', '1', '--model', 'cf_deit_tiny',
        '--model-kwargs', json.dumps(TINY), '--checkpoint_path', str(ckpts['cf_deit_tiny', 2]),
        '--coarse-stage-size', '2', '--num-workers', '0', '--output-dir', str(tmp_path / 'o')])
    assert rc == 0
    res = json.loads((tmp_path / 'o' / 'anytime.json').read_text())
    assert res['images'] == 9 and res['skipped_images'] == 1
    assert '1 unreadable images were skipped' in capsys.readouterr().out
