"""Issue 31: nothing silently wrong. What a model was built with travels with its checkpoint (cause 1),
and one function decides a plain ViT file's geometry on every conversion route (cause 2).

Every hostile input is built for real: a plain ViT checkpoint file fine-tuned through ``main_deit.py``,
then resumed or evaluated without the flag that converted it; plain ViT files whose position
embedding has a non-square grid, no tokens or complex numbers.
"""
from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch

import main_deit
import models  # noqa: F401
from models.convert import ConversionError, convert_state_dict, convert_vit, plain_vit_geometry
from utils.common.checkpoint import load_checkpoint_file
from utils.common.errors import ConfigError, ModelBuildError
from utils.common.model_builder import adopt_recorded_switches, build_from_checkpoint, resolve_architecture
from utils.train.setup import load_finetune_weights

from helpers import make_image_folder, one_line_error, run_main

pytestmark = pytest.mark.usefixtures('one_thread', 'own_logging')

DIMS = dict(embed_dim=48, depth=2, num_heads=3)
TRAIN = ['--model', 'cf_deit_tiny', '--embed-dim', '48', '--depth', '2', '--num-heads', '3', '--model-kwargs',
         'patch_size=16', '--coarse-stage-size', '2', '--device', 'cpu', '--no-amp', '--num_workers', '0',
         '--batch-size', '2', '--warmup-epochs', '0', '--lr', '1e-3', '--print-freq', '1000', '--seed', '0',
         '--no-repeated-aug', '--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--no-model-ema',
         '--selection-start-epoch', '5']


@pytest.fixture(scope='module')
def plain_file(tmp_path_factory):
    """A plain ViT (64 px, 16 px patches, 4x4 grid, class token) saved as a user's checkpoint file."""
    root = tmp_path_factory.mktemp('plain')
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=64, num_classes=5, **DIMS)
    with torch.no_grad():
        vit.pos_embed.normal_()
    torch.save({'model': vit.state_dict()}, root / 'plain.pth')
    return root / 'plain.pth'


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), {'train': 2, 'val': 1}, 3)


# ---------------------------------------------------------------------------------------------- cause 1
def test_finetune_switch_is_recorded_and_a_resume_without_the_flag_builds_from_it(plain_file, data, tmp_path, capsys,
                                                                                 caplog):
    common = [*TRAIN, '--data-path', data, '--epochs', '2', '--finetune', plain_file]
    full, part = tmp_path / 'full', tmp_path / 'part'
    code, text = run_main(main_deit, [*common, '--output', full], capsys, caplog)
    assert code == 0, text[-3000:]
    code, text = run_main(main_deit, [*common, '--output', part, '--stop-at-epoch', '1'], capsys, caplog)
    assert code == 0, text[-3000:]
    saved = load_checkpoint_file(part / 'checkpoint.pth')
    assert 'fine_pos_embed_without_selection=True' in saved['args'].model_kwargs
    # resumed WITHOUT --finetune: the record decides, and the result is the uninterrupted run's
    resume = [a for a in common if a not in ('--finetune', plain_file)]
    code, text = run_main(main_deit, [*resume, '--output', part, '--resume', part / 'checkpoint.pth'], capsys, caplog)
    assert code == 0, text[-3000:]
    assert 'records fine_pos_embed_without_selection=True' in text
    a, b = load_checkpoint_file(full / 'checkpoint.pth'), load_checkpoint_file(part / 'checkpoint.pth')
    for name, tensor in a['model'].items():
        torch.testing.assert_close(b['model'][name], tensor, rtol=0, atol=0, msg=name)
    # a flag that contradicts the record: one line naming both values, nothing trained
    before = (part / 'checkpoint.pth').read_bytes()
    code, text = run_main(main_deit, [*resume[:resume.index('--model-kwargs') + 2], 'fine_pos_embed_without_selection=False',
                                      *resume[resume.index('--model-kwargs') + 2:], '--epochs', '3', '--output', part,
                                      '--resume', part / 'checkpoint.pth'], capsys, caplog)
    one_line_error(code, text, 'records fine_pos_embed_without_selection=True, but the flags give '
                               'fine_pos_embed_without_selection=False')
    assert (part / 'checkpoint.pth').read_bytes() == before
    # every builder builds from the record: evaluation, export, label maps, visualization
    model, _, _ = build_from_checkpoint(b)
    assert model.fine_pos_embed_without_selection is True
    with pytest.raises(ModelBuildError, match='records fine_pos_embed_without_selection=True, but the flags give'):
        build_from_checkpoint(b, model_kwargs=['fine_pos_embed_without_selection=False'])
    # --eval with other --model-kwargs still takes the record
    code, text = run_main(main_deit, [*resume, '--eval', '--resume', part / 'checkpoint.pth'], capsys, caplog)
    assert code == 0, text[-3000:]


