"""models.convert: a plain timm ViT made coarse-to-fine.

The contract: with selection off, a converted model's fine stage computes the plain ViT on the fine
image (the new reuse MLP's output layer is zero, the fine position embedding is the plain one), so
logits agree to 1e-5; what has no CF counterpart is refused with one line naming it.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import models  # noqa: F401  (registers the CF models)
from models.baseline import SingleStageBaseline
from models.convert import (
    ConversionError, convert_state_dict, convert_vit, load_plain_vit, plain_vit_state_dict, pretrained_filter_fn,
)

from helpers import make_image_folder, script_env

ROOT = Path(__file__).resolve().parents[1]
#: A small plain ViT at 64 px: a 4x4 grid of 16 px patches, so the CF coarse grid is 2x2.
SHAPE = dict(img_size=64, embed_dim=48, depth=3, num_heads=3, num_classes=5)
FAMILIES = {
    'deit': ('deit_tiny_patch16_224', {}),
    'vit': ('vit_tiny_patch16_224', {}),
    'deit3': ('deit3_small_patch16_224', {}),  # layer scale, pos_embed without the class slot
}

pytestmark = pytest.mark.usefixtures('one_thread')


def random_plain(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A plain timm ViT whose every weight is random (LayerNorms, biases and layer scales too)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **dict(SHAPE, **kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def images(side: int = 64, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def fine_without_selection(cf: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x_c, x_f = cf.split_inputs(x)
    return cf.forward_fine(x_f, cf.forward_coarse(x_c), selection=False).output


@pytest.mark.parametrize('family', FAMILIES)
def test_converted_fine_stage_without_selection_is_the_plain_vit(family):
    name, kwargs = FAMILIES[family]
    plain = random_plain(name, **kwargs)
    cf = convert_vit(plain).eval()
    assert cf.img_size_list == [32, 64] and cf.coarse_grid == (2, 2)
    assert cf.fine_pos_embed_without_selection is True
    x = images()
    with torch.no_grad():
        expected = plain(x)
    torch.testing.assert_close(fine_without_selection(cf, x), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(cf(x), expected, atol=1e-3)  # with selection it is another computation
    # the new reuse block: fresh LayerNorm and fc1, zero output layer
    assert torch.count_nonzero(cf.reuse_block[1].fc2.weight) == 0 and torch.count_nonzero(cf.reuse_block[1].fc2.bias) == 0
    assert torch.count_nonzero(cf.reuse_block[1].fc1.weight) > 0
    assert torch.equal(cf.reuse_block[0].weight, torch.ones(48))
    # the ViT is untouched and shares no storage with the CF model
    ptrs = {p.data_ptr() for p in plain.parameters()}
    assert not ptrs & {p.data_ptr() for p in cf.parameters()}
    assert all(p.requires_grad for p in cf.parameters())


def test_deit3_position_embedding_gets_a_zero_class_slot():
    plain = random_plain('deit3_small_patch16_224')
    assert plain.no_embed_class and plain.pos_embed.shape == (1, 16, 48)
    cf = convert_vit(plain)
    fine = cf.pos_embed_list[1]
    assert fine.shape == (1, 17, 48)
    assert torch.equal(fine[:, :1], torch.zeros(1, 1, 48)) and torch.equal(fine[:, 1:], plain.pos_embed)
    assert torch.equal(cf.blocks[1].ls2.gamma, plain.blocks[1].ls2.gamma)
    coarse = resample_abs_pos_embed(fine.detach(), new_size=[2, 2], num_prefix_tokens=1)
    torch.testing.assert_close(cf.pos_embed_list[0], coarse, rtol=0, atol=0)


def test_other_grids_resample_both_position_embeddings_from_the_plain_one():
    plain = random_plain('deit_tiny_patch16_224')
    cf = convert_vit(plain, coarse_stage_size=3)
    assert cf.coarse_grid == (3, 3) and cf.fine_grid == (6, 6)
    pos = plain.pos_embed.detach()
    torch.testing.assert_close(cf.pos_embed_list[1], resample_abs_pos_embed(pos, [6, 6], num_prefix_tokens=1))
    torch.testing.assert_close(cf.pos_embed_list[0], resample_abs_pos_embed(pos, [3, 3], num_prefix_tokens=1))
    assert cf(images(96)).shape == (3, 5)


def test_converted_model_keeps_normalization_and_class_count():
    plain = random_plain('vit_tiny_patch16_224', num_classes=7)
    cf = convert_vit(plain, drop_path_rate=0.1, exit_threshold=0.8)
    assert cf.num_classes == 7 and cf.head.weight.shape == (7, 48) and cf.exit_threshold == 0.8
    assert cf.pretrained_cfg['mean'] == plain.pretrained_cfg['mean'] == (0.5, 0.5, 0.5)
    assert cf.pretrained_cfg['input_size'] == (3, 64, 64)
    with pytest.raises(ConversionError, match='embed_dim come from the ViT'):
        convert_vit(plain, embed_dim=96)


@pytest.mark.parametrize('prefix', ['', 'model.', 'module.'])
def test_state_dict_route_into_a_registered_model(prefix):
    """The plain weights as stored (timm, this project's baseline wrapper, DDP) into ``cf_deit_tiny``."""
    plain = random_plain('deit_tiny_patch16_224')
    state = {prefix + k: v for k, v in plain.state_dict().items()}
    cf = timm.create_model('cf_deit_tiny', coarse_stage_size=2, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    assert cf.fine_pos_embed_without_selection is False  # the released default until weights are converted
    load_plain_vit(cf, {'model': state})
    assert cf.fine_pos_embed_without_selection is True
    x = images()
    with torch.no_grad():
        expected = plain(x)
    torch.testing.assert_close(fine_without_selection(cf.eval(), x), expected, rtol=0, atol=1e-5)


def test_baseline_wrapper_checkpoint_is_a_plain_vit():
    plain = random_plain('deit_tiny_patch16_224')
    wrapped = SingleStageBaseline(plain, 64)
    found = plain_vit_state_dict({'model': wrapped.state_dict(), 'epoch': 3})
    assert found is not None and set(found) == set(plain.state_dict())
    cf_state = timm.create_model('cf_deit_tiny', coarse_stage_size=2, embed_dim=48, depth=3, num_heads=3).state_dict()
    assert plain_vit_state_dict(cf_state) is None


def test_filter_fn_passes_cf_weights_and_converts_plain_ones():
    cf = timm.create_model('cf_deit_tiny', coarse_stage_size=2, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    own = cf.state_dict()
    assert pretrained_filter_fn({'model': own}, cf).keys() == own.keys()
    assert cf.fine_pos_embed_without_selection is False
    out = pretrained_filter_fn(random_plain('deit_tiny_patch16_224').state_dict(), cf)
    assert out.keys() == own.keys() and cf.fine_pos_embed_without_selection is True


def _refusal(make):
    with pytest.raises(ConversionError) as e:
        make()
    text = str(e.value)
    assert '\n' not in text
    return text


def test_in_memory_refusals_name_the_reason():
    small = dict(img_size=64, embed_dim=48, depth=2, num_heads=3)
    cases = [
        (lambda: timm.create_model('deit_tiny_distilled_patch16_224', **small), 'distilled'),
        (lambda: timm.create_model('vit_tiny_patch16_224', reg_tokens=4, **small), 'register tokens'),
        (lambda: timm.create_model('vit_tiny_patch16_224', class_token=False, global_pool='avg', **small),
         'no class token'),
        (lambda: timm.create_model('vit_tiny_patch16_224', global_pool='avg', **small), "pools by 'avg'"),
        (lambda: timm.create_model('vit_base_patch16_rope_reg1_gap_256', img_size=64, embed_dim=48, depth=2,
                                   num_heads=3), 'rotary'),
        (lambda: timm.create_model('vit_tiny_patch16_224', **(small | dict(img_size=80))), 'no coarse half'),
    ]
    for make, reason in cases:
        model = make()
        assert reason in _refusal(lambda: convert_vit(model)), reason


def test_state_dict_refusals_name_the_reason():
    cf = timm.create_model('cf_deit_tiny', coarse_stage_size=2, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    plain = random_plain('deit_tiny_patch16_224').state_dict()
    resnet = timm.create_model('resnet18', num_classes=5).state_dict()
    distilled = timm.create_model('deit_tiny_distilled_patch16_224', **dict(SHAPE)).state_dict()
    regs = timm.create_model('vit_tiny_patch16_224', reg_tokens=2, **SHAPE).state_dict()
    no_cls = timm.create_model('vit_tiny_patch16_224', class_token=False, global_pool='avg', **SHAPE).state_dict()
    patch8 = timm.create_model('deit_tiny_patch16_224', patch_size=8, **SHAPE).state_dict()
    deeper = random_plain('deit_tiny_patch16_224', depth=4).state_dict()
    wider = timm.create_model('deit_tiny_patch16_224', **dict(SHAPE, embed_dim=96)).state_dict()
    cases = [
        (resnet, 'not a ViT checkpoint'), (distilled, 'distilled'), (regs, 'register tokens'),
        (no_cls, 'without a class token'), (patch8, '8 px patches'), (deeper, 'no place for'),
        (wider, 'does not fit'), ({'model': cf.state_dict()}, 'already coarse-to-fine'),
        ({**plain, 'blocks.0.attn.rope.freqs': torch.zeros(4)}, 'rotary'),
    ]
    for state, reason in cases:
        assert reason in _refusal(lambda: convert_state_dict(state, cf)), reason
    lvvit = timm.create_model('cf_lvvit_tiny', coarse_stage_size=2, embed_dim=48, depth=3, num_heads=3)
    assert 'CFLVViT' in _refusal(lambda: convert_state_dict(plain, lvvit))


# ---------------------------------------------------------------------------------------------- --finetune
TINY = ['--model', 'cf_deit_tiny', '--embed-dim', '48', '--depth', '3', '--num-heads', '3',
        '--coarse-stage-size', '2', '--device', 'cpu', '--no-amp', '--num_workers', '0', '--batch-size', '4',
        '--epochs', '1', '--lr', '1e-3', '--unscale-lr', '--warmup-epochs', '0', '--print-freq', '1000',
        '--seed', '3', '--subset', '4']


def test_finetune_loads_a_plain_baseline_checkpoint(tmp_path):
    """What main_deit.py trains from: {'model': SingleStageBaseline's state dict} of the same dims."""
    from utils.train.setup import load_finetune_weights
    plain = random_plain('deit_tiny_patch16_224')
    path = tmp_path / 'baseline.pth'
    torch.save({'model': SingleStageBaseline(plain, 64).state_dict(), 'epoch': 9}, path)
    cf = timm.create_model('cf_deit_tiny', coarse_stage_size=2, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    load_finetune_weights(cf, str(path))
    x = images()
    with torch.no_grad():
        expected = plain(x)
    torch.testing.assert_close(fine_without_selection(cf.eval(), x), expected, rtol=0, atol=1e-5)


def test_main_deit_finetunes_from_a_plain_vit_of_another_class_count(tmp_path, caplog):
    import main_deit
    data = make_image_folder(tmp_path / 'data', {'train': 4, 'val': 2}, 3)
    plain = random_plain('deit_tiny_patch16_224', num_classes=5)  # 5 classes, the data has 3
    path = tmp_path / 'plain.pth'
    torch.save({'model': SingleStageBaseline(plain, 64).state_dict()}, path)
    out = tmp_path / 'out'
    assert main_deit.main(TINY + ['--data-path', str(data), '--finetune', str(path), '--output', str(out)]) == 0
    messages = ' '.join(r.getMessage() for r in caplog.records)
    assert 'a plain ViT, converted to cf_deit_tiny (fine_pos_embed_without_selection=True)' in messages
    assert 'new (randomly initialized): head.weight, head.bias' in messages
    assert (out / 'checkpoint.pth').is_file()


def test_main_deit_refuses_a_resnet_checkpoint_in_one_line(tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save(timm.create_model('resnet18', num_classes=3).state_dict(), path)
    data = make_image_folder(tmp_path / 'data', {'train': 4, 'val': 2}, 3)
    proc = subprocess.run([sys.executable, str(ROOT / 'main_deit.py'), *TINY, '--data-path', str(data),
                           '--finetune', str(path)], capture_output=True, text=True, env=script_env(), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if 'ERROR' in x]
    assert f'--finetune {path}: not a ViT checkpoint' in line and 'conv1.weight' in line
