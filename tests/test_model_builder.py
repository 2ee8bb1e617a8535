"""utils/common/model_builder.py, directly: which architecture a checkpoint and the flags name, refusals of flags
that contradict a record, the switches a built model takes over, and the model of a classification checkpoint.
(The scripts that build through it are covered in ``test_recorded_model.py``, ``test_dynamic_inference.py``.)"""
from __future__ import annotations

import argparse
import logging

import pytest
import timm
import torch

from utils.common.errors import BadInputError, CheckpointError, ConfigError, ModelBuildError
from utils.common.model_builder import (
    adopt_recorded_switches, build_from_checkpoint, check_against_record, check_flag_switches, create_model_checked,
    resolve_architecture, with_recorded_switches,
)

TINY = dict(embed_dim=48, depth=2, num_heads=3)
RECORD = {'args': {'model': 'cf_deit_tiny', 'coarse_stage_size': 2, **TINY,
                   'model_kwargs': ['feature_reuse=False']}}


def tiny_model(**kwargs):
    return timm.create_model('cf_deit_tiny', coarse_stage_size=2, num_classes=3, **{**TINY, **kwargs})


# ---------------------------------------------------------------------------------------------- resolve_architecture
def test_a_checkpoint_without_a_record_gets_the_flags_or_the_released_defaults():
    assert resolve_architecture(None) == ('cf_deit_small', 7, {})
    assert resolve_architecture({'model': {}}, 'cf_lvvit_small', 10, ['depth=4'], sizes={'embed_dim': 96}) == (
        'cf_lvvit_small', 10, {'embed_dim': 96, 'depth': 4})
    assert resolve_architecture({}, model_kwargs={'mlp_ratio': 2.0}, default_model=None, default_grid=5) == (
        None, 5, {'mlp_ratio': 2.0})


def test_a_training_checkpoint_says_what_it_holds():
    assert resolve_architecture(RECORD) == ('cf_deit_tiny', 2, {**TINY, 'feature_reuse': False})
    # a pretrained tag names the same model: the record's sizes still apply
    assert resolve_architecture(RECORD, 'cf_deit_tiny.some_tag')[2] == {**TINY, 'feature_reuse': False}
    # another model: the record's sizes are not its sizes
    assert resolve_architecture(RECORD, 'cf_deit_small') == ('cf_deit_small', 2, {})


def test_flags_may_override_an_ablation_switch_but_not_a_size(caplog):
    with caplog.at_level(logging.INFO, logger='utils.common.model_builder'):
        assert resolve_architecture(RECORD, model_kwargs=['feature_reuse=True'])[2]['feature_reuse'] is True
    assert 'records feature_reuse=False; the flags override it with feature_reuse=True' in caplog.text
    with pytest.raises(ModelBuildError, match=r'the checkpoint records depth=2, but the flags give depth=6'):
        resolve_architecture(RECORD, model_kwargs=['depth=6'])


@pytest.mark.parametrize('kwargs,message', [
    (['depth'], 'KEY=VALUE'),
    (['pretrained=True'], 'pretrained: a model argument may not choose the weights'),
    ({'checkpoint_path': 'x.pth', 'cache_dir': '/tmp'}, 'cache_dir, checkpoint_path: a model argument may not'),
])
def test_model_kwargs_that_are_unreadable_or_load_weights_are_refused(kwargs, message):
    with pytest.raises(ModelBuildError, match=message):
        resolve_architecture(None, model_kwargs=kwargs)


# ---------------------------------------------------------------------------------------------- records and switches
def test_check_against_record_refuses_in_training_and_allows_evaluation_overrides():
    check_against_record({'depth': 2, 'mix_token': True}, {'depth': 2, 'mix_token': False}, 'x.pth', evaluation=True)
    with pytest.raises(ConfigError, match=r"^x.pth records mix_token=True, but the flags give mix_token=False: "):
        check_against_record({'mix_token': True}, {'mix_token': False}, 'x.pth', evaluation=False, error=ConfigError)
    check_against_record({'depth': 2}, {'embed_dim': 96}, 'x.pth', evaluation=False)  # nothing shared, nothing refused