def test_evaluation_may_override_the_ablation_switches_but_not_the_others():
    model = timm.create_model('cf_deit_tiny', coarse_stage_size=2, patch_size=16, num_classes=3, **DIMS,
                              fine_pos_embed_without_selection=True)
    ckpt = {'model': model.state_dict(), 'args': argparse.Namespace(
        model='cf_deit_tiny', coarse_stage_size=2, **DIMS,
        model_kwargs=['patch_size=16', 'fine_pos_embed_without_selection=True', 'informative_ratio=0.25'])}
    _, _, kwargs = resolve_architecture(ckpt, model_kwargs=['informative_ratio=1.0'])
    assert kwargs['informative_ratio'] == 1.0 and kwargs['fine_pos_embed_without_selection'] is True
    with pytest.raises(ModelBuildError, match='records patch_size=16, but the flags give patch_size=8'):
        resolve_architecture(ckpt, model_kwargs=['patch_size=8'])
    with pytest.raises(ModelBuildError, match='records embed_dim=48, but the flags give embed_dim=96'):
        resolve_architecture(ckpt, sizes={'embed_dim': 96})
    # the tagged name is the same model: its record is used
    _, _, kwargs = resolve_architecture(dict(ckpt, args=argparse.Namespace(**{**vars(ckpt['args']),
                                                                              'model': 'cf_deit_tiny.tag'})),
                                        model_name='cf_deit_tiny')
    assert kwargs['fine_pos_embed_without_selection'] is True
    # in training (resume, fine-tuning) no override is allowed
    fresh = timm.create_model('cf_deit_tiny', coarse_stage_size=2, patch_size=16, num_classes=3, **DIMS)
    with pytest.raises(ConfigError, match='records informative_ratio=0.25, but the flags give informative_ratio=1.0'):
        adopt_recorded_switches([fresh], ckpt, {'informative_ratio': 1.0}, 'x')
    assert adopt_recorded_switches([fresh], ckpt, {}, 'x') == {'fine_pos_embed_without_selection': True,
                                                               'informative_ratio': 0.25}
    assert fresh.fine_pos_embed_without_selection is True and fresh.informative_ratio == 0.25
    bad = dict(ckpt, args=argparse.Namespace(**{**vars(ckpt['args']), 'model_kwargs': ["selection_policy='bogus'"]}))
    with pytest.raises(Exception, match='selection_policy=.bogus. is not a valid value'):
        adopt_recorded_switches([fresh], bad, {}, 'x')


def test_a_flag_that_contradicts_a_conversion_is_refused(plain_file, data, tmp_path, capsys, caplog):
    flags = [*TRAIN[:TRAIN.index('patch_size=16') + 1], 'fine_pos_embed_without_selection=False',
             *TRAIN[TRAIN.index('patch_size=16') + 1:], '--data-path', data, '--epochs', '1']
    for route in (['--finetune', plain_file], ['--pretrained', plain_file]):
        code, text = run_main(main_deit, [*flags, *route, '--output', tmp_path / route[0][2:]], capsys, caplog)
        one_line_error(code, text, '--model-kwargs fine_pos_embed_without_selection=False contradicts '
                                   f'{route[0]} {plain_file}')
    cf = timm.create_model('cf_deit_tiny', coarse_stage_size=2, patch_size=16, num_classes=5, **DIMS)
    load_finetune_weights(cf, str(plain_file))
    assert cf.fine_pos_embed_without_selection is True


# ---------------------------------------------------------------------------------------------- cause 2
def _plain_state(tokens: int, side_h: int = 4, dtype=torch.float32) -> dict:
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=64, num_classes=3, **DIMS)
    state = vit.state_dict()
    state['pos_embed'] = torch.randn(1, tokens, 48).to(dtype)
    return state


