"""Hostile inputs, round 3: links, named pipes, special file systems, crafted structured files,
impossible environments, and outputs that would land on inputs.

Every input is created for real (symbolic links, FIFOs, a folder linked to /proc, a pickle of a list
nested 200,000 deep, a bound on memory) and every test checks that the inputs' digests are unchanged
afterwards, as the other safety tests do. Scripts run in this process on tiny models; a SIGALRM
guard turns a hang into a failure instead of a stuck suite.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest
import timm
import torch

import dynamic_inference
import main_deit
import visualize
from helpers import make_image_folder, one_line_error, run_main, script_env, tree_digest

pytestmark = pytest.mark.usefixtures('one_thread', 'own_logging')

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES, G = 3, 2
ARCH = dict(embed_dim=48, depth=2, num_heads=3)
EVAL_ARCH = ['--model', 'cf_deit_tiny', '--coarse-stage-size', str(G), '--model-kwargs',
             *[f'{k}={v}' for k, v in ARCH.items()]]
TRAIN = ['--model', 'cf_deit_tiny', '--embed-dim', '48', '--depth', '2', '--num-heads', '3', '--coarse-stage-size',
         str(G), '--device', 'cpu', '--no-amp', '--num_workers', '0', '--batch-size', '2', '--epochs', '1',
         '--warmup-epochs', '0', '--lr', '1e-3', '--print-freq', '1000', '--seed', '0', '--no-repeated-aug',
         '--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--no-model-ema']


@pytest.fixture(scope='module')
def inputs(tmp_path_factory) -> Dict[str, Path]:
    """Read-only inputs: a tiny dataset, a released-layout checkpoint and a file that must never change."""
    root = tmp_path_factory.mktemp('inputs')
    data = make_image_folder(root / 'data', {'train': 2, 'val': 2}, NUM_CLASSES)
    torch.manual_seed(0)
    model = timm.create_model('cf_deit_tiny', coarse_stage_size=G, num_classes=NUM_CLASSES, **ARCH)
    torch.save({'model': model.state_dict()}, root / 'released.pth')
    (root / 'victim.txt').write_text('a file of the user that no run may touch\n')
    return {'root': root, 'data': data, 'ckpt': root / 'released.pth', 'victim': root / 'victim.txt'}


@pytest.fixture(autouse=True)
def untouched_inputs(inputs):
    """No test may modify, create or delete a file among the inputs; no test may hang (SIGALRM)."""
    before = tree_digest(inputs['root'])

    def hang(signum, frame):
        raise TimeoutError('the run hung')
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert tree_digest(inputs['root']) == before


run = run_main  # every script's main in-process: (exit status, output)


def evaluate(inputs, out: Path, *extra) -> List:
    return ['--eval-mode', '0', '--data_url', inputs['data'], '--checkpoint_path', inputs['ckpt'], *EVAL_ARCH,
            '--num-workers', '0', '--output-dir', out, *extra]


# --------------------------------------------------------------------- fixed names in output folders
def test_a_linked_run_lock_is_refused_and_its_target_untouched(inputs, tmp_path, capsys, caplog):
    out = tmp_path / 'out'
    out.mkdir()
    (out / '.cfvit-run.lock').symlink_to(inputs['victim'])
    code, text = run(dynamic_inference, evaluate(inputs, out), capsys, caplog)
    one_line_error(code, text, 'is a symbolic link: refused')
    assert (out / '.cfvit-run.lock').is_symlink()


def test_a_planted_write_probe_link_is_never_written_through(inputs, tmp_path, capsys, caplog):
    out = tmp_path / 'out'
    out.mkdir()
    for name in ('.write_test', '.write-test'):  # the names the probes had
        (out / name).symlink_to(inputs['victim'])
    code, text = run(dynamic_inference, evaluate(inputs, out), capsys, caplog)
    assert code == 0, text[-3000:]
    assert json.loads((out / 'anytime.json').read_text())['images'] == NUM_CLASSES * 2


@pytest.mark.parametrize('kind', ['fifo', 'link'])
def test_a_log_that_is_a_pipe_or_a_link_is_refused_before_training(inputs, tmp_path, capsys, caplog, kind):
    out = tmp_path / 'out'
    out.mkdir()
    if kind == 'fifo':
        os.mkfifo(out / 'log.txt')
    else:
        (out / 'log.txt').symlink_to(inputs['victim'])
    code, text = run(main_deit, [*TRAIN, '--data-path', inputs['data'], '--output', out], capsys, caplog)
    one_line_error(code, text, 'log.txt in the output folder is a ' + ('named pipe' if kind == 'fifo' else
                                                                       'symbolic link'))
    assert not (out / 'checkpoint.pth').exists()


def test_finetuning_from_a_file_the_run_writes_is_refused(inputs, tmp_path, capsys, caplog):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'checkpoint.pth').write_bytes(inputs['ckpt'].read_bytes())
    before = tree_digest(out)
    code, text = run(main_deit, [*TRAIN, '--data-path', inputs['data'], '--output', out, '--finetune',
                                 out / 'checkpoint.pth'], capsys, caplog)
    one_line_error(code, text, 'the run would replace its own input')
    assert {k: v for k, v in tree_digest(out).items() if 'checkpoint.pth' in k} == before


def test_visualize_never_replaces_its_input_image(inputs, tmp_path, capsys, caplog):
    out = tmp_path / 'out'
    out.mkdir()
    image = out / 'confidence_histogram.png'
    image.write_bytes((inputs['data'] / 'val' / 'class0' / '0.png').read_bytes())
    before = tree_digest(out)
    code, text = run(visualize, ['--img-path', image, '--resume', inputs['ckpt'], *EVAL_ARCH, '--num-workers', '0',
                                 '--no-progress', '--output-dir', out], capsys, caplog)
    one_line_error(code, text, 'the run would replace its own input')
    assert tree_digest(out) == before


def test_dynamic_inference_never_writes_its_results_over_its_checkpoint(inputs, tmp_path, capsys, caplog):
    out = tmp_path / 'out'
    out.mkdir()
    ckpt = out / 'anytime.json'  # a checkpoint under the name of mode 0's result
    ckpt.write_bytes(inputs['ckpt'].read_bytes())
    before = tree_digest(ckpt)
    code, text = run(dynamic_inference, ['--eval-mode', '0', '--data_url', inputs['data'],
                                         '--checkpoint_path', ckpt, *EVAL_ARCH, '--num-workers', '0', '--output-dir',
                                         out], capsys, caplog)
    one_line_error(code, text, 'the run would replace its own input')
    assert tree_digest(ckpt) == before


# --------------------------------------------------------------------------------------- ONNX exports
@pytest.fixture(scope='module')
def exports(tmp_path_factory) -> Dict[str, Path]:
    """Two exports of tiny models of different widths (torchscript exporter: fast)."""
    import models  # noqa: F401
    from utils.inference.onnx_export import export_early_exit
    root = tmp_path_factory.mktemp('exports')
    out = {}
    for name, width in (('a', 48), ('b', 24)):
        torch.manual_seed(0)
        model = timm.create_model('cf_deit_tiny', coarse_stage_size=G, num_classes=NUM_CLASSES, embed_dim=width,
                                  depth=2, num_heads=3)
        export_early_exit(model, root / name, exporter='torchscript')
        out[name] = root / name
    return out


def _copy_export(src: Path, dst: Path, change=None) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if change is not None:
        manifest = json.loads((dst / 'manifest.json').read_text())
        change(manifest)
        (dst / 'manifest.json').write_text(json.dumps(manifest))
    return dst


def test_hostile_export_manifests_are_refused_in_one_line(exports, inputs, tmp_path, capsys, caplog):
    from utils.inference.onnx_runtime import ExportFolderError, OnnxEarlyExit
    a = exports['a']
    fifo = _copy_export(a, tmp_path / 'fifo')
    (fifo / 'manifest.json').unlink()
    os.mkfifo(fifo / 'manifest.json')  # read without a writer: would block forever
    zero = _copy_export(a, tmp_path / 'zero')
    (zero / 'manifest.json').unlink()
    (zero / 'manifest.json').symlink_to('/dev/zero')  # would read until memory runs out
    deep = _copy_export(a, tmp_path / 'deep')
    (deep / 'manifest.json').write_text('[' * 100_000 + ']' * 100_000)
    huge = _copy_export(a, tmp_path / 'huge')
    os.truncate(huge / 'manifest.json', 64 << 20)  # sparse: refused by its size, never read
    cases = {
        fifo: 'is a named pipe', zero: 'is a character device', deep: 'nested deeper', huge: 'larger than 1048576 bytes',
        _copy_export(a, tmp_path / 'missing', lambda m: m.pop('num_classes')): 'lacks num_classes',
        _copy_export(a, tmp_path / 'mistyped', lambda m: m.update(num_classes='3')): 'num_classes is',
        _copy_export(a, tmp_path / 'gflops', lambda m: m.update(gflops=[0.1])): 'gflops must be two',
        _copy_export(a, tmp_path / 'std', lambda m: m['data_config'].update(std=[0.2, 0.0, 0.2])): 'std must be positive',
    }
    b_fine = json.loads((exports['b'] / 'manifest.json').read_text())['graphs']['fine']
    mixed = _copy_export(a, tmp_path / 'mixed', lambda m: m['graphs'].update(fine=b_fine))
    (mixed / 'fine.onnx').write_bytes((exports['b'] / 'fine.onnx').read_bytes())
    cases[mixed] = 'graphs of two different models'
    for folder, message in cases.items():
        with pytest.raises(ExportFolderError, match=message) as info:
            OnnxEarlyExit(folder)
        assert '\n' not in str(info.value)
    # through the script: one line, exit 2
    code, text = run(dynamic_inference, ['--backend', 'onnxruntime', fifo, '--eval-mode', '0', '--data_url',
                                         inputs['data'], '--num-workers', '0', '--output-dir', tmp_path / 'o'],
                     capsys, caplog)
    one_line_error(code, text, 'is a named pipe')


def test_onnx_early_exit_takes_an_empty_batch_and_refuses_bytes(exports):
    from utils.inference.onnx_runtime import OnnxEarlyExit
    runtime = OnnxEarlyExit(exports['a'])
    side = runtime.img_size_list[1]
    assert runtime.forward_early_exit(torch.zeros(0, 3, side, side), 0.5).shape == (0, NUM_CLASSES)
    details = runtime.forward_details(torch.zeros(0, 3, side, side), 0.5)
    assert details.fine_logits.shape == (0, NUM_CLASSES) and details.exited.shape == (0,)
    with pytest.raises(ValueError, match='expected normalized floating-point images, got torch.uint8'):
        runtime.forward_early_exit(torch.zeros(2, 3, side, side, dtype=torch.uint8), 0.5)


def test_two_exports_into_one_folder_cannot_both_succeed(inputs, tmp_path, capsys, caplog):
    import fcntl

    import export_onnx
    out = tmp_path / 'export'
    out.mkdir()
    fd = os.open(out / '.cfvit-run.lock', os.O_RDWR | os.O_CREAT)  # another export holds the folder
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, text = run(export_onnx, ['--checkpoint_path', inputs['ckpt'], *EVAL_ARCH, '--exporter', 'torchscript',
                                       '--output-dir', out], capsys, caplog)
    finally:
        os.close(fd)
    one_line_error(code, text, 'is in use by another run')
    assert sorted(p.name for p in out.iterdir()) == ['.cfvit-run.lock']


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_export_interrupted_says_so_and_leaves_no_empty_folder(inputs, tmp_path, capsys, caplog, monkeypatch, signum):
    import export_onnx
    import utils.inference.onnx_export as onnx_export

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)  # as Ctrl-C / a scheduler would, while the graphs are being exported
        raise AssertionError('the signal did not stop the export')
    monkeypatch.setattr(onnx_export, 'export_graph', interrupted)
    out = tmp_path / 'new' / 'export'
    code, text = run(export_onnx, ['--checkpoint_path', inputs['ckpt'], *EVAL_ARCH, '--output-dir', out],
                     capsys, caplog)
    assert code == 128 + signum, text[-3000:]
    assert 'Traceback' not in text and 'export_onnx.py: interrupted' in text
    assert not (tmp_path / 'new').exists()


# ------------------------------------------------------------------------- checkpoints' extra fields
def deep_checkpoint(obj: dict, path: Path, key: str, depth: int = 200_000) -> Path:
    """``obj`` saved with ``obj[key]`` a list nested ``depth`` deep (written into the pickle directly:
    torch.save itself cannot save it)."""
    obj = dict(obj, **{key: 'ZZDEEPZZ'})
    buf = io.BytesIO()
    torch.save(obj, buf)
    placeholder = b'X\x08\x00\x00\x00ZZDEEPZZ'  # BINUNICODE of the placeholder
    nested = b']' * depth + b'G' + struct.pack('>d', 1.0) + b'a' * depth  # EMPTY_LIST x depth, a float, APPEND x depth
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith('data.pkl'):
                assert placeholder in data
                data = data.replace(placeholder, nested)
            zout.writestr(info, data)
    return path


@pytest.fixture(scope='module')
def trained(inputs, tmp_path_factory) -> Path:
    """A run folder after one epoch of 3 steps with a mid-epoch checkpoint every step (the last one: step 3)."""
    out = tmp_path_factory.mktemp('trained') / 'run'
    code = main_deit.main([str(a) for a in [*TRAIN, '--data-path', inputs['data'], '--output', out,
                                            '--save-interval-steps', '1']])
    assert code == 0
    return out


def _changed(src: Path, dst_dir: Path, change) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = torch.load(src, map_location='cpu', weights_only=False)
    change(checkpoint)
    torch.save(checkpoint, dst_dir / src.name)
    return dst_dir / src.name


def test_a_flop_list_nested_200000_deep_is_one_line(inputs, tmp_path, capsys, caplog):
    deep = deep_checkpoint(torch.load(inputs['ckpt'], weights_only=True), tmp_path / 'deep.pth', 'flop')
    code, text = run(dynamic_inference, ['--eval-mode', '3', '--checkpoint_path', deep, *EVAL_ARCH,
                                         '--output-dir', tmp_path / 'o'], capsys, caplog)
    one_line_error(code, text, 'nested deeper than')


@pytest.mark.parametrize('case', ['string', 'foreign-field', 'deep'])
def test_a_resumed_scheduler_state_of_the_wrong_shape_is_one_line(inputs, trained, tmp_path, capsys, caplog, case):
    if case == 'deep':
        ckpt = torch.load(trained / 'checkpoint.pth', map_location='cpu', weights_only=False)
        path = deep_checkpoint(ckpt, tmp_path / 'checkpoint.pth', 'lr_scheduler', 5_000)
        message = 'nested deeper than'
    else:
        def change(c):
            if case == 'string':
                c['lr_scheduler']['t_initial'] = 'ten'
            else:
                c['lr_scheduler']['param_group_field'] = 'params'  # timm would write lr values into the params
        path = _changed(trained / 'checkpoint.pth', tmp_path, change)
        message = 't_initial is' if case == 'string' else 'param_group_field is'
    code, text = run(main_deit, [*TRAIN, '--epochs', '2', '--data-path', inputs['data'], '--output', tmp_path / 'o',
                                 '--resume', path], capsys, caplog)
    one_line_error(code, text, message)


@pytest.mark.parametrize('case,message', [
    ('beyond', 'step_in_epoch is 999, but its epoch has 3 steps'),
    ('no-states', 'process_states is [], expected one state per process'),
    ('garbage-torch', 'rng of process 0: torch is'),
    ('garbage-python', 'not valid generator states'),
    ('meter', 'meter.sums of process 0'),
])
def test_a_step_checkpoint_is_checked_against_the_run(inputs, trained, tmp_path, capsys, caplog, case, message):
    def change(c):
        state = c['process_states'][0]
        if case == 'beyond':
            c['step_in_epoch'] = 999
        elif case == 'no-states':
            c['process_states'] = []
        elif case == 'garbage-torch':
            state['rng']['torch'] = torch.zeros(7, dtype=torch.uint8)
        elif case == 'garbage-python':
            version, internal, gauss = state['rng']['python']
            state['rng']['python'] = (version, (2 ** 40,) * len(internal), gauss)  # words beyond 32 bits
        else:
            state['meter']['sums'] = {'loss': 'high'}
    path = _changed(trained / 'checkpoint_step.pth', tmp_path, change)
    code, text = run(main_deit, [*TRAIN, '--epochs', '2', '--data-path', inputs['data'], '--output', tmp_path / 'o',
                                 '--resume', path], capsys, caplog)
    one_line_error(code, text, message)
    assert not (tmp_path / 'o' / 'log.txt').exists()  # nothing trained, nothing logged as trained


def test_resume_auto_skips_a_step_checkpoint_of_another_batch_size(inputs, trained, tmp_path, capsys, caplog):
    out = tmp_path / 'run'
    out.mkdir()
    for name in ('checkpoint.pth', 'checkpoint_step.pth'):
        (out / name).write_bytes((trained / name).read_bytes())
    argv = [a if prev != '--batch-size' else '3' for prev, a in zip([''] + TRAIN, TRAIN)]
    code, text = run(main_deit, [*argv, '--epochs', '2', '--data-path', inputs['data'], '--output', out,
                                 '--resume', 'auto'], capsys, caplog)
    assert code == 0, text[-3000:]
    assert 'skipping' in text and 'mid-epoch checkpoint of --batch-size 2, this run has 3' in text
    assert [r['epoch'] for r in map(json.loads, (out / 'log.txt').read_text().splitlines())] == [1]


# ------------------------------------------------------------------------------------ label maps
def test_label_maps_of_two_teachers_never_mix(inputs, tmp_path, capsys, caplog):
    import make_token_labels
    out = tmp_path / 'maps'
    teacher = ['--teacher', 'cf_deit_tiny', *EVAL_ARCH[2:], '--output', out, '-j', '0', '-b', '4']
    code, text = run(make_token_labels, [inputs['data'], '--checkpoint', inputs['ckpt'], *teacher], capsys, caplog)
    assert code == 0, text[-3000:]
    meta = json.loads((out / 'token_labels.json').read_text())
    assert meta['teacher'] == 'cf_deit_tiny' and len(meta['checkpoint_sha256']) == 64
    assert meta['map_shape'] == [2, NUM_CLASSES, 2 * G, 2 * G]
    before = tree_digest(out)
    torch.manual_seed(1)  # another teacher of the same architecture
    other = timm.create_model('cf_deit_tiny', coarse_stage_size=G, num_classes=NUM_CLASSES, **ARCH)
    torch.save({'model': other.state_dict()}, tmp_path / 'other.pth')
    code, text = run(make_token_labels, [inputs['data'], '--checkpoint', tmp_path / 'other.pth', *teacher],
                     capsys, caplog)
    one_line_error(code, text, 'holds label maps of another teacher or layout (checkpoint_sha256=')
    code, text = run(make_token_labels, [inputs['data'], '--checkpoint', inputs['ckpt'], *teacher, '--topk', '2'],
                     capsys, caplog)
    one_line_error(code, text, "holds label maps of another teacher or layout (topk=3")
    assert tree_digest(out) == before
    # the same teacher again: nothing to write, the folder unchanged
    code, text = run(make_token_labels, [inputs['data'], '--checkpoint', inputs['ckpt'], *teacher], capsys, caplog)
    assert code == 0 and 'nothing to write' in text, text[-3000:]
    assert tree_digest(out) == before


@pytest.mark.parametrize('content,message', [
    ('["class0", "class1", "class2"]', 'expected an object with classes'),
    ('{"classes": "class0"}', 'classes is'),
    ('{"classes": [[' + '[' * 50 + ']' * 50 + ']]}', 'nested deeper'),
    ('fifo', 'is a named pipe'),
])
def test_label_metadata_of_the_wrong_shape_is_one_line(inputs, tmp_path, content, message):
    from datasets.token_labels.maps import TokenLabelError, check_label_maps
    maps = tmp_path / 'maps'
    maps.mkdir()
    if content == 'fifo':
        os.mkfifo(maps / 'token_labels.json')
    else:
        (maps / 'token_labels.json').write_text(content)
    samples = [(str(inputs['data'] / 'train' / 'class0' / '0.png'), 0)]
    with pytest.raises(TokenLabelError, match=message) as info:
        check_label_maps(samples, maps, NUM_CLASSES, ['class0', 'class1', 'class2'])
    assert '\n' not in str(info.value)


# ------------------------------------------------------------------------------------ visualize
def test_a_classes_txt_at_the_dataset_root_names_classes_but_never_relabels_folders(inputs, tmp_path, capsys, caplog):
    data = tmp_path / 'data'
    (data / 'val').mkdir(parents=True)
    for c in range(NUM_CLASSES):
        (data / 'val' / f'class{c}').symlink_to(inputs['data'] / 'val' / f'class{c}')
    # listed in the reverse order, with indices: mapping folders by it would permute the labels
    (data / 'classes.txt').write_text(''.join(f'class{c}\t{NUM_CLASSES - 1 - c}\tname of {c}\n'
                                              for c in range(NUM_CLASSES)))
    code, text = run(dynamic_inference, evaluate(inputs, tmp_path / 'di'), capsys, caplog)
    assert code == 0, text[-3000:]
    coarse = json.loads((tmp_path / 'di' / 'anytime.json').read_text())['anytime_classification'][0]
    code, text = run(visualize, ['--data-path', data, '--resume', inputs['ckpt'], *EVAL_ARCH, '--num-workers', '0',
                                 '--no-progress', '--output-dir', tmp_path / 'vis'], capsys, caplog)
    assert code == 0, text[-3000:]
    summary = json.loads((tmp_path / 'vis' / 'summary.json').read_text())
    assert summary['accuracy_percent']['coarse'] == pytest.approx(coarse, abs=1e-3)


def test_visualize_refuses_what_it_sets_itself_and_huge_grids(inputs, tmp_path, capsys, caplog):
    base = ['--data-path', inputs['data'], '--resume', inputs['ckpt'], '--num-workers', '0', '--no-progress',
            '--output-dir', tmp_path / 'vis']
    code, text = run(visualize, [*base, *EVAL_ARCH, 'num_classes=5'], capsys, caplog)
    one_line_error(code, text, '--model-kwargs num_classes=5 contradicts the run (num_classes=3, coarse_stage_size=2')
    code, text = run(visualize, [*base, '--model', 'cf_deit_tiny', '--coarse-stage-size', '1000'], capsys, caplog)
    assert code == 2 and 'Traceback' not in text and 'coarse-stage-size' in text, text[-3000:]


@pytest.mark.parametrize('kind', ['fifo', 'zero', 'deep'])
def test_hostile_class_index_files_are_one_line(inputs, tmp_path, capsys, caplog, kind):
    index = tmp_path / 'classes.json'
    if kind == 'fifo':
        os.mkfifo(index)
    elif kind == 'zero':
        index.symlink_to('/dev/zero')
    else:
        index.write_text('{"0": ' + '[' * 10_000 + ']' * 10_000 + '}')
    code, text = run(visualize, ['--data-path', inputs['data'], '--resume', inputs['ckpt'], *EVAL_ARCH,
                                 '--class-index-file', index, '--num-workers', '0', '--no-progress', '--output-dir',
                                 tmp_path / 'vis'], capsys, caplog)
    one_line_error(code, text, {'fifo': 'is a named pipe', 'zero': 'is a character device',
                                'deep': 'nested deeper'}[kind])


# ------------------------------------------------------------------------------------ distributed
@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize('env,message', [
    ({'RANK': '2', 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '29500'}, 'rank 2 is not below'),
    ({'RANK': '1', 'WORLD_SIZE': '1'}, 'rank 1 is not below the world size 1'),
    ({'RANK': '0', 'WORLD_SIZE': '2', 'MASTER_PORT': '29500'}, 'MASTER_ADDR is not set'),
    ({'RANK': '0', 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': 'http'}, 'is not a port number'),
    ({'RANK': '0', 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '70000'}, 'outside 1..65535'),
    ({'RANK': '0', 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': 'BUSY'}, 'already in use'),
    ({'SLURM_PROCID': '3', 'SLURM_NTASKS': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '29500'},
     'SLURM_PROCID/SLURM_NTASKS: rank 3 is not below the world size 2'),
])
def test_impossible_distributed_environments_are_one_line_before_connecting(inputs, tmp_path, capsys, caplog,
                                                                           monkeypatch, busy_port, env, message):
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SLURM_PROCID', 'SLURM_NTASKS',
                'SLURM_LOCALID', 'TORCHELASTIC_USE_AGENT_STORE', 'TORCHELASTIC_RESTART_COUNT'):
        monkeypatch.setenv(key, '')  # recorded, so that what the set-up adds (RANK for SLURM) is removed after
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(busy_port) if value == 'BUSY' else value)
    code, text = run(main_deit, [*TRAIN, '--dist-timeout', '0.1', '--data-path', inputs['data'],
                                 '--output', tmp_path / 'o'], capsys, caplog)
    one_line_error(code, text, message)


# ------------------------------------------------------------------------------------ folder walks
def test_walks_never_enter_proc_or_links_above_their_root(inputs, tmp_path, capsys, caplog):
    from datasets.walk import walk_files
    data = tmp_path / 'data'
    for c in range(NUM_CLASSES):  # the images themselves, plus links that would multiply the tree
        (data / 'val' / f'class{c}').mkdir(parents=True)
        for f in (inputs['data'] / 'val' / f'class{c}').iterdir():
            (data / 'val' / f'class{c}' / f.name).write_bytes(f.read_bytes())
    (data / 'val' / 'class0' / 'proc').symlink_to('/proc')  # /proc/<pid>/root: the whole file system
    (data / 'val' / 'class1' / 'up').symlink_to('/')
    (data / 'val' / 'class2' / 'data').symlink_to(data)
    found = walk_files(str(data / 'val' / 'class0'))
    assert [Path(p).name for p in found.files] == ['0.png', '1.png']
    assert found.refused_dirs == [str(data / 'val' / 'class0' / 'proc')]
    proc_root = walk_files('/proc/self')  # a root on /proc itself is not entered either
    assert proc_root.files == [] and proc_root.refused_dirs == ['/proc/self']
    code, text = run(dynamic_inference, ['--eval-mode', '0', '--data_url', data, '--checkpoint_path', inputs['ckpt'],
                                         *EVAL_ARCH, '--num-workers', '0', '--output-dir', tmp_path / 'o'],
                     capsys, caplog)
    assert code == 0, text[-3000:]
    assert json.loads((tmp_path / 'o' / 'anytime.json').read_text())['images'] == NUM_CLASSES * 2


# ------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize('script,argv,message', [
    ('main_deit', ['--batch-size', '1e400'], 'argument --batch-size/--batch_size: expected a positive integer'),
    ('main_deit', ['--lr', '1e300'], 'argument --lr: must be in (0, 1000]'),
    ('main_deit', ['--model-kwargs', 'num_classes=5'], '--model-kwargs num_classes=5 contradicts the run'),
    ('dynamic_inference', ['--batch_size', str(2 ** 63)], 'must be at most 2147483647'),
    ('visualize', ['--batch-size', str(2 ** 63)], 'must be at most 2147483647'),
    ('visualize', ['--seed', str(2 ** 70)], 'argument --seed: must be at most'),
])
def test_flags_that_overflow_are_one_line(inputs, tmp_path, capsys, caplog, script, argv, message):
    out = tmp_path / 'o'
    if script == 'main_deit':
        full = [*TRAIN, '--data-path', inputs['data'], '--output', out, *argv]
        module = main_deit
    elif script == 'dynamic_inference':
        full, module = evaluate(inputs, out, *argv), dynamic_inference
    else:
        full = ['--data-path', inputs['data'], '--resume', inputs['ckpt'], *EVAL_ARCH, '--num-workers', '0',
                '--no-progress', '--output-dir', out, *argv]
        module = visualize
    code, text = run(module, full, capsys, caplog)
    one_line_error(code, text, message)
    assert not out.exists()


# ------------------------------------------------------------------------------------ quick start
def test_quickstart_output_that_is_a_file_and_a_real_dataset(inputs, tmp_path, capsys, caplog):
    import quickstart
    code, text = run(quickstart, ['--output-dir', inputs['victim']], capsys, caplog)
    one_line_error(code, text, f'cannot write to the output folder {inputs["victim"]}')
    # a dataset of its own (no object boxes): every step runs, the box statistics are skipped
    out = tmp_path / 'qs'
    code, text = run(quickstart, ['--data-path', inputs['data'], '--epochs', '1', '--batch-size', '2',
                                  '--num-workers', '0', '--output-dir', out], capsys, caplog)
    assert code == 0, text[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['selection_on_objects'] == {} and 'not measured' in text
    assert len(summary['anytime_classification']) == 2


@pytest.mark.skipif(sys.platform != 'linux', reason='a private read-only bind mount (unshare -m)')
def test_quickstart_on_a_read_only_mount_is_one_line(tmp_path):
    ro = tmp_path / 'ro'
    ro.mkdir()
    script = (f'mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} || exit 99; '
              f'exec {sys.executable} {ROOT / "quickstart.py"} --output-dir {ro / "out"}')
    try:
        res = subprocess.run(['unshare', '-m', 'sh', '-c', script], cwd=ROOT, env=script_env(), capture_output=True,
                             text=True, timeout=300)
    except FileNotFoundError:
        pytest.skip('no unshare on this machine')
    if res.returncode == 99 or 'unshare:' in res.stderr:  # not root, or mounts not allowed here
        pytest.skip(f'cannot make a private read-only mount here: {res.stderr.strip()[:200]}')
    assert res.returncode == 2, res.stderr[-3000:]
    assert 'Traceback' not in res.stderr
    assert res.stderr.strip().splitlines() == [f'quickstart.py: error: cannot write to the output folder {ro / "out"}: '
                                                'Read-only file system']
    assert list(ro.iterdir()) == []


def test_a_checkpoint_of_another_width_is_blamed_on_the_width(inputs, tmp_path, capsys, caplog):
    arch = [a if a != 'embed_dim=48' else 'embed_dim=24' for a in EVAL_ARCH]
    code, text = run(dynamic_inference, ['--eval-mode', '0', '--data_url', inputs['data'], '--checkpoint_path',
                                         inputs['ckpt'], *arch, '--num-workers', '0', '--output-dir', tmp_path / 'o'],
                     capsys, caplog)
    one_line_error(code, text, 'another size (embed_dim 48, depth')
    assert 'class count' not in text


@pytest.mark.parametrize('argv,message', [
    (['--epochs', '0'], 'argument --epochs: must be at least 1, got 0'),
    (['--num-workers', '-1'], 'argument --num-workers: must be at least 0, got -1'),
    (['--threshold', '2'], 'argument --threshold: must be in [0, 1], got 2'),
    (['--threshold', 'nan'], 'argument --threshold: must be a finite number, got nan'),
])
def test_quickstart_checks_its_own_flags_before_any_work(tmp_path, capsys, caplog, argv, message):
    """Refused by the quick start's own parser (one error line), not by a training subprocess that printed
    main_deit.py's whole usage; nothing is written."""
    import quickstart
    out = tmp_path / 'out'
    code, text = run(quickstart, ['--output-dir', out, *argv], capsys, caplog)
    one_line_error(code, text, message)
    assert 'main_deit' not in text and not out.exists()
