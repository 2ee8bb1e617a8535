"""The CF variants of timm's plain ViT families and their pretrained tags (models.vit_variants), the
released checkpoints' tags, timm's save_for_hf / local-dir round trip, and main_deit.py --pretrained.

No network: every weight comes from a local file (HF_HUB_OFFLINE=1), as a user's downloaded copy would.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import save_for_hf

import main_deit
import models
from models.cf_vit import WeightsNotFoundError
from models.convert import ConversionError
from models.vit_variants import CONVERTED_MODEL_NAMES, PLAIN_ARCHITECTURES

from helpers import make_image_folder, script_env

ROOT = Path(__file__).resolve().parents[1]
#: Small shapes of every family: 64 px images, 4x4 fine grid of 16 px patches, 2x2 coarse grid.
DIMS = dict(embed_dim=48, depth=2, num_heads=3)
CF = dict(DIMS, coarse_stage_size=2)

pytestmark = pytest.mark.usefixtures('one_thread')


def random_plain(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """The plain timm model at small dims with every weight random (norms, biases, layer scales too)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, **dict(DIMS, img_size=64, **kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def fine_without_selection(cf: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x_c, x_f = cf.split_inputs(x)
    return cf.forward_fine(x_f, cf.forward_coarse(x_c), selection=False).output


def first_tag(name: str) -> str:
    return timm.list_pretrained(f'{name}.*')[0]


def test_every_family_is_registered_with_the_plain_models_tags():
    assert set(CONVERTED_MODEL_NAMES) == {
        f'cf_{f}_{s}_patch16_224' for f in ('deit', 'vit') for s in ('tiny', 'small', 'base')} | {
        'cf_deit3_small_patch16_224', 'cf_deit3_base_patch16_224'}
    assert set(CONVERTED_MODEL_NAMES) <= set(timm.list_models('cf_*'))
    assert 'cf_deit_small_patch16_224.fb_in1k' in timm.list_pretrained('cf_*')
    for name, (plain, _) in PLAIN_ARCHITECTURES.items():
        tag = first_tag(name).split('.', 1)[1]
        cfg = timm.create_model(f'{name}.{tag}', depth=1).pretrained_cfg
        source = timm.models.get_pretrained_cfg(f'{plain}.{tag}')
        assert cfg['hf_hub_id'] == source.hf_hub_id and cfg['num_classes'] == source.num_classes
        assert cfg['mean'] == source.mean and cfg['crop_pct'] == source.crop_pct
        assert cfg['input_size'] == (3, 224, 224)


@pytest.mark.parametrize('name', CONVERTED_MODEL_NAMES)
def test_plain_weights_from_a_file_through_timms_pretrained_path_give_the_plain_logits(name, tmp_path):
    plain_arch, _ = PLAIN_ARCHITECTURES[name]
    tag = first_tag(name)
    plain = random_plain(plain_arch, num_classes=timm.models.get_pretrained_cfg(tag).num_classes)
    path = tmp_path / 'plain.pth'
    torch.save(plain.state_dict(), path)
    cf = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **CF).eval()
    assert cf.fine_pos_embed_without_selection is True and cf.img_size_list == [32, 64]
    x = images()
    with torch.no_grad():
        expected = plain(x)
    torch.testing.assert_close(fine_without_selection(cf, x), expected, rtol=0, atol=1e-5)
    assert torch.count_nonzero(cf.reuse_block[1].fc2.weight) == 0


def test_another_class_count_gets_a_fresh_head_and_everything_else(tmp_path):
    plain = random_plain('deit_small_patch16_224')
    path = tmp_path / 'plain.pth'
    torch.save({'model': plain.state_dict()}, path)  # DeiT's own release layout
    cf = timm.create_model('cf_deit_small_patch16_224.fb_in1k', pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(path)), num_classes=7, **CF)
    assert cf.head.weight.shape == (7, 48)
    assert torch.equal(cf.blocks[1].mlp.fc2.weight, plain.blocks[1].mlp.fc2.weight)
    assert torch.equal(cf.pos_embed_list[1], plain.pos_embed)


def test_a_fine_tuned_plain_model_of_another_class_count_converts_with_its_head(tmp_path):
    plain = random_plain('vit_small_patch16_224', num_classes=10)
    cf = timm.create_model('cf_vit_small_patch16_224', pretrained=True,
                           pretrained_cfg_overlay=models.convert.pretrained_overlay(plain.state_dict()),
                           num_classes=10, **CF).eval()
    x = images()
    with torch.no_grad():
        expected = plain(x)
    torch.testing.assert_close(fine_without_selection(cf, x), expected, rtol=0, atol=1e-5)


def test_a_refusal_through_timm_is_one_line(tmp_path):
    path = tmp_path / 'distilled.pth'
    torch.save(timm.create_model('deit_tiny_distilled_patch16_224', img_size=64, **DIMS).state_dict(), path)
    with pytest.raises(ConversionError, match='distilled') as e:
        timm.create_model('cf_deit_tiny_patch16_224.fb_in1k', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)), **CF)
    assert '\n' not in str(e.value)