@pytest.mark.parametrize('tokens, no_embed_class, reason', [
    (16, False, '15 patch positions and a class token: not a square grid'),  # 3x5 + class slot, not 4x4
    (10, True, '10 patch positions and no class token slot: not a square grid'),  # 2x5, not 1 + 3x3
    (0, False, 'no positions for patches'),
])
def test_a_non_square_or_empty_grid_is_refused_on_every_route(tokens, no_embed_class, reason, tmp_path, data,
                                                             capsys, caplog):
    state = _plain_state(tokens)
    with pytest.raises(ConversionError, match=reason):
        plain_vit_geometry(state, no_embed_class=no_embed_class)
    target = 'cf_deit3_small_patch16_224' if no_embed_class else 'cf_deit_tiny'
    kwargs = dict(coarse_stage_size=2, patch_size=16, num_classes=3, **DIMS)
    cf = timm.create_model(target, **kwargs)
    with pytest.raises(ConversionError, match=reason):  # the state-dict route (--finetune)
        convert_state_dict(state, cf)
    path = tmp_path / 'plain.pth'
    torch.save({'model': state}, path)
    with pytest.raises(Exception, match=reason):  # timm's pretrained route with a local file
        timm.create_model(target, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    if not no_embed_class:  # the scripts: one line, exit 2
        flags = [*TRAIN, '--data-path', data, '--epochs', '1']
        for route in (['--finetune', path], ['--pretrained', path]):
            code, text = run_main(main_deit, [*flags, *route, '--output', tmp_path / route[0][2:]], capsys, caplog)
            one_line_error(code, text, reason)


def test_a_complex_position_embedding_is_one_line():
    state = _plain_state(17, dtype=torch.complex64)
    with pytest.raises(ConversionError, match='complex64'):
        plain_vit_geometry(state)


def test_geometry_is_read_from_the_file_not_guessed():
    state = _plain_state(17)
    geometry = plain_vit_geometry(state)
    assert (geometry.grid, geometry.class_slot, geometry.patch_size) == ((4, 4), True, 16)
    # DeiT-III (no_embed_class): 16 tokens without a slot, stated by the file having no slot for it
    vit = timm.create_model('vit_tiny_patch16_224', img_size=64, num_classes=3, no_embed_class=True, **DIMS)
    geometry = plain_vit_geometry(vit.state_dict(), no_embed_class=True)
    assert (geometry.grid, geometry.class_slot) == ((4, 4), False)
    cf = convert_vit(vit)
    assert math.isclose(float(cf.pos_embed_list[1][0, 0].detach().abs().sum()), 0.0)


# ---------------------------------------------------------------------------------------------- cause 9
def test_a_checkpoint_whose_head_is_nan_is_refused_not_evaluated(data, tmp_path, capsys, caplog):
    import dynamic_inference
    model = timm.create_model('cf_deit_tiny', coarse_stage_size=2, patch_size=16, num_classes=3, **DIMS)
    state = model.state_dict()
    state['head.weight'] = torch.full_like(state['head.weight'], float('nan'))
    torch.save({'model': state}, tmp_path / 'nan.pth')
    code, text = run_main(dynamic_inference, ['--eval-mode', '0', '--data_url', data, '--checkpoint_path',
                                              tmp_path / 'nan.pth', '--model', 'cf_deit_tiny', '--coarse-stage-size',
                                              '2', '--model-kwargs', 'patch_size=16', 'embed_dim=48', 'depth=2',
                                              'num_heads=3', '--num-workers', '0', '--output-dir', tmp_path / 'o'],
                          capsys, caplog)
    one_line_error(code, text, 'holds non-finite weights (head.weight: 144 of 144 values are NaN or infinite)')
    assert not (tmp_path / 'o' / 'anytime.json').exists()


def test_float64_and_byte_images_from_python_are_one_line():
    """Decided (issue 31, cause 9): images are normalized floats in the weights' dtype (any float under
    autocast); float64 or uint8 batches are refused with the conversion to make, not a convolution's error."""
    model = timm.create_model('cf_deit_tiny', coarse_stage_size=2, patch_size=16, num_classes=3, **DIMS).eval()
    with pytest.raises(ValueError, match=r'expected torch.float32 images like the weights, got torch.float64: pass '
                                         r'x.to\(torch.float32\)'):
        model(torch.zeros(2, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match='expected normalized floating-point images, got torch.uint8'):
        model([torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, 3, 64, 64, dtype=torch.uint8)])
    assert model.double()(torch.zeros(2, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64
