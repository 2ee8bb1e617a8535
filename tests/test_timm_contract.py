"""timm's model contract on the CF models: what timm's tools (validate.py, benchmark.py,
features_only, grad checkpointing, fine-tuning to another class count, FX, TorchScript) rely on."""
import math

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from timm.models import get_notrace_functions, get_notrace_modules

import models
from models import cf_vit

NAMES = list(models.MODEL_NAMES)
SMALL = dict(coarse_stage_size=3, embed_dim=48, depth=4, num_heads=3, num_classes=5)


def make(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(SMALL, **kwargs))


def images(batch=2, side=96, seed=1):
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_eval_forward_is_one_tensor_at_the_exit_threshold(name):
    model = make(name).eval()
    x = images(3)
    y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (3, 5)
    assert model.exit_threshold == math.inf  # no image exits by default (1.0 would let some exit)
    torch.testing.assert_close(y, model.forward_details(x, threshold=2.0).fine_logits, rtol=1e-6, atol=1e-6)
    model.exit_threshold = 0.0  # every image exits: the coarse prediction
    torch.testing.assert_close(model(x), model.forward_stages(x)[0], rtol=0, atol=0)
    model.exit_threshold = 0.3
    torch.testing.assert_close(model(x), model.forward_early_exit(x, 0.3), rtol=0, atol=0)
    via_kwargs = timm.create_model(name, exit_threshold=0.3, **SMALL)
    assert via_kwargs.exit_threshold == 0.3


@pytest.mark.parametrize('name', NAMES)
def test_training_forward_is_the_pair_and_the_released_list_is_a_switch(name):
    model = make(name).train()
    out = model(images())
    assert isinstance(out, tuple) and len(out) == 2 and all(o.shape == (2, 5) for o in out)
    released = make(name, forward_returns_both_stages=True).eval()
    out = released(images())
    assert isinstance(out, list) and len(out) == 2 and all(o.shape == (2, 5) for o in out)


@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_forward_features_and_head(name):
    model = make(name).eval()
    x = images()
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + model.num_informative * 3 + 9, 48)  # 4k fine + (9 - k) coarse tokens
    assert model.num_features == model.head_hidden_size == 48
    torch.testing.assert_close(model.forward_head(feats), model(x), rtol=0, atol=0)
    assert torch.equal(model.forward_head(feats, pre_logits=True), feats[:, 0])
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (2, 48)
    torch.testing.assert_close(model(x), feats[:, 0])


def test_num_classes_from_a_1000_class_checkpoint_loads_all_but_both_heads(tmp_path):
    """timm's pretrained loading drops every cfg classifier when num_classes changes: LV-ViT has two."""
    assert timm.create_model('cf_lvvit_tiny').pretrained_cfg['classifier'] == ('head', 'aux_head')
    assert timm.create_model('cf_deit_tiny').pretrained_cfg['classifier'] == 'head'
    for name in ('cf_deit_tiny', 'cf_lvvit_tiny'):
        source = make(name, num_classes=1000)
        path = tmp_path / f'{name}.pth'
        torch.save({'model': source.state_dict()}, path)
        target = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                   **dict(SMALL, num_classes=7))
        assert target.head.out_features == 7
        if name == 'cf_lvvit_tiny':
            assert target.aux_head.out_features == 7
        for key, value in target.state_dict().items():
            if key.startswith(('head.', 'aux_head.')):
                continue
            assert torch.equal(value, source.state_dict()[key]), key


def test_fixed_input_size_cfg():
    for name in NAMES:
        cfg = timm.create_model(name, coarse_stage_size=9).pretrained_cfg
        assert cfg['fixed_input_size'] is True and cfg['input_size'] == (3, 288, 288)


@pytest.mark.parametrize('name', ['cf_deit_tiny', 'cf_lvvit_tiny'])
def test_grad_checkpointing_gives_the_same_gradients(name):
    x = images(4)

    def grads(checkpointing):
        model = make(name, drop_path_rate=0.2, drop_rate=0.1).train()
        model.set_grad_checkpointing(checkpointing)
        calls = []
        real = cf_vit.checkpoint

        def spy(*args, **kwargs):
            calls.append(kwargs.get('use_reentrant'))
            return real(*args, **kwargs)
        cf_vit.checkpoint = spy
        try:
            torch.manual_seed(5)
            coarse, fine = model(x)
            (coarse.pow(2).mean() + fine.pow(2).mean()).backward()
        finally:
            cf_vit.checkpoint = real
        return {n: p.grad.clone() for n, p in model.named_parameters()}, calls

    plain, calls_plain = grads(False)
    ckpt, calls_ckpt = grads(True)
    assert calls_plain == [] and calls_ckpt == [False] * 8  # 4 blocks x 2 stages, non-reentrant
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_forward_intermediates_and_features_only(name):
    model = make(name).eval()
    x = images()
    final, maps = model.forward_intermediates(x)
    assert len(maps) == 4 and all(m.shape == (2, 48, 3, 3) for m in maps)
    torch.testing.assert_close(final, model.forward_features(x))
    # the last coarse map is the coarse stage's tokens before the final norm
    state = model.forward_coarse(model.split_inputs(x)[0])
    torch.testing.assert_close(model.norm(maps[-1].flatten(2).transpose(1, 2)), state.tokens[:, 1:])
    nlc = model.forward_intermediates(x, indices=[1], output_fmt='NLC', intermediates_only=True)
    assert len(nlc) == 1 and nlc[0].shape == (2, 9, 48)
    fine_final, fine_maps = model.forward_intermediates(x, indices=2, stage='fine', norm=True)
    assert [m.shape for m in fine_maps] == [(2, 48, 6, 6)] * 2
    no_sel = model.forward_fine(x, state, selection=False).tokens
    torch.testing.assert_close(fine_final, no_sel)
    torch.testing.assert_close(fine_maps[-1].flatten(2).transpose(1, 2), no_sel[:, 1:])
    with pytest.raises(ValueError, match="stage must be"):
        model.forward_intermediates(x, stage='middle')

    torch.manual_seed(0)  # the weights of make()
    feat = timm.create_model(name, features_only=True, out_indices=(1, 3), **SMALL).eval()
    assert feat.feature_info.channels() == [48, 48] and feat.feature_info.reduction() == [32, 32]
    outs = feat(x)
    assert [o.shape for o in outs] == [(2, 48, 3, 3)] * 2
    torch.testing.assert_close(outs[1], maps[3])