# ---------------------------------------------------------------------------------------------- released tags
def test_released_tags_load_a_local_file_strictly(tmp_path):
    source = timm.create_model('cf_deit_small', coarse_stage_size=9, **DIMS)
    path = tmp_path / 'cf-deit-s-288.pth'
    torch.save({'model': source.state_dict(), 'flop': [1.0]}, path)  # the released layout
    cf = timm.create_model('cf_deit_small.release_g9_in1k', pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(path)), **DIMS)
    assert cf.img_size_list == [144, 288]  # the tag's grid
    assert cf.fine_pos_embed_without_selection is False  # released weights: the released forward
    for key, value in source.state_dict().items():
        assert torch.equal(cf.state_dict()[key], value), key
    broken = tmp_path / 'broken.pth'
    state = source.state_dict()
    del state['reuse_block.0.weight']
    torch.save({'model': state}, broken)
    with pytest.raises(RuntimeError, match='reuse_block.0.weight'):  # strict: nothing is made up
        timm.create_model('cf_deit_small.release_g9_in1k', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(broken)), **DIMS)
    lvvit = timm.create_model('cf_lvvit_small.release_g7_in1k', coarse_stage_size=2, **DIMS)
    assert lvvit.pretrained_cfg['crop_pct'] == 0.9


def test_released_tag_without_its_file_says_where_it_comes_from():
    with pytest.raises(WeightsNotFoundError, match='no download address.*github.com/ChenMnZ/CF-ViT.*file=PATH'):
        timm.create_model('cf_deit_small.release_g7_in1k', pretrained=True)


# ---------------------------------------------------------------------------------------------- save_for_hf
@pytest.mark.parametrize('name', ['cf_deit3_small_patch16_224', 'cf_deit_tiny'])
def test_save_for_hf_and_local_dir_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, **CF).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_for_hf(model, str(tmp_path / 'hf'), safe_serialization=True)
    assert (tmp_path / 'hf' / 'model.safetensors').is_file() and (tmp_path / 'hf' / 'config.json').is_file()
    back = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True).eval()
    assert type(back) is type(model) and back.img_size_list == model.img_size_list and back.num_classes == 4
    assert back.fine_pos_embed_without_selection == model.fine_pos_embed_without_selection
    assert back.pretrained_cfg['input_size'] == (3, 64, 64)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(back.forward_stages(x)[0], model.forward_stages(x)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- main_deit.py
TINY = ['--embed-dim', '48', '--depth', '2', '--num-heads', '3', '--coarse-stage-size', '2', '--device', 'cpu',
        '--no-amp', '--num_workers', '0', '--batch-size', '4', '--epochs', '1', '--print-freq', '1000', '--seed', '3',
        '--warmup-epochs', '0']


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('data'), {'train': 4, 'val': 2}, 3)


def test_main_deit_trains_from_a_pretrained_file(data, tmp_path, caplog):
    plain = random_plain('deit_tiny_patch16_224', num_classes=5)
    path = tmp_path / 'deit_tiny.pth'
    torch.save(plain.state_dict(), path)
    out = tmp_path / 'out'
    argv = TINY + ['--model', 'cf_deit_tiny_patch16_224.fb_in1k', '--pretrained', str(path), '--data-path', str(data),
                   '--output', str(out)]
    assert main_deit.main(argv) == 0
    messages = ' '.join(r.getMessage() for r in caplog.records)
    assert f'cf_deit_tiny_patch16_224.fb_in1k: weights of {path}; new (randomly initialized) head for 3 classes ' \
           '(the weights have 5)' in messages
    assert (out / 'checkpoint.pth').is_file()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    (line,) = [x for x in err.splitlines() if 'ERROR' in x]
    return line


@pytest.mark.parametrize('case, make, reason', [
    ('resnet', lambda: timm.create_model('resnet18', num_classes=3).state_dict(), 'not a ViT checkpoint'),
    ('registers', lambda: timm.create_model('vit_tiny_patch16_224', img_size=64, reg_tokens=2, **DIMS).state_dict(),
     'register tokens'),
    ('no-class-token', lambda: timm.create_model('vit_tiny_patch16_224', img_size=64, class_token=False,
                                                 global_pool='avg', **DIMS).state_dict(), 'without a class token'),
    ('patch-8', lambda: timm.create_model('deit_tiny_patch16_224', img_size=64, patch_size=8, **DIMS).state_dict(),
     '8 px patches'),
    ('rotary', lambda: dict(random_plain('deit_tiny_patch16_224').state_dict(),
                            **{'blocks.0.attn.rope.freqs': torch.zeros(4)}), 'rotary'),
])
def test_main_deit_pretrained_refusals_are_one_line(case, make, reason, data, tmp_path, capsys):
    path = tmp_path / f'{case}.pth'
    torch.save(make(), path)
    argv = TINY + ['--model', 'cf_deit_tiny_patch16_224', '--pretrained', str(path), '--data-path', str(data)]
    assert main_deit.main(argv) == 2
    line = _one_error_line(capsys)
    assert f'--pretrained {path}' in line and reason in line


def test_main_deit_pretrained_and_finetune_together_is_refused(data, tmp_path, capsys):
    argv = TINY + ['--model', 'cf_deit_tiny_patch16_224', '--pretrained', '--finetune', 'x.pth', '--data-path', str(data)]
    assert main_deit.main(argv) == 2
    assert 'give one' in _one_error_line(capsys)


@pytest.mark.parametrize('model, reason', [
    ('cf_deit_tiny_patch16_224.fb_in1k', 'cannot read the weights of cf_deit_tiny_patch16_224.fb_in1k from '
                                         'timm/deit_tiny_patch16_224.fb_in1k'),
    ('cf_deit_small.release_g7_in1k', 'no download address'),
])
def test_script_without_the_weights_exits_2_in_one_line(model, reason, data, tmp_path):
    """As a user runs it: offline, an empty Hugging Face cache, the tag's weights nowhere."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'main_deit.py'), *TINY, '--model', model, '--pretrained', '--data-path', str(data)],
        capture_output=True, text=True, env=dict(script_env(), HF_HOME=str(tmp_path / 'hf')), cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if 'ERROR' in x]
    assert reason in line and '--pretrained FILE' in line
