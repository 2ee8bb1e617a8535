"""main_lvvit.py and make_token_labels.py on CPU: a tiny CF-LV-ViT (D=48, 2 blocks, 2x2 coarse
grid -> 64 px fine images), a tiny ImageFolder of generated PNGs and label maps made by the
generator from a checkpoint of a first (class-label) run.

Runs call ``main(argv)`` in this process; the two-process gloo run is a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import timm
import torch

import main_lvvit
import make_token_labels
from models.token_ops import coarse_from_fine, scatter_to_fine_grid
from utils.common.checkpoint import load_checkpoint_file
from datasets.token_labels.targets import TokenLabelTargets
from utils.train.token_label_loss import TokenLabelingLoss, soft_target_cross_entropy

from helpers import TINY_LVVIT, TINY_LVVIT_CLASSES, free_port, log_lines, make_image_folder, script_env

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = TINY_LVVIT_CLASSES
TINY = TINY_LVVIT


pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.one_thread


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory) -> Path:
    """train/ with 6 and val/ with 2 images for each of 4 classes."""
    return make_image_folder(tmp_path_factory.mktemp('imagefolder'), {'train': 6, 'val': 2}, NUM_CLASSES)


@pytest.fixture(scope='module')
def teacher_run(image_folder, tmp_path_factory) -> Path:
    """One epoch without label maps (class token only, mixup and cutmix on): the teacher's checkpoint."""
    out = tmp_path_factory.mktemp('teacher')
    assert main_lvvit.main(TINY + [str(image_folder), '--output', str(out), '--mixup', '0.8', '--cutmix', '1.0']) == 0
    return out


@pytest.fixture(scope='module')
def label_dir(teacher_run, image_folder, tmp_path_factory) -> Path:
    """Label maps of every training image, by the generator from the teacher run's checkpoint."""
    out = tmp_path_factory.mktemp('labels') / 'maps'
    code = make_token_labels.main([str(image_folder), '--checkpoint', str(teacher_run / 'checkpoint.pth'),
                                   '--output', str(out), '-j', '0', '-b', '5'])
    assert code == 0
    return out


@pytest.fixture(scope='module')
def trained(image_folder, label_dir, tmp_path_factory) -> Path:
    """One epoch with token labels, MixToken and EMA: the released recipe's flags."""
    out = tmp_path_factory.mktemp('one_epoch')
    code = main_lvvit.main(TINY + [str(image_folder), '--token-label', '--token-label-data', str(label_dir),
                                   '--model-ema', '--eval-metric', 'top1_f', '--apex-amp', '--output', str(out)])
    assert code == 0
    return out


# ---------------------------------------------------------------------------------------------- generator
def test_generator_writes_maps_and_skips_existing(label_dir, teacher_run, image_folder, caplog):
    files = sorted(label_dir.glob('*/*.pt'))
    assert len(files) == 6 * NUM_CLASSES
    assert {p.parent.name for p in files} == {f'class{c}' for c in range(NUM_CLASSES)}
    one = load_checkpoint_file(files[0])
    assert one.shape == (2, 4, 4, 4) and one.dtype == torch.float32  # K = all 4 classes, the 4x4 fine grid
    assert torch.equal(one[1], one[1].round()) and 0 <= one[1].min() and one[1].max() < NUM_CLASSES
    assert (one[0][:-1] >= one[0][1:]).all()  # top-K scores in decreasing order
    meta = json.loads((label_dir / 'token_labels.json').read_text())
    assert meta['teacher'] == 'cf_lvvit_tiny' and meta['classes'] == [f'class{c}' for c in range(NUM_CLASSES)]

    stamps = {p: p.stat().st_mtime_ns for p in files}
    files[3].unlink()
    argv = [str(image_folder), '--checkpoint', str(teacher_run / 'checkpoint.pth'), '--output', str(label_dir),
            '-j', '0']
    assert make_token_labels.main(argv) == 0
    assert load_checkpoint_file(files[3]).shape == (2, 4, 4, 4)  # the missing map, written again
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != files[3])  # others untouched
    caplog.clear()
    assert make_token_labels.main(argv) == 0
    assert 'nothing to write' in caplog.text
    assert not list(label_dir.rglob('*.tmp'))


