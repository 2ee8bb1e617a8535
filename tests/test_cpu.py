"""utils.inference.cpu (bfloat16 detection, weights cast once, the allocator), the inference script's use of
it, onnxruntime's session options, and the side-by-side benchmark's own logic."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import models  # noqa: F401
from helpers import ROOT
from utils.common.precision import resolve_amp_dtype
from utils.inference import cpu

sys.path.insert(0, str(ROOT / 'benchmarks'))
import bench_vs_release as bench  # noqa: E402

TINY = {'embed_dim': 48, 'depth': 4, 'num_heads': 3}


def tiny_model(seed=0, name='cf_deit_tiny', **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, coarse_stage_size=3, num_classes=5, **dict(TINY, **kwargs)).eval()
    with torch.no_grad():
        model.head.weight.mul_(30)  # spread the confidences, so that a threshold splits the batch
    return model


# ------------------------------------------------------------------------------ weights cast once
@pytest.mark.parametrize('name', ['cf_deit_tiny', 'cf_lvvit_tiny'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_cast_weights_give_the_same_outputs_under_autocast_bit_for_bit(name, dtype):
    model, cast = tiny_model(name=name), tiny_model(name=name)
    assert cpu.cast_weights_for_autocast(cast, dtype) is cast
    x = torch.randn(6, 3, *(model.img_size_list[1],) * 2, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), torch.autocast('cpu', dtype=dtype):
        conf = model.forward_details(x, 0.0).confidence
        threshold = float(conf.median())  # half of the rows go on to the fine stage
        ref, got = model.forward_details(x, threshold), cast.forward_details(x, threshold)
    assert 0 < int(ref.exited.sum()) < 6
    for field in ('coarse_logits', 'fine_logits', 'confidence', 'cls_attn', 'exited', 'important_coarse_index'):
        a, b = getattr(ref, field), getattr(got, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field


def test_cast_weights_touch_only_the_layers_autocast_casts():
    model = cpu.cast_weights_for_autocast(tiny_model(), torch.bfloat16)
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.blocks[0].mlp.fc2.bias.dtype == torch.bfloat16
    assert model.patch_embed.proj.weight.dtype == torch.bfloat16
    assert model.head.weight.dtype == torch.bfloat16
    for p in (model.norm.weight, model.blocks[0].norm1.bias, model.cls_token, model.pos_embed_list[0],
              model.reuse_block[0].weight):
        assert p.dtype == torch.float32
    with pytest.raises(ValueError, match='bfloat16 or float16, not torch.float32'):
        cpu.cast_weights_for_autocast(tiny_model(), torch.float32)


# ------------------------------------------------------------------------------ choosing the dtype
def test_resolve_amp_dtype(monkeypatch):
    cpu_dev, cuda_dev = torch.device('cpu'), torch.device('cuda')
    never = lambda: pytest.fail('measured although the dtype was named')  # noqa: E731
    assert resolve_amp_dtype('none', cpu_dev, cpu_bf16_pays=never) is None
    assert resolve_amp_dtype('float32', cpu_dev, cpu_bf16_pays=never) is None
    assert resolve_amp_dtype('bfloat16', cpu_dev, cpu_bf16_pays=never) is torch.bfloat16
    assert resolve_amp_dtype('auto', cuda_dev, cpu_bf16_pays=never) is torch.float16
    monkeypatch.setattr(cpu, 'cpu_bf16_native', lambda: False)
    monkeypatch.setattr(cpu, 'bf16_speedup', lambda: 3.0)
    assert resolve_amp_dtype('auto', cpu_dev, cpu_bf16_pays=cpu.bf16_pays) is None  # emulated: never, however it measured
    monkeypatch.setattr(cpu, 'cpu_bf16_native', lambda: True)
    assert resolve_amp_dtype('auto', cpu_dev, cpu_bf16_pays=cpu.bf16_pays) is torch.bfloat16
    monkeypatch.setattr(cpu, 'bf16_speedup', lambda: 1.1)  # native but not faster here
    assert resolve_amp_dtype('auto', cpu_dev, cpu_bf16_pays=cpu.bf16_pays) is None
    with pytest.raises(ValueError, match="unknown autocast dtype 'int8'"):
        resolve_amp_dtype('int8', cpu_dev, cpu_bf16_pays=never)


def test_bf16_native_needs_the_flag(monkeypatch):
    monkeypatch.setattr(cpu, 'cpu_flags', lambda: ('avx2', 'fma'))
    assert cpu.cpu_bf16_native() is False
    monkeypatch.setattr(cpu, 'cpu_flags', lambda: ('avx512f', 'amx_bf16'))
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    assert cpu.cpu_bf16_native() is onednn


def test_bf16_speedup_is_a_positive_ratio():
    assert 0.0 < cpu.bf16_speedup(tokens=8, dim=16, reps=1) < 1000.0


# ------------------------------------------------------------------------------ the allocator
def test_keep_freed_memory_on_glibc():
    """In a fresh process (the setting lasts for a process's lifetime): glibc accepts the values."""
    if not Path('/proc/self/maps').exists() or 'libc.so.6' not in Path('/proc/self/maps').read_text():
        pytest.skip('not a glibc process')
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from utils.inference.cpu import keep_freed_memory
        print(keep_freed_memory())
    """)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'True'


# ------------------------------------------------------------------------------ dynamic_inference.py
@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp('cpu')
    for c in range(5):
        d = root / 'data' / 'val' / f'class{c}'
        d.mkdir(parents=True)
        for i in range(2):
            Image.new('RGB', (40, 40), (40 * c, 20 * i, 100)).save(d / f'{i}.png')
    path = root / 'tiny.pth'
    torch.save({'model': tiny_model().state_dict()}, path)
    return root, path


def run_script(checkpoint, tmp_path, *extra):
    import dynamic_inference
    root, path = checkpoint
    out = tmp_path / 'out'
    argv = ['--eval-mode', '0', '--data-path', str(root / 'data'), '--batch-size', '4', '--model', 'cf_deit_tiny',
            '--model-kwargs', json.dumps(dict(TINY, num_classes=5)), '--checkpoint-path', str(path),
            '--coarse-stage-size', '3', '--num-workers', '0', '--output-dir', str(out), *extra]
    return dynamic_inference.main(argv), out


def test_inference_script_bf16_equals_plain_autocast(checkpoint, tmp_path, capsys, monkeypatch):
    """--amp-dtype bfloat16 casts the weights once; the accuracies equal those of autocast on the
    float32 model (computed here directly), and auto says what it chose."""
    rc, out = run_script(checkpoint, tmp_path, '--amp-dtype', 'bfloat16', '--allocator', 'system',
                         '--batch-size', '10')  # one batch, as the reference below
    assert rc == 0
    res = json.loads((out / 'anytime.json').read_text())
    assert res['autocast'] == 'bfloat16' and res['allocator'] == 'system'
    from torchvision.datasets import ImageFolder
    from datasets import eval_transform
    model = tiny_model()
    ds = ImageFolder(str(checkpoint[0] / 'data' / 'val'), eval_transform(model))
    x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        ref = model.forward_details(x)
    expected = [100 * ref.coarse_logits.argmax(1).eq(y).double().mean().item(),
                100 * ref.fine_logits.argmax(1).eq(y).double().mean().item()]
    assert res['anytime_classification'] == pytest.approx(expected)

    monkeypatch.setattr(cpu, 'cpu_bf16_native', lambda: False)
    capsys.readouterr()
    rc, out = run_script(checkpoint, tmp_path / 'auto', '--amp-dtype', 'auto')
    assert rc == 0
    assert '--amp-dtype auto: float32 (no autocast) on cpu' in capsys.readouterr().out
    res = json.loads((out / 'anytime.json').read_text())
    assert res['autocast'] is None and res['amp_dtype'] == 'auto' and res['allocator'] == 'keep-freed'


def test_onnx_sessions_stop_spinning_after_each_run(tmp_path):
    from utils.inference.onnx_export import export_graph
    from utils.inference.onnx_runtime import make_session
    path = tmp_path / 'lin.onnx'
    path.write_bytes(export_graph(torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),), ['x'], ['y'], 'torchscript'))
    session = make_session(path, threads=2)
    assert session.get_session_options().get_session_config_entry('session.force_spinning_stop') == '1'


# ------------------------------------------------------------------------------ benchmark 7's logic
def test_threshold_for_gives_each_share():
    conf = torch.tensor([0.1, 0.7, 0.3, 0.9, 0.5, 0.2])
    for share, n_exit in ((100, 6), (50, 3), (0, 0), (33.4, 2)):
        t = bench.threshold_for(conf, share)
        assert int((conf >= t).sum()) == n_exit, share
    assert bench.threshold_for(conf, 0) > 1.0 and bench.threshold_for(conf, 100) == 0.0


def test_program_names():
    assert bench.split_program('ours-bf16+keep-freed') == ('ours-bf16', True)
    assert bench.split_program('release') == ('release', False)
    for bad in ('theirs', 'ours+fast', 'ours+keep-freed+keep-freed'):
        with pytest.raises(Exception, match='unknown program'):
            bench.split_program(bad)


def test_release_dir_must_be_a_checkout(tmp_path):
    (tmp_path / 'deit').mkdir()
    with pytest.raises(SystemExit, match='not a checkout of the released code: no utils.py'):
        bench.load_release_model(tmp_path, tmp_path / 'none.pth')


def test_benchmark_runs_our_programs_without_the_release(tmp_path):
    """The whole benchmark on one tiny configuration, our programs only (the release is not in
    this repository), results into a temporary folder: the exit share each program counted from
    its own confidences, and no ratio where the release did not run."""
    import os
    name = 'test_vs_release_smoke'
    out = subprocess.run(
        [sys.executable, str(ROOT / 'benchmarks' / 'bench_vs_release.py'), '--programs', 'ours', 'ours-bf16',
         '--batches', '2', '--exit-shares', '50', '--threads', '1', '--rounds', '1', '--images', '4',
         '--pool-size', '4', '--name', name],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=dict(os.environ, CFVIT_BENCH_RESULTS=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / f'{name}.json').read_text())
    (row,) = res['rows']
    assert (row['threads'], row['batch'], row['exit_share'], row['rounds']) == (1, 2, 50.0, 1)
    for prog in ('ours', 'ours-bf16'):
        assert row[prog]['exited'] == 2 and row[prog]['images'] == 4 and row[prog]['img_per_s'] > 0
        assert len(row[prog]['runs']) == 1 and 'vs_release' not in row[prog]
    assert res['machine']['bf16_native'] in (True, False) and res['machine']['bf16_mlp_speedup'] > 0
    assert 'threads 1 batch   2 exit  50.0%: ours' in out.stdout
    assert not (ROOT / 'benchmarks' / 'results' / f'{name}.json').exists()


def test_benchmark_refuses_bad_flags(tmp_path):
    script = str(ROOT / 'benchmarks' / 'bench_vs_release.py')
    for argv, message in ((['--programs', 'release'], '--release DIR is needed'),
                          (['--programs', 'ours', 'ours'], 'names a program twice'),
                          (['--programs', 'ours', '--exit-shares', '120'], 'percentages in [0, 100]'),
                          (['--programs', 'ours', '--batches', '0'], '--batches must be positive'),
                          (['--programs', 'theirs'], 'unknown program'),
                          (['--release', str(tmp_path)], 'is not a checkout of github.com/ChenMnZ/CF-ViT: no utils.py')):
        out = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 2 and message in out.stderr, (argv, out.stderr[-500:])


def test_benchmarks_md_is_generated_from_the_committed_results():
    """BENCHMARKS.md must be what benchmarks/report.py makes of benchmarks/results/: after a
    benchmark run writes there, regenerate it with `python benchmarks/report.py` (or point
    CFVIT_BENCH_RESULTS elsewhere for runs not meant for BENCHMARKS.md)."""
    import os
    if os.environ.get('CFVIT_BENCH_RESULTS'):
        pytest.skip('CFVIT_BENCH_RESULTS points the benchmarks elsewhere')
    import report
    assert (ROOT / 'BENCHMARKS.md').read_text() == report.render()


def test_pages_quote_the_committed_tradeoff_verdict():
    """README.md and docs/tradeoff.md quote benchmark 9's verdict between markers that benchmarks/report.py
    rewrites from benchmarks/results/tradeoff.json: never a number typed by hand."""
    import os
    if os.environ.get('CFVIT_BENCH_RESULTS'):
        pytest.skip('CFVIT_BENCH_RESULTS points the benchmarks elsewhere')
    import report
    summary = report.tradeoff_summary(report.load(report.TRADEOFF_RUN))
    for page in report.SUMMARY_PAGES:
        text = (ROOT / page).read_text()
        assert text.count(report.SUMMARY_START) == 1 and text.count(report.SUMMARY_END) == 1, page
        assert report.replace_summary(text, summary) == text, f'{page}: run python benchmarks/report.py'


def test_model_kwargs_may_repeat_what_the_checkpoint_fixes_but_not_contradict_it(checkpoint, tmp_path, capsys):
    """--model-kwargs num_classes=5 for a 5-class head is fine; num_classes=7 is one line, exit 2."""
    import dynamic_inference
    root, path = checkpoint
    argv = ['--eval-mode', '0', '--data-path', str(root / 'data'), '--model', 'cf_deit_tiny', '--checkpoint-path',
            str(path), '--coarse-stage-size', '3', '--num-workers', '0']
    kw = dict(TINY, num_classes=7)
    assert dynamic_inference.main(argv + ['--model-kwargs', json.dumps(kw), '--output-dir', str(tmp_path / 'a')]) == 2
    assert ('--model-kwargs num_classes=7 (given, or recorded in the checkpoint) contradicts the run (num_classes=5'
            in capsys.readouterr().err)