def test_with_recorded_switches_adds_the_models_switches_to_a_copy_of_the_flags():
    model = tiny_model(feature_reuse=False)
    args = argparse.Namespace(model='cf_deit_tiny', model_kwargs=['depth=2', 'feature_reuse=True'])
    out = with_recorded_switches(args, model)
    assert args.model_kwargs == ['depth=2', 'feature_reuse=True']  # unchanged
    assert out.model == 'cf_deit_tiny' and out.model_kwargs[0] == 'depth=2'
    assert 'feature_reuse=False' in out.model_kwargs and 'feature_reuse=True' not in out.model_kwargs
    assert {item.split('=')[0] for item in out.model_kwargs[1:]} == set(model.switches())
    assert with_recorded_switches(args, torch.nn.Linear(2, 2)) is args  # a model without switches: the flags


def test_check_flag_switches_refuses_only_a_contradiction():
    model = tiny_model(feature_reuse=False)
    check_flag_switches(model, {'feature_reuse': False, 'depth': 9}, 'the conversion')
    with pytest.raises(ConfigError, match=r'--model-kwargs feature_reuse=True contradicts the conversion, which '
                                          r'gives feature_reuse=False'):
        check_flag_switches(model, {'feature_reuse': True}, 'the conversion')


def test_adopt_recorded_switches_sets_them_on_the_model_and_its_ema():
    model, ema = tiny_model(), tiny_model()
    assert adopt_recorded_switches([model, None, ema], RECORD, {}, 'resume') == {'feature_reuse': False}
    assert model.feature_reuse is False and ema.feature_reuse is False
    assert adopt_recorded_switches([model], RECORD, {}, 'resume') == {}  # already so: nothing to change
    assert adopt_recorded_switches([model], {'model': {}}, {}, 'resume') == {}  # no record
    assert adopt_recorded_switches([torch.nn.Linear(2, 2)], RECORD, {}, 'resume') == {}  # no switches


def test_adopt_recorded_switches_refuses_a_contradicting_flag_and_an_unusable_record():
    with pytest.raises(ConfigError, match='resume records feature_reuse=False, but the flags give feature_reuse=True'):
        adopt_recorded_switches([tiny_model()], RECORD, {'feature_reuse': True}, 'resume')
    bad = {'args': {'model_kwargs': {'informative_ratio': 'half'}}}
    with pytest.raises(CheckpointError, match='resume: the recorded model arguments cannot be used'):
        adopt_recorded_switches([tiny_model()], bad, {}, 'resume')


# ---------------------------------------------------------------------------------------------- building
def test_create_model_checked_turns_an_impossible_configuration_into_one_line():
    assert create_model_checked('cf_deit_tiny', coarse_stage_size=2, num_classes=3, **TINY).num_classes == 3
    with pytest.raises(BadInputError, match=r"^cannot build cf_deit_tiny with \{'embed_dim': 50, 'num_heads': 3\}: "):
        create_model_checked('cf_deit_tiny', embed_dim=50, num_heads=3)
    with pytest.raises(ModelBuildError, match='no_such_argument'):
        create_model_checked('cf_deit_tiny', ModelBuildError, no_such_argument=1)


def test_build_from_checkpoint_reads_the_class_count_from_the_head_and_selects():
    torch.manual_seed(0)
    source = tiny_model(feature_reuse=False)
    checkpoint = {**RECORD, 'model': source.state_dict()}
    model, name, grid = build_from_checkpoint(checkpoint)
    assert (name, grid, model.num_classes, model.feature_reuse) == ('cf_deit_tiny', 2, 3, False)
    assert model.informative_selection is True
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize('change,message', [
    (lambda c: c['model'].pop('head.weight'), 'no head.weight: it is not a classification checkpoint'),
    (lambda c: c['args'].update(model_kwargs=['num_classes=5']),
     r'--model-kwargs num_classes=5 \(given, or recorded in the checkpoint\) contradicts the run \(num_classes=3, '
     r"coarse_stage_size=2 .*drop it from --model-kwargs, or from the checkpoint's args.model_kwargs$"),
])
def test_build_from_checkpoint_refusals(change, message):
    checkpoint = {'args': dict(RECORD['args']), 'model': tiny_model().state_dict()}
    change(checkpoint)
    with pytest.raises(ModelBuildError, match=message):
        build_from_checkpoint(checkpoint)


def test_build_from_checkpoint_refuses_weights_of_another_size():
    checkpoint = {'args': {**RECORD['args'], 'depth': 3}, 'model': tiny_model().state_dict()}
    with pytest.raises(CheckpointError):
        build_from_checkpoint(checkpoint)