def test_generator_refuses_a_teacher_of_another_class_count(image_folder, tmp_path, caplog):
    model = timm.create_model('cf_lvvit_tiny', coarse_stage_size=2, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    torch.save({'model': model.state_dict()}, tmp_path / 'released.pth')  # released layout: no args inside
    code = make_token_labels.main([str(image_folder), '--teacher', 'cf_lvvit_tiny', '--coarse-stage-size', '2',
                                   '--embed-dim', '48', '--depth', '2', '--num-heads', '3', '--checkpoint',
                                   str(tmp_path / 'released.pth'), '--output', str(tmp_path / 'maps'), '-j', '0'])
    assert code == make_token_labels.EXIT_BAD_INPUT
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert 'predicts 7 classes but the dataset has 4' in error


# ---------------------------------------------------------------------------------------------- training
def test_one_epoch_with_token_labels_trains_evaluates_and_checkpoints(trained):
    assert sorted(p.name for p in trained.iterdir()) == ['best_checkpoint.pth', 'checkpoint.pth', 'log.txt',
                                                         'tensorboard']
    ckpt = load_checkpoint_file(trained / 'checkpoint.pth')
    assert {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args', 'fine_acc1'} <= set(ckpt)
    assert ckpt['epoch'] == 0 and ckpt['args'].token_label and ckpt['args'].amp
    assert ckpt['model']['aux_head.weight'].shape == (NUM_CLASSES, 48)
    (line,) = log_lines(trained)
    for key in ('train_loss', 'train_loss_fine', 'train_loss_kl', 'test_fine_acc1', 'test_ema_fine_acc1'):
        assert np.isfinite(line[key]), key
    assert line['test_num_samples'] == 2 * NUM_CLASSES and line['eval_metric'] == 'top1_f'
    assert line['best_metric'] == line['test_ema_fine_acc1']  # the EMA's fine top-1 ranks epochs, as released

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(trained / 'tensorboard'))
    events.Reload()
    assert {'train/loss', 'test/fine_acc1', 'test_ema/fine_acc1'} <= set(events.Tags()['scalars'])


def test_eval_reports_both_stages(trained, image_folder, capsys):
    assert main_lvvit.main(TINY + [str(image_folder), '--eval', '--resume', str(trained / 'checkpoint.pth')]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {'coarse_acc1', 'fine_acc1', 'num_samples'} and result['num_samples'] == 2 * NUM_CLASSES


def test_resume_equals_uninterrupted_run(image_folder, label_dir, tmp_path):
    data = [str(image_folder), '--token-label', '--token-label-data', str(label_dir), '--epochs', '2',
            '--selection-start-epoch', '0', '--cutmix', '1.0', '--model-ema']
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert main_lvvit.main(TINY + data + ['--output', str(full)]) == 0
    assert main_lvvit.main(TINY + data + ['--output', str(part), '--stop-at-epoch', '1']) == 0
    assert main_lvvit.main(TINY + data + ['--output', str(part), '--resume', str(part / 'checkpoint.pth')]) == 0
    a, b = load_checkpoint_file(full / 'checkpoint.pth'), load_checkpoint_file(part / 'checkpoint.pth')
    assert a['epoch'] == b['epoch'] == 1
    for key in ('model', 'model_ema'):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=f'{key}.{name}')
    assert [r['train_loss'] for r in log_lines(full)] == [r['train_loss'] for r in log_lines(part)]
    assert [r['informative_selection'] for r in log_lines(full)] == [False, True]


def test_torchrun_two_processes_gloo(image_folder, label_dir, tmp_path):
    out, digest = tmp_path / 'out', tmp_path / 'digest'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           'main_lvvit.py', str(image_folder), *TINY, '--token-label', '--token-label-data', str(label_dir),
           '--model-ema', '--dist-eval', '--epochs', '2', '--selection-start-epoch', '0', '--output', str(out),
           '--debug-weights-digest', str(digest)]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0 = json.loads(Path(f'{digest}.rank0.json').read_text())
    rank1 = json.loads(Path(f'{digest}.rank1.json').read_text())
    assert rank0['model'] == rank1['model'] and rank0['model_ema'] == rank1['model_ema']
    assert sorted(p.name for p in out.iterdir()) == ['best_checkpoint.pth', 'checkpoint.pth', 'log.txt', 'tensorboard']
    lines = log_lines(out)  # one line per epoch: rank 1 wrote none
    assert [r['informative_selection'] for r in lines] == [False, True]
    assert all(r['test_num_samples'] == 2 * NUM_CLASSES for r in lines)  # --dist-eval: exact shards summed
    assert 'distributed: 2 processes, gloo backend' in proc.stderr


