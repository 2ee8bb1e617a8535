"""The paper's ablations as model switches: selection_policy, feature_reuse, informative_ratio at inference."""
import argparse
import math

import pytest
import timm
import torch

import models  # noqa: F401  (registers the CF models)
from utils.common.model_builder import build_from_checkpoint
from utils.inference.flops import stage_gflops

TINY = dict(coarse_stage_size=4, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5)


def _pair(**kwargs):
    torch.manual_seed(0)
    ref = timm.create_model('cf_deit_tiny', **TINY).eval()
    other = timm.create_model('cf_deit_tiny', **TINY, **kwargs).eval()
    other.load_state_dict(ref.state_dict(), strict=True)  # the switches add and drop no weights
    return ref, other


def _images(n=4, seed=1):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_random_selection_picks_the_same_count_differently_and_reproducibly():
    ref, rnd = _pair(selection_policy='random', selection_seed=3)
    x = _images(8)
    a, b = ref.forward_details(x), rnd.forward_details(x)
    k = math.ceil(0.5 * 16)
    assert b.important_coarse_index.shape == a.important_coarse_index.shape == (8, k)
    for row in b.important_coarse_index:  # k distinct coarse patches per image
        assert row.unique().numel() == k and 0 <= int(row.min()) and int(row.max()) < 16
    assert not torch.equal(a.important_coarse_index.sort(1).values, b.important_coarse_index.sort(1).values)
    torch.testing.assert_close(a.coarse_logits, b.coarse_logits, rtol=0, atol=0)  # the coarse stage is untouched
    assert not torch.allclose(a.fine_logits, b.fine_logits)
    torch.testing.assert_close(a.cls_attn, b.cls_attn, rtol=0, atol=0)  # still reported, not used
    # the draws differ between images and batches, and restart from the seed
    assert not torch.equal(b.important_coarse_index[0].sort().values, b.important_coarse_index[1].sort().values)
    rnd.reset_selection_generator()
    again = rnd.forward_details(x)
    assert torch.equal(again.important_coarse_index, b.important_coarse_index)
    torch.testing.assert_close(again.fine_logits, b.fine_logits)
    # the reported patches are the ones the fine stage used: early exit of some rows agrees too
    rnd.reset_selection_generator()
    state = rnd.forward_coarse(x[:, :, ::2, ::2])
    fine = rnd.forward_fine(x, state, selection=True)
    assert torch.equal(fine.important_coarse_index, b.important_coarse_index)


def test_unknown_selection_policy_is_one_line():
    with pytest.raises(ValueError, match="selection_policy must be one of 'attention', 'random', got 'best'"):
        timm.create_model('cf_deit_tiny', **TINY, selection_policy='best')


@torch.no_grad()
def test_feature_reuse_off_changes_the_fine_logits_and_only_them():
    ref, off = _pair(feature_reuse=False)
    with torch.no_grad():  # fc2 of the reuse MLP starts small; make its contribution clear
        ref.reuse_block[1].fc2.weight.normal_(0, 0.5)
        off.load_state_dict(ref.state_dict())
    x = _images()
    a, b = ref.forward_details(x), off.forward_details(x)
    torch.testing.assert_close(a.coarse_logits, b.coarse_logits, rtol=0, atol=0)
    torch.testing.assert_close(a.cls_attn, b.cls_attn, rtol=0, atol=0)
    assert torch.equal(a.important_coarse_index, b.important_coarse_index)
    assert (a.fine_logits - b.fine_logits).abs().max() > 1e-3
    # without reuse the reuse MLP is not run: fewer GFLOPs in the fine stage, the same in the coarse one
    ga, gb = stage_gflops(ref), stage_gflops(off)
    assert ga[0] == pytest.approx(gb[0]) and gb[1] < ga[1]


@torch.no_grad()
def test_informative_ratio_is_settable_on_a_built_model():
    model = timm.create_model('cf_deit_tiny', **TINY).eval()
    x = _images(2)
    half_gflops = stage_gflops(model)[1]
    assert model.num_informative == 8 and model.informative_ratio == 0.5
    model.informative_ratio = 1.0
    assert model.num_informative == 16
    out = model.forward_details(x)
    assert out.important_coarse_index.shape == (2, 16)
    assert stage_gflops(model)[1] > half_gflops
    model.informative_ratio = 0.1
    assert model.num_informative == 2  # ceil(0.1 * 16)
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match='informative ratio must be in'):
            model.informative_ratio = bad
    assert model.num_informative == 2  # a refused value changes nothing


