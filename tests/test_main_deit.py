"""main_deit.py on CPU: a tiny CF-DeiT (D=48, 4 blocks, 2x2 coarse grid -> 64 px fine images) on a
tiny ImageFolder of generated PNGs.

Most runs call ``main_deit.main(argv)`` in this process (the imports are the slow part); the
launch tests and one bad-input test run the script as a subprocess.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

import main_deit
from utils.train import setup as train_setup
import utils.train.losses
from models import CFVisionTransformer
from utils.common.checkpoint import load_checkpoint_file

from helpers import TINY_DEIT, TINY_DEIT_CLASSES, free_port, log_lines, make_image_folder, script_env

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = TINY_DEIT_CLASSES
TINY = TINY_DEIT


pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.one_thread


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory) -> Path:
    """train/ with 8 and val/ with 4 images for each of 3 classes."""
    return make_image_folder(tmp_path_factory.mktemp('imagefolder'), {'train': 8, 'val': 4}, NUM_CLASSES)


@pytest.fixture(scope='module')
def trained(image_folder, tmp_path_factory) -> Path:
    """Output folder of a one-epoch run (mixup, RandAugment, repeated augmentation, EMA: the full recipe)."""
    out = tmp_path_factory.mktemp('one_epoch')
    assert main_deit.main(TINY + ['--epochs', '1', '--data-path', str(image_folder), '--output', str(out)]) == 0
    return out


def _state_digest(state: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- one epoch
def test_one_epoch_writes_checkpoint_log_and_events(trained):
    files = sorted(p.name for p in trained.iterdir())
    assert files == ['best_checkpoint.pth', 'checkpoint.pth', 'log.txt', 'tensorboard']

    ckpt = load_checkpoint_file(trained / 'checkpoint.pth')  # weights_only, Namespace allow-listed
    assert {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args', 'fine_acc1'} <= set(ckpt)
    assert ckpt['epoch'] == 0 and ckpt['args'].model == 'cf_deit_tiny'
    assert ckpt['model']['head.weight'].shape == (NUM_CLASSES, 48)
    assert ckpt['model_ema'].keys() == ckpt['model'].keys()
    best = load_checkpoint_file(trained / 'best_checkpoint.pth')
    assert _state_digest(best['model']) == _state_digest(ckpt['model'])

    (line,) = log_lines(trained)
    assert line['epoch'] == 0 and line['informative_selection'] is False
    for key in ('train_loss', 'train_loss_fine', 'train_loss_kl', 'train_lr', 'test_coarse_acc1', 'test_fine_acc1'):
        assert np.isfinite(line[key]), key
    assert line['test_num_samples'] == 4 * NUM_CLASSES

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(trained / 'tensorboard'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'train/loss', 'train/lr', 'test/coarse_acc1', 'test/fine_acc1'} <= tags


def test_eval_resume_reports_both_stages(trained, image_folder, capsys):
    code = main_deit.main(TINY + ['--eval', '--resume', str(trained / 'checkpoint.pth'),
                                  '--data-path', str(image_folder)])
    assert code == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {'coarse_acc1', 'fine_acc1', 'num_samples'} and result['num_samples'] == 12
    assert 'coarse top-1' in err and 'fine top-1' in err


# ---------------------------------------------------------------------------------------------- resume
def test_resume_equals_uninterrupted_run(image_folder, tmp_path):
    data = ['--data-path', str(image_folder), '--epochs', '3', '--selection-start-epoch', '1']
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert main_deit.main(TINY + data + ['--output', str(full)]) == 0
    assert main_deit.main(TINY + data + ['--output', str(part), '--stop-at-epoch', '2']) == 0
    assert load_checkpoint_file(part / 'checkpoint.pth')['epoch'] == 1
    assert main_deit.main(TINY + data + ['--output', str(part), '--resume', str(part / 'checkpoint.pth')]) == 0

    a = load_checkpoint_file(full / 'checkpoint.pth')
    b = load_checkpoint_file(part / 'checkpoint.pth')
    assert a['epoch'] == b['epoch'] == 2
    for key in ('model', 'model_ema'):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=f'{key}.{name}')
    for pid, state in a['optimizer']['state'].items():
        for name, tensor in state.items():
            torch.testing.assert_close(b['optimizer']['state'][pid][name], tensor, rtol=0, atol=0)
    assert a['lr_scheduler'] == b['lr_scheduler']
    assert [r['train_loss'] for r in log_lines(full)] == [r['train_loss'] for r in log_lines(part)]


# ---------------------------------------------------------------------------------------------- selection
def test_selection_switches_after_configured_epoch(image_folder, tmp_path, monkeypatch):
    calls: List[tuple] = []
    seen: List[tuple] = []
    original_set = CFVisionTransformer.set_informative_selection
    original_fine = CFVisionTransformer.forward_fine

    def spy_set(self, enabled=True):
        calls.append((id(self), bool(enabled)))
        return original_set(self, enabled)

    def spy_fine(self, x_f, state, selection=None, rows=None, dense=False):
        out = original_fine(self, x_f, state, selection, rows, dense)
        if self.training:
            seen.append((self.informative_selection, out.tokens.shape[1]))
        return out

    monkeypatch.setattr(CFVisionTransformer, 'set_informative_selection', spy_set)
    monkeypatch.setattr(CFVisionTransformer, 'forward_fine', spy_fine)
    out = tmp_path / 'out'
    assert main_deit.main(TINY + ['--data-path', str(image_folder), '--output', str(out), '--epochs', '3',
                                  '--selection-start-epoch', '1']) == 0
    # epochs 0 and 1 (<= 1) without selection, epoch 2 with; the same for the model and its EMA
    models = sorted({m for m, _ in calls})
    assert len(models) == 2
    for m in models:
        assert [e for mm, e in calls if mm == m] == [False, False, True]
    assert [r['informative_selection'] for r in log_lines(out)] == [False, False, True]
    # fine tokens of a 2x2 coarse grid: 1 + 16 without selection, 1 + 4*2 + 2 with (k = 2)
    steps = len(seen) // 3
    assert seen[:2 * steps] == [(False, 17)] * (2 * steps)
    assert seen[2 * steps:] == [(True, 11)] * steps


# ---------------------------------------------------------------------------------------------- finetune
def test_finetune_adapts_head_and_grid(trained, image_folder, tmp_path, caplog):
    state = load_checkpoint_file(trained / 'checkpoint.pth')['model']
    state['head.weight'], state['head.bias'] = torch.zeros(5, 48), torch.zeros(5)  # another class count
    released = tmp_path / 'released.pth'
    torch.save({'model': state}, released)
    args = TINY + ['--epochs', '1', '--data-path', str(image_folder), '--finetune', str(released)]
    args[args.index('--coarse-stage-size') + 1] = '3'  # another grid: position embeddings resampled
    assert main_deit.main(args) == 0
    messages = ' '.join(r.getMessage() for r in caplog.records)
    assert 'resampled pos_embed_list.0 to the 3x3 grid' in messages
    assert 'resampled pos_embed_list.1 to the 6x6 grid' in messages
    assert 'new (randomly initialized): head.weight, head.bias' in messages


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_data_path_is_one_clear_message(tmp_path, capsys):
    assert main_deit.main(TINY + ['--data-set', 'CIFAR100', '--output', str(tmp_path / 'o')]) == main_deit.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    (line,) = [x for x in err.splitlines() if 'ERROR' in x]
    assert '--data-path' in line


def test_without_data_path_the_synthetic_set_is_used(tmp_path, monkeypatch, caplog):
    import datasets.synthetic as synthetic
    from datasets.build import resolve_data_path
    made = []
    real = synthetic.make_synthetic_dataset

    def small(root=None, **kwargs):
        made.append(real(tmp_path / 'syn', n_train=12, n_val=6))
        return made[-1]
    monkeypatch.setattr(synthetic, 'make_synthetic_dataset', small)
    import argparse
    with caplog.at_level('INFO'):
        path = resolve_data_path(argparse.Namespace(data_path=None, data_set='IMNET'))
    assert path == made[0] and (path / 'train').is_dir() and (path / 'val').is_dir()
    assert 'no --data-path given: using the built-in synthetic shapes dataset' in caplog.text


@pytest.mark.parametrize('layout', ['no_folder', 'no_val', 'empty_classes'])
def test_missing_or_empty_dataset_folders(tmp_path, caplog, layout):
    root = tmp_path / 'data'
    if layout != 'no_folder':
        (root / 'train' / 'class0').mkdir(parents=True)
    if layout == 'no_val':
        make_image_folder(root, {'train': 1}, NUM_CLASSES)
    if layout == 'empty_classes':
        (root / 'val' / 'class0').mkdir(parents=True)
    code = main_deit.main(TINY + ['--data-path', str(root)])
    assert code == main_deit.EXIT_BAD_INPUT
    assert len([r for r in caplog.records if r.levelname == 'ERROR']) == 1


def test_resume_that_does_not_fit_the_model(trained, image_folder, tmp_path, caplog):
    args = [a for a in TINY] + ['--data-path', str(image_folder), '--resume', str(trained / 'checkpoint.pth')]
    args[args.index('--depth') + 1] = '3'
    assert main_deit.main(args) == main_deit.EXIT_BAD_INPUT
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert 'does not fit' in error and 'blocks.3' in error


def test_unwritable_output_folder(image_folder, tmp_path, caplog):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    code = main_deit.main(TINY + ['--data-path', str(image_folder), '--output', str(blocker / 'out')])
    assert code == main_deit.EXIT_BAD_INPUT
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert 'cannot write to the output folder' in error


def test_non_finite_loss_stops_and_keeps_last_checkpoint(trained, image_folder, tmp_path, monkeypatch, caplog):
    out = tmp_path / 'out'
    out.mkdir()
    for name in ('checkpoint.pth', 'log.txt'):
        (out / name).write_bytes((trained / name).read_bytes())
    before = (out / 'checkpoint.pth').read_bytes()
    monkeypatch.setattr(utils.train.losses, 'coarse_fine_kl', lambda c, f: torch.tensor(float('nan')))
    code = main_deit.main(TINY + ['--data-path', str(image_folder), '--output', str(out),
                                  '--resume', str(out / 'checkpoint.pth')])
    assert code == main_deit.EXIT_FAILED
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert 'not finite' in error
    assert (out / 'checkpoint.pth').read_bytes() == before
    assert len(log_lines(out)) == 1


# ---------------------------------------------------------------------------------------------- distributed
def test_torchrun_two_processes(image_folder, tmp_path):
    out, digest = tmp_path / 'out', tmp_path / 'digest'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           'main_deit.py', *TINY, '--epochs', '2', '--selection-start-epoch', '0', '--data-path', str(image_folder),
           '--dist-eval',
           '--output', str(out), '--debug-weights-digest', str(digest)]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0 = json.loads(Path(f'{digest}.rank0.json').read_text())
    rank1 = json.loads(Path(f'{digest}.rank1.json').read_text())
    assert rank0['model'] == rank1['model'] and rank0['model_ema'] == rank1['model_ema']
    ckpt = load_checkpoint_file(out / 'checkpoint.pth')
    assert _state_digest(ckpt['model']) == rank0['model']
    # only rank 0 wrote: one log line, one event file, nothing else
    assert sorted(p.name for p in out.iterdir()) == ['best_checkpoint.pth', 'checkpoint.pth', 'log.txt',
                                                     'tensorboard']
    assert len(list((out / 'tensorboard').iterdir())) == 1
    lines = log_lines(out)
    assert [r['epoch'] for r in lines] == [0, 1]  # one line per epoch: rank 1 wrote none
    assert [r['informative_selection'] for r in lines] == [False, True]
    assert all(r['test_num_samples'] == 4 * NUM_CLASSES for r in lines)  # --dist-eval: exact shards, no padding
    assert 'distributed: 2 processes, gloo backend' in proc.stderr


def test_release_launch_form_evaluates(trained, image_folder):
    """``python -m torch.distributed.launch`` passes ``--local-rank``; --dist-eval splits the set."""
    cmd = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2', f'--master_port={free_port()}',
           'main_deit.py', *TINY, '--eval', '--resume', str(trained / 'checkpoint.pth'), '--dist-eval',
           '--data-path', str(image_folder)]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    assert result['num_samples'] == 4 * NUM_CLASSES


# ---------------------------------------------------------------------------------------------- other data sets
def test_cifar100_is_never_downloaded(tmp_path):
    from argparse import Namespace

    from datasets import DatasetError, build_dataset
    with pytest.raises(DatasetError, match='never downloaded'):
        build_dataset(True, Namespace(data_set='CIFAR100', data_path=str(tmp_path)))


def test_inat_reads_local_annotations(tmp_path):
    from argparse import Namespace

    from datasets import build_dataset
    categories = [{'id': 0, 'name': 'a', 'genus': 'g1'}, {'id': 1, 'name': 'b', 'genus': 'g1'},
                  {'id': 2, 'name': 'c', 'genus': 'g2'}]
    images = [{'id': i, 'file_name': f'train_val2018/x/{i}.jpg'} for i in range(3)]
    (tmp_path / 'train_val2018' / 'x').mkdir(parents=True)
    for i in range(3):
        Image.new('RGB', (8, 8)).save(tmp_path / 'train_val2018' / 'x' / f'{i}.jpg')
    split = {'images': images, 'annotations': [{'image_id': i, 'category_id': 2 - i} for i in range(3)]}
    for name, obj in (('categories.json', categories), ('train2018.json', split), ('val2018.json', split)):
        (tmp_path / name).write_text(json.dumps(obj))
    ds, n = build_dataset(False, Namespace(data_set='INAT', data_path=str(tmp_path), inat_category='genus'))
    assert n == 2 and len(ds) == 3
    assert [ds[i][1] for i in range(3)] == [0, 1, 1]  # genus g2 first seen -> 0


# ---------------------------------------------------------------------------------------------- units
def test_loss_is_fine_criterion_plus_detached_kl():
    from utils.train.losses import CFViTLoss
    coarse = torch.randn(4, 5, requires_grad=True)
    fine = torch.randn(4, 5, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3])
    out = CFViTLoss(torch.nn.CrossEntropyLoss())([coarse, fine], target)
    kl = torch.nn.KLDivLoss(reduction='batchmean')(coarse.log_softmax(-1), fine.detach().softmax(-1))
    torch.testing.assert_close(out['loss_kl'], kl)
    torch.testing.assert_close(out['loss'], torch.nn.functional.cross_entropy(fine, target) + kl)
    out['loss'].backward()
    torch.testing.assert_close(fine.grad, torch.autograd.grad(
        torch.nn.functional.cross_entropy(fine, target), fine)[0])  # the KL term sends nothing to the fine stage
    # LV-ViT training outputs: (cls, dense, box) tuples; the KL uses the class-token logits
    lv = CFViTLoss(lambda output, t: torch.nn.functional.cross_entropy(output[0], t))
    res = lv([(coarse, None, None), (fine, None, None)], target)
    torch.testing.assert_close(res['loss_kl'], kl)


@pytest.mark.parametrize('exempt', [False, True])
def test_weight_decay_of_position_embeddings(exempt):
    model = train_setup.build_model_from_args(main_deit.get_args_parser().parse_args(TINY), NUM_CLASSES)
    args = main_deit.get_args_parser().parse_args(TINY + (['--exempt-pos-embed-from-wd'] if exempt else []))
    optimizer = train_setup.build_optimizer(args, model, world_size=1)
    decayed = {id(p) for g in optimizer.param_groups if g['weight_decay'] > 0 for p in g['params']}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert ('pos_embed_list.0' in names) is not exempt and ('pos_embed_list.1' in names) is not exempt
    assert 'cls_token' not in names and 'blocks.0.attn.qkv.weight' in names and 'head.bias' not in names


# ---------------------------------------------------------------------------------------------- lr schedule
def _released_cosine_lr(epoch: int, base: float = 5e-4 * 1024 / 512, warmup_lr: float = 1e-6, min_lr: float = 1e-5,
                        warmup: int = 5, total: int = 300) -> float:
    """The lr the released main_deit.py trains epoch ``epoch`` with, by hand: timm's cosine-with-warm-up
    value at ``t``, where the scheduler is stepped with ``step(epoch)`` after each epoch, so epoch 0 runs at
    the initial (warm-up) lr and epoch e >= 1 at the value for t = e - 1."""
    t = max(epoch - 1, 0)
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + np.cos(np.pi * t / total))


@pytest.mark.parametrize('rule', ['epoch', 'next-epoch'])
def test_released_lr_schedule_epoch_by_epoch(rule):
    """The released command (batch 256 on 4 GPUs: lr 5e-4 scaled to 1024 images) under fit's stepping rule."""
    args = main_deit.get_args_parser().parse_args(['--sched-step', rule] if rule != 'epoch' else [])
    assert args.sched_step == 'epoch' or rule != 'epoch'  # the default is the release's
    args.lr = 5e-4 * 1024 / 512
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = train_setup.build_scheduler(args, optimizer)
    lrs = []
    for epoch in range(201):
        lrs.append(optimizer.param_groups[0]['lr'])
        train_setup.step_scheduler(scheduler, args, epoch, 0.0)
    shift = 0 if rule == 'epoch' else 1
    for epoch in [0, 1, 2, 3, 4, 5, 6, 200]:
        expected = _released_cosine_lr(epoch + shift) if epoch + shift > 0 else 1e-6
        assert lrs[epoch] == pytest.approx(expected, rel=1e-9), epoch
    if rule == 'epoch':
        assert lrs[0] == lrs[1] == pytest.approx(1e-6) and max(lrs) == lrs[6]