def test_released_command_line_parses():
    argv = ['PATH', '--model', 'cf_lvvit_small', '-b', '256', '--apex-amp', '--drop-path', '0.1', '--token-label',
            '--token-label-data', 'LABELS', '--model-ema', '--eval-metric', 'top1_f', '--coarse-stage-size', '9',
            '--output', 'LOG', '--local-rank=1']
    parser = main_lvvit.get_args_parser(add_help=True)
    args = parser.parse_args(argv)
    assert (args.data_dir, args.batch_size, args.amp, args.drop_path, args.token_label, args.token_label_data,
            args.model_ema, args.eval_metric, args.coarse_stage_size, args.output_dir, args.local_rank) == (
        'PATH', 256, True, 0.1, True, 'LABELS', True, 'top1_f', 9, 'LOG', 1)
    defaults = parser.parse_args(['PATH'])
    assert (defaults.lr, defaults.dense_weight, defaults.cls_weight, defaults.token_label_size, defaults.amp,
            defaults.model_ema, defaults.mixup, defaults.cutmix) == (1.6e-3, 1.0, 1.0, None, False, False, 0.0, 0.0)
    assert parser.parse_args(['PATH', '--native-amp', '-j', '3', '--local_rank', '0']).amp is True


@pytest.mark.parametrize('flags, crop, smoothing', [
    ([], 'transposed', 'unnormalized'),  # the released command trains what the release trained
    (['--token-label-crop', 'image', '--token-label-smoothing', 'normalized'], 'image', 'normalized'),
])
def test_token_label_crop_and_smoothing_switches_reach_the_batch_transform(flags, crop, smoothing):
    parser = main_lvvit.get_args_parser(add_help=True)
    args = parser.parse_args(['PATH', '--token-label', '--token-label-data', 'LABELS'] + flags)
    _, batch_transform = main_lvvit.build_objective(args, NUM_CLASSES, 4)
    assert (batch_transform.crop, batch_transform.smoothing_mode, batch_transform.smoothing) == (crop, smoothing, 0.1)


# ---------------------------------------------------------------------------------------------- MixToken
def _tiny_model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('cf_lvvit_tiny', coarse_stage_size=3, embed_dim=48, depth=4, num_heads=3,
                             num_classes=NUM_CLASSES, dense_train_outputs=True, **kwargs).train()


BOX = (1, 0, 3, 2)  # rows 1-2, columns 0-1 of the 3x3 coarse grid: 4 of 9 tokens


def _box_cells(box, side: int) -> torch.Tensor:
    r0, c0, r1, c1 = box
    return torch.tensor([r * side + c for r in range(r0, r1) for c in range(c0, c1)])