def test_switches_are_recorded_in_a_checkpoint_and_flags_override_them():
    model = timm.create_model('cf_deit_tiny', **TINY, selection_policy='random', feature_reuse=False)
    args = argparse.Namespace(model='cf_deit_tiny', coarse_stage_size=4, embed_dim=48, depth=4, num_heads=3,
                              model_kwargs=['patch_size=8', 'selection_policy=random', 'feature_reuse=False',
                                            'informative_ratio=0.25', 'selection_seed=7'])
    ckpt = {'model': model.state_dict(), 'args': args}
    built, name, g = build_from_checkpoint(ckpt)
    assert (name, g) == ('cf_deit_tiny', 4)
    assert built.selection_policy == 'random' and built.feature_reuse is False and built.selection_seed == 7
    assert built.num_informative == 4
    # at inference a flag overrides the record: attention selection at alpha = 1 on the same weights
    built, _, _ = build_from_checkpoint(ckpt, model_kwargs=['selection_policy=attention', 'informative_ratio=1.0'])
    assert built.selection_policy == 'attention' and built.num_informative == 16 and built.feature_reuse is False


def test_random_selection_does_not_export():
    from models.export import CoarseStageGraph
    model = timm.create_model('cf_deit_tiny', **TINY, selection_policy='random')
    with pytest.raises(ValueError, match="only selection_policy='attention' exports"):
        CoarseStageGraph(model)


def test_training_records_the_switches_and_evaluation_overrides_them(tmp_path, capsys):
    """main_deit.py trains the ablation (random selection, no reuse); its checkpoint records both; --eval
    rebuilds them from the record, and dynamic_inference.py --model-kwargs evaluates another setting."""
    import json

    import dynamic_inference
    import main_deit
    from helpers import make_image_folder
    from utils.common.checkpoint import load_checkpoint_file

    data = make_image_folder(tmp_path / 'data', {'train': 4, 'val': 2}, 3)
    out = tmp_path / 'run'
    tiny = ['--model', 'cf_deit_tiny', '--embed-dim', '48', '--depth', '4', '--num-heads', '3',
            '--coarse-stage-size', '2', '--device', 'cpu', '--no-amp', '--num_workers', '0', '--batch-size', '4',
            '--epochs', '1', '--lr', '1e-3', '--unscale-lr', '--warmup-epochs', '0', '--print-freq', '1000',
            '--seed', '3', '--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--no-model-ema',
            '--selection-start-epoch', '-1', '--data-path', str(data)]
    kwargs = ['--model-kwargs', 'selection_policy=random', 'feature_reuse=False']
    assert main_deit.main(tiny + kwargs + ['--output', str(out)]) == 0
    ckpt = load_checkpoint_file(out / 'checkpoint.pth')
    built, _, _ = build_from_checkpoint(ckpt)
    assert built.selection_policy == 'random' and built.feature_reuse is False
    # without reuse the reuse MLP got no gradient: its weights are still the initial ones (fc2 is trunc-normal)
    assert ckpt['model']['reuse_block.1.fc2.bias'].abs().max() == 0
    capsys.readouterr()
    code = dynamic_inference.main(['--eval-mode', '0', '--data_url', str(data), '--batch_size', '3',
                                   '--checkpoint_path', str(out / 'checkpoint.pth'), '--num-workers', '0',
                                   '--model-kwargs', 'informative_ratio=1.0', 'selection_policy=attention',
                                   '--output-dir', str(tmp_path / 'eval')])
    assert code == 0
    res = json.loads(next((tmp_path / 'eval').rglob('anytime.json')).read_text())
    expected = timm.create_model('cf_deit_tiny', coarse_stage_size=2, embed_dim=48, depth=4, num_heads=3, num_classes=3,
                                 informative_ratio=1.0, feature_reuse=False)  # reuse off kept from the record
    assert res['flop'] == pytest.approx(stage_gflops(expected))
    assert res['flop'] != pytest.approx(stage_gflops(built))  # not the recorded alpha = 0.5


def test_timm_device_and_dtype_arguments():
    """timm 1.0.31 passes device= / dtype= to model constructors (its own test_models.py does)."""
    model = timm.create_model('cf_deit_tiny', **TINY, device='cpu', dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.device.type for p in model.parameters()} == {'cpu'}
    lv = timm.create_model('cf_lvvit_small', coarse_stage_size=2, embed_dim=48, depth=2, num_heads=3, num_classes=3,
                           device='meta')
    assert {p.device.type for p in lv.parameters()} == {'meta'}