def test_resumed_run_keeps_the_released_lr(image_folder, tmp_path):
    """Stopped after epoch 1 and resumed: epoch 2's lr is the one the uninterrupted run used."""
    data = ['--data-path', str(image_folder), '--epochs', '4', '--warmup-epochs', '2']
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert main_deit.main(TINY + data + ['--output', str(full)]) == 0
    assert main_deit.main(TINY + data + ['--output', str(part), '--stop-at-epoch', '2']) == 0
    assert main_deit.main(TINY + data + ['--output', str(part), '--resume', str(part / 'checkpoint.pth')]) == 0
    full_lr = [r['train_lr'] for r in log_lines(full)]
    assert [r['train_lr'] for r in log_lines(part)] == full_lr
    assert full_lr[0] == full_lr[1] == pytest.approx(1e-4)  # the release's two epochs at --warmup-lr


@pytest.mark.parametrize('mode', ['norm', 'value'])
def test_gradient_clipping_of_a_training_step(mode):
    """``--clip-grad`` / ``--clip-mode``: the step clips the trainable parameters' gradients before the update."""
    from utils.train.engine import TrainStep
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    model.register_parameter('frozen', frozen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the gradients are what is checked
    step = TrainStep(model, lambda out, t: (out * 100).sum(), optimizer, clip_grad=0.5, clip_mode=mode)
    step.update(step.forward_loss(torch.randn(5, 4), None, torch.device('cpu'))[1]['loss'], num_updates=1)
    grads = torch.cat([p.grad.reshape(-1) for p in (model.weight, model.bias)])
    if mode == 'norm':
        assert abs(float(grads.norm()) - 0.5) < 1e-5
    else:
        assert float(grads.abs().max()) == pytest.approx(0.5)
    assert frozen.grad is None
    bad = TrainStep(model, lambda out, t: out.sum(), optimizer, clip_grad=0.5, clip_mode='bogus')
    with pytest.raises(ValueError, match="unknown gradient clipping mode 'bogus'"):
        bad.update(bad.forward_loss(torch.randn(5, 4), None, torch.device('cpu'))[1]['loss'], num_updates=1)