@pytest.mark.parametrize('selection', [False, True])
def test_mixtoken_dense_outputs_are_unmixed_exactly(selection):
    """Inside the box a sample's returned token outputs are those its content got in the flipped row."""
    model = _tiny_model()
    model._draw_mix_box = lambda grid: BOX
    raw: List[torch.Tensor] = []
    model.aux_head.register_forward_hook(lambda m, i, o: raw.append(o.detach()))
    x_f = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        state = model.forward_coarse(coarse_from_fine(x_f, (48, 48)), dense=True)
        fine = model.forward_fine(x_f, state, selection=selection, dense=True)
    raw_c, raw_f = raw
    if selection:  # outputs of the selected tokens laid back on the fine grid first
        raw_f = scatter_to_fine_grid(raw_f, fine.important_coarse_index, fine.unimportant_coarse_index, (3, 3))
    for (cls, dense, box), mixed, side in ((state.output, raw_c, 3), (fine.output, raw_f, 6)):
        assert tuple(box) == tuple(v * side // 3 for v in BOX)  # the fine box is the coarse one scaled by 2
        cells = _box_cells(box, side)
        expected = mixed.clone()
        expected[:, cells] = mixed.flip(0)[:, cells]
        assert torch.equal(dense, expected)


def test_mixtoken_undone_exactly_and_dense_targets_stay_unmixed():
    """With token-local blocks (attention and MLP outputs zeroed) un-mixed outputs equal those of the
    unmixed batch everywhere, so the dense loss against UNMIXED targets is the same with and without
    MixToken; mixing the dense targets too would pair outputs with the wrong image's labels."""
    model = _tiny_model()
    model.set_informative_selection(False)  # the same tokens with and without the box (selection would rank mixed rows)
    with torch.no_grad():
        for blk in model.blocks:
            for layer in (blk.attn.proj, blk.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
    model._draw_mix_box = lambda grid: BOX
    x = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        mixed = model(x)
        model.mix_token = False
        plain = model(x)
    for (_, dense_m, box), (_, dense_p, no_box) in zip(mixed, plain):
        assert tuple(no_box) == (0, 0, 0, 0) and tuple(box) != (0, 0, 0, 0)
        torch.testing.assert_close(dense_m, dense_p, rtol=1e-5, atol=1e-5)

    fine_m, fine_p = mixed[1], plain[1]
    g = torch.Generator().manual_seed(1)
    dense_target = torch.rand(4, 36, NUM_CLASSES, generator=g).softmax(-1)
    target = TokenLabelTargets(cls=torch.eye(NUM_CLASSES), dense=dense_target)
    loss = TokenLabelingLoss(cls_weight=1.0, dense_weight=1.0)
    torch.testing.assert_close(loss.dense_loss(fine_m, target), loss.dense_loss(fine_p, target))
    cells = _box_cells(fine_m[2], 6)
    wrong = dense_target.clone()
    wrong[:, cells] = dense_target.flip(0)[:, cells]
    assert not torch.allclose(loss.dense_loss(fine_m, TokenLabelTargets(target.cls, wrong)),
                              loss.dense_loss(fine_p, target))


def test_class_target_mixed_with_the_box_lambda():
    cls_logits = torch.randn(4, NUM_CLASSES)
    t = torch.eye(NUM_CLASSES)
    loss = TokenLabelingLoss(cls_weight=1.0, dense_weight=0.0)
    for box, grid in ((BOX, 9), ((2, 0, 6, 4), 36)):  # the coarse box and the fine one: lam = 1 - 4/9
        out = (cls_logits, torch.zeros(4, grid, NUM_CLASSES), box)
        lam = 5 / 9
        torch.testing.assert_close(loss(out, TokenLabelTargets(t)),
                                   soft_target_cross_entropy(cls_logits, lam * t + (1 - lam) * t.flip(0)))
    no_box = (cls_logits, torch.zeros(4, 9, NUM_CLASSES), (0, 0, 0, 0))
    torch.testing.assert_close(loss(no_box, TokenLabelTargets(t)), soft_target_cross_entropy(cls_logits, t))


# ---------------------------------------------------------------------------------------------- bad input
def _copy_labels(src: Path, dst: Path) -> Path:
    for p in src.rglob('*.pt'):
        (dst / p.parent.name).mkdir(parents=True, exist_ok=True)
        (dst / p.parent.name / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize('case', ['missing', 'wrong_shape', 'class_count', 'no_data_flag', 'label_size'])
def test_bad_token_label_input_is_one_clear_message(case, image_folder, label_dir, tmp_path, caplog):
    labels = _copy_labels(label_dir, tmp_path / 'labels')
    victim = labels / 'class2' / '3.pt'  # not the first map: found while loading, in a loader worker
    argv = TINY + [str(image_folder), '--token-label', '--token-label-data', str(labels)]
    if case == 'missing':
        victim.unlink()
        expected = f'{victim} for {image_folder / "train" / "class2" / "3.png"}'
    elif case == 'wrong_shape':
        torch.save(torch.zeros(2, 4, 3, 3), victim)
        expected = f'label map {victim} has shape (2, 4, 3, 3), but the first label map has (2, 4, 4, 4)'
        argv += ['-j', '1']
    elif case == 'class_count':
        bad = load_checkpoint_file(victim)
        bad[1, 0, 0, 0] = 9
        torch.save(bad, victim)
        expected = f'label map {victim} holds class index 9, but the dataset has 4 classes'
    elif case == 'no_data_flag':
        argv = TINY + [str(image_folder), '--token-label']
        expected = '--token-label needs --token-label-data'
    else:
        argv += ['--token-label-size', '3']
        expected = '--token-label-size must be 4 (2 x --coarse-stage-size'
    assert main_lvvit.main(argv) == main_lvvit.EXIT_BAD_INPUT
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert expected in error and 'Traceback' not in error


@pytest.mark.parametrize('fine_pos', [True, False])
def test_ddp_finds_unused_parameters_when_the_fine_position_embedding_is_unused(image_folder, label_dir, monkeypatch,
                                                                                  fine_pos):
    """With dense targets every parameter is used, except pos_embed_list.1 while selection is off when
    fine_pos_embed_without_selection is off: DDP must then look for unused parameters."""
    seen = {}
    monkeypatch.setattr(main_lvvit, 'train_or_evaluate',
                        lambda *a, **kw: seen.update(kw, fine_pos=a[3].fine_pos_embed_without_selection))
    code = main_lvvit.main(TINY + [str(image_folder), '--token-label', '--token-label-data', str(label_dir),
                                   '--model-kwargs', f'fine_pos_embed_without_selection={fine_pos}'])
    assert code == 0
    assert seen['fine_pos'] is fine_pos
    assert seen['find_unused_parameters'] is (not fine_pos)