def _fx(model):
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                    eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kwargs)


@pytest.mark.parametrize('name', ['cf_deit_tiny', 'cf_lvvit_tiny'])
def test_fx_tracing(name):
    model = make(name).eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        got = list(_fx(model)(x).values())[0]
    assert torch.equal(got, expected)
    # a traced training graph draws a new MixToken box at every call, as the eager model does
    model = make(name, num_classes=5).train()
    traced = _fx(model)
    torch.manual_seed(0)
    out = list(traced(x).values())
    assert len(out) == 1
    boxes = set()
    real = cf_vit.draw_mix_box

    def spy(grid, beta=1.0):
        box = real(grid, beta)
        boxes.add(box)
        return box
    cf_vit.draw_mix_box = spy
    try:
        for _ in range(6):
            traced(x)
    finally:
        cf_vit.draw_mix_box = real
    assert (len(boxes) > 1) == model.mix_token


@torch.no_grad()
def test_torchscript_compiles_the_eval_graph_or_refuses_in_one_line():
    model = make('cf_deit_tiny', depth=2).eval()
    x = images()
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)
    for change in (dict(exit_threshold=0.5), dict(forward_returns_both_stages=True)):
        with pytest.raises(RuntimeError, match='can be scripted in eval mode without early exit only'):
            torch.jit.script(make('cf_deit_tiny', depth=2, **change).eval())
    with pytest.raises(RuntimeError, match='can be scripted in eval mode'):
        torch.jit.script(make('cf_deit_tiny', depth=2).train())


@pytest.mark.parametrize('name', NAMES)
def test_no_weight_decay_names_parameters_and_keeps_the_released_groups(name):
    """timm 1.0.31's model contract: every ``no_weight_decay()`` entry names a parameter (fnmatch). The
    release's list also held ``'pos_embed_list'``, which names none; leaving it out changes no group."""
    import fnmatch

    from timm.optim import param_groups_weight_decay
    model = make(name)
    names = [n for n, _ in model.named_parameters()]
    for pattern in model.no_weight_decay():
        assert any(fnmatch.fnmatch(n, pattern) for n in names), pattern
    assert not any(fnmatch.fnmatch(n, 'pos_embed_list') for n in names)  # the release's dead entry

    def groups(skip):
        return [(g['weight_decay'], [id(p) for p in g['params']])
                for g in param_groups_weight_decay(model, 0.05, no_weight_decay_list=skip)]
    assert groups(model.no_weight_decay()) == groups(cf_vit.RELEASED_NO_WEIGHT_DECAY)
    by_name = dict(model.named_parameters())
    decay_ids = next(ids for wd, ids in groups(model.no_weight_decay()) if wd)  # released: position embeddings decayed
    assert id(by_name['pos_embed_list.0']) in decay_ids and id(by_name['cls_token']) not in decay_ids


@pytest.mark.parametrize('name', NAMES)
def test_reset_classifier_keeps_the_models_device_dtype_and_mode(name):
    """timm 1.0.31's contract: ``in_chans``; the new head(s) on the model's device and dtype, in its training mode."""
    model = make(name).to(dtype=torch.float64).eval()
    assert model.in_chans == model.default_cfg['input_size'][0] == 3
    model.reset_classifier(0)
    model.reset_classifier(2)
    heads = [model.head] + ([model.aux_head] if hasattr(model, 'aux_head') else [])
    assert all(p.dtype == torch.float64 and p.shape[0] == 2 for head in heads for p in head.parameters())
    assert not any(m.training for m in model.modules())
    model.to(device='meta').train()
    model.reset_classifier(3)
    heads = [model.head] + ([model.aux_head] if hasattr(model, 'aux_head') else [])
    assert all(p.device.type == 'meta' and p.shape[0] == 3 for head in heads for p in head.parameters())
    assert all(m.training for m in model.modules()) and model.num_classes == 3
