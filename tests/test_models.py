"""Properties of the coarse-to-fine models, parametrized over the registry, grid and batch size."""
import pytest
import timm
import torch

import models
from models.token_ops import fine_children

NAMES = list(models.MODEL_NAMES)
SMALL = dict(embed_dim=48, depth=4, num_heads=3, num_classes=7)


def make(name, g=7, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, coarse_stage_size=g, **dict(SMALL, **kwargs))


def images(model, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = model.img_size_list[1]
    return torch.randn(batch, 3, s, s, generator=g)


def test_registry_and_cfgs():
    assert set(NAMES) <= set(timm.list_models('cf_*'))
    assert timm.create_model('cf_deit_small').pretrained_cfg['crop_pct'] == 0.875
    assert timm.create_model('cf_lvvit_tiny', coarse_stage_size=9).pretrained_cfg['crop_pct'] == 0.9
    m = timm.create_model('cf_deit_tiny', coarse_stage_size=9)
    assert m.pretrained_cfg['input_size'] == (3, 288, 288)
    assert timm.data.resolve_data_config({}, model=m)['input_size'] == (3, 288, 288)


@pytest.mark.parametrize('name,dim,depth,heads,hidden', [
    ('cf_deit_tiny', 192, 12, 3, 768), ('cf_deit_small', 384, 12, 6, 1536),
    ('cf_lvvit_tiny', 240, 12, 4, 720), ('cf_lvvit_small', 384, 16, 6, 1152)])
def test_default_shapes(name, dim, depth, heads, hidden):
    m = timm.create_model(name, num_classes=10)
    assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (dim, depth, heads)
    assert m.blocks[0].mlp.fc1.out_features == hidden
    assert m.reuse_block[1].fc1.out_features == hidden
    assert m.img_size_list == [112, 224] and m.num_informative == 25


def test_timm_overrides():
    m = timm.create_model('cf_deit_tiny', coarse_stage_size=9, embed_dim=96, depth=5, num_heads=2,
                          mlp_ratio=2, drop_path_rate=0.2, num_classes=3)
    assert m.img_size_list == [144, 288] and m.num_informative == 41
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert m.blocks[0].mlp.fc1.out_features == 192 and m.head.out_features == 3
    assert timm.create_model('cf_deit_tiny', img_size_list=[144, 288]).img_size_list == [144, 288]
    assert timm.create_model('cf_deit_tiny', img_size=288).img_size_list == [144, 288]


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('g', [7, 9])
@pytest.mark.parametrize('batch', [1, 3])
@torch.no_grad()
def test_eval_outputs(name, g, batch):
    model = make(name, g).eval()
    x_f = images(model, batch)
    for selection in (False, True):
        model.set_informative_selection(selection)
        coarse, fine = model.forward_stages(x_f)
        assert coarse.shape == fine.shape == (batch, 7)
        assert torch.isfinite(coarse).all() and torch.isfinite(fine).all()
    out = model.forward_details(x_f)
    k = model.num_informative
    assert out.cls_attn.shape == (batch, g * g) and out.cls_attn.dtype == torch.float32
    # moving average of softmax rows: weights (1-beta)*beta^j over the averaged blocks sum to 1-beta^n
    n_avg = len(model.blocks) - model.selection_start_block
    assert (out.cls_attn > 0).all()
    assert (out.cls_attn.sum(1) <= 1 - 0.99 ** n_avg + 1e-6).all()
    assert out.important_coarse_index.shape == (batch, k)
    assert out.important_fine_index.shape == (batch, 4 * k)
    assert torch.equal(out.important_fine_index, fine_children(out.important_coarse_index, (g, g)))
    assert out.exited.dtype == torch.bool and not out.exited.any()
    # rows' own top-k, no duplicates
    assert all(len(set(r.tolist())) == k for r in out.important_coarse_index)


@torch.no_grad()
def test_compiled_stages_compute_the_same():
    """compile_stages() swaps in torch.compile'd stages (the 'eager' backend here: no C++ build in the
    test) for every path: forward, forward_details and early exit give the eager results."""
    model = make('cf_deit_tiny', 3).eval()
    model.set_informative_selection(True)
    x_f = images(model, 4)
    expected = model.forward_details(x_f, threshold=0.5)
    plain = model.forward_stages(x_f)
    assert model.compile_stages(backend='eager') is model
    assert {'forward_coarse', 'forward_fine'} <= set(vars(model))  # instance attributes now
    got = model.forward_details(x_f, threshold=0.5)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    for a, b in zip(model.forward_stages(x_f), plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('g', [7, 9])
@torch.no_grad()
def test_early_exit_extremes(name, g):
    model = make(name, g).eval()
    model.set_informative_selection(True)
    x_f = images(model, 3)
    coarse, fine = model.forward_stages(x_f)
    torch.testing.assert_close(model.forward_early_exit(x_f, 0.0), coarse, rtol=0, atol=0)
    torch.testing.assert_close(model.forward_early_exit(x_f, 1.01), fine, rtol=1e-6, atol=1e-6)
    out = model.forward_details(x_f, 0.0)
    assert out.exited.all()
    torch.testing.assert_close(out.fine_logits, out.coarse_logits, rtol=0, atol=0)


@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_fine_stage_only_for_rows_that_go_on(name, monkeypatch):
    model = make(name).eval()
    x_f = images(model, 4)
    calls = []
    real = model.forward_fine

    def spy(x_f, state, selection=None, rows=None, dense=False):
        calls.append((selection, None if rows is None else rows.tolist()))
        return real(x_f, state, selection=selection, rows=rows, dense=dense)
    monkeypatch.setattr(model, 'forward_fine', spy)
    model.forward_details(x_f, 0.0)
    assert calls == []  # every row exits: the fine stage is skipped
    conf = model.forward_details(x_f).confidence
    calls.clear()
    threshold = conf.median().item() + 1e-6  # the two most confident rows exit
    out = model.forward_details(x_f, threshold)
    go_on = torch.nonzero(conf < threshold).squeeze(1).tolist()
    assert calls == [(True, go_on)] and len(go_on) == 2
    assert out.exited.tolist() == [i not in go_on for i in range(4)]


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('g', [7, 9])
@torch.no_grad()
def test_mixed_batch_equals_each_row_alone(name, g):
    model = make(name, g).eval()
    x_f = images(model, 5)
    conf = model.forward_details(x_f).confidence
    threshold = conf.sort().values[2].item()  # rows at or above the median exit
    batch = model.forward_details(x_f, threshold)
    assert 0 < int(batch.exited.sum()) < 5
    for i in range(5):
        alone = model.forward_details(x_f[i:i + 1], threshold)
        assert alone.exited.item() == batch.exited[i].item()
        torch.testing.assert_close(alone.fine_logits[0], batch.fine_logits[i], rtol=1e-5, atol=1e-5)
        assert torch.equal(alone.important_fine_index[0], batch.important_fine_index[i])


@pytest.mark.parametrize('name', NAMES)
def test_every_parameter_gets_a_gradient(name):
    model = make(name, drop_path_rate=0.1).train()
    model.set_informative_selection(True)
    coarse, fine = model(images(model, 3))
    if isinstance(coarse, tuple):  # LV-ViT: (cls, dense, box)
        loss = sum(t.float().pow(2).mean() for out in (coarse, fine) for t in out[:2])
    else:
        loss = coarse.pow(2).mean() + fine.pow(2).mean()
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_deit_quirk_fine_pos_embed_unused_before_selection():
    model = make('cf_deit_tiny').train()
    model.set_informative_selection(False)
    coarse, fine = model(images(model, 2))
    (coarse.sum() + fine.sum()).backward()
    assert model.pos_embed_list[1].grad is None  # as in the released training before epoch 200
    model.zero_grad(set_to_none=True)
    model.fine_pos_embed_without_selection = True
    coarse, fine = model(images(model, 2))
    (coarse.sum() + fine.sum()).backward()
    assert model.pos_embed_list[1].grad is not None


@pytest.mark.parametrize('selection', [False, True])
def test_lvvit_training_outputs_for_token_labeling(selection):
    model = make('cf_lvvit_tiny', 7, dense_train_outputs=True).train()
    model.set_informative_selection(selection)
    torch.manual_seed(3)
    (c_cls, c_dense, c_box), (f_cls, f_dense, f_box) = model(images(model, 2))
    assert c_cls.shape == f_cls.shape == (2, 7)
    assert c_dense.shape == (2, 49, 7) and f_dense.shape == (2, 196, 7)
    assert f_box == tuple(2 * v for v in c_box)
    r0, c0, r1, c1 = c_box
    assert 0 <= r0 <= r1 <= 7 and 0 <= c0 <= c1 <= 7
    model.mix_token = False
    (_, _, box0), (_, _, box1) = model(images(model, 2))
    assert box0 == box1 == (0, 0, 0, 0)


def test_mix_token_swaps_the_box_between_samples():
    model = make('cf_lvvit_tiny').train()
    model.patch_embed.train()
    x = torch.arange(2 * 5 * 4 * 4, dtype=torch.float32).reshape(2, 5, 4, 4)
    mixed = model._mix_maps(x, (1, 0, 3, 2))
    assert torch.equal(mixed[0, :, 1:3, 0:2], x[1, :, 1:3, 0:2])
    assert torch.equal(mixed[1, :, 1:3, 0:2], x[0, :, 1:3, 0:2])
    mixed[:, :, 1:3, 0:2] = x[:, :, 1:3, 0:2]
    assert torch.equal(mixed, x)


@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_no_per_call_state_on_the_model(name):
    model = make(name).eval()
    before = {k: v for k, v in vars(model).items() if not k.startswith('_')}
    model.forward_details(images(model, 2), 0.5)
    model.forward_stages(images(model, 2))
    after = {k: v for k, v in vars(model).items() if not k.startswith('_')}
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] or before[k] == after[k] for k in before)


@pytest.mark.parametrize('name', ['cf_deit_tiny', 'cf_lvvit_tiny'])
@pytest.mark.parametrize('g,patch', [(5, 8), (4, 16), (3, 32)])
@torch.no_grad()
def test_any_grid_and_patch_size(name, g, patch):
    model = make(name, g, patch_size=patch).eval()
    assert model.img_size_list == [patch * g, 2 * patch * g]
    assert model.num_informative == -(-g * g // 2)
    x_f = images(model, 2)
    out = model.forward_details(x_f, 0.5)
    assert out.fine_logits.shape == (2, 7)
    assert out.important_fine_index.max() < 4 * g * g


def test_input_errors():
    model = make('cf_deit_tiny').eval()
    with pytest.raises(ValueError, match=r'expected the fine images as \(B, C, 224, 224\)'):
        model(torch.zeros(1, 3, 288, 288))
    with pytest.raises(ValueError, match='coarse images'):
        model([torch.zeros(1, 3, 100, 100), torch.zeros(1, 3, 224, 224)])
    with pytest.raises(ValueError, match='batches differ'):
        model([torch.zeros(2, 3, 112, 112), torch.zeros(1, 3, 224, 224)])
    with pytest.raises(ValueError, match='NaN'):
        model.forward_details(torch.zeros(1, 3, 224, 224), float('nan'))
    with pytest.raises(ValueError, match='fine input must be 2x'):
        timm.create_model('cf_deit_tiny', img_size_list=[112, 288])
    with pytest.raises(ValueError, match='coarse_stage_size gives'):
        timm.create_model('cf_deit_tiny', img_size_list=[112, 224], coarse_stage_size=9)
    with pytest.raises(ValueError, match='multiple of the patch size'):
        timm.create_model('cf_deit_tiny', img_size_list=[100, 200])


@pytest.mark.parametrize('name', ['cf_deit_tiny', 'cf_lvvit_tiny'])
@torch.no_grad()
def test_bf16_autocast_on_cpu(name):
    model = make(name).eval()
    x_f = images(model, 2)
    ref = model.forward_details(x_f)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model.forward_details(x_f, 0.5)
    assert out.fine_logits.dtype == torch.bfloat16
    assert torch.isfinite(out.fine_logits.float()).all()
    torch.testing.assert_close(out.coarse_logits.float(), ref.coarse_logits, rtol=0.1, atol=0.15)


def test_reset_classifier():
    model = make('cf_lvvit_tiny')
    model.reset_classifier(3)
    assert model.head.out_features == model.aux_head.out_features == 3
    out = model.eval()(images(model, 1))  # eval: one (B, C) tensor
    assert out.shape == (1, 3)
    coarse, fine = model.forward_stages(images(model, 1))
    assert coarse.shape == fine.shape == (1, 3)


@pytest.mark.cuda
@pytest.mark.parametrize('name', NAMES)
@torch.no_grad()
def test_cuda_matches_cpu(name):
    model = make(name).eval()
    x_f = images(model, 3)
    ref = model.forward_details(x_f, 0.5)
    out = model.cuda().forward_details(x_f.cuda(), 0.5)
    torch.testing.assert_close(out.fine_logits.cpu(), ref.fine_logits, rtol=1e-3, atol=1e-3)


def test_eval_transform_follows_the_model_cfg():
    from PIL import Image

    from datasets import eval_resize_size, eval_transform
    img = Image.new('RGB', (500, 375), (120, 30, 200))
    deit = timm.create_model('cf_deit_tiny', coarse_stage_size=9)
    lvvit = timm.create_model('cf_lvvit_tiny')
    assert eval_transform(deit)(img).shape == (3, 288, 288)
    assert eval_transform(lvvit)(img).shape == (3, 224, 224)
    assert (eval_resize_size(224, 0.875), eval_resize_size(288, 0.875), eval_resize_size(224, 0.9)) == (256, 329, 248)
    resize = eval_transform(deit).transforms[0]
    assert resize.size == 329 and 'bicubic' in str(resize.interpolation).lower()


def test_single_stage_baseline_has_the_two_stage_interface():
    from models.baseline import create_baseline
    base = create_baseline('deit_tiny_patch16_224', coarse_stage_size=2, patch_size=8, embed_dim=48, depth=2,
                           num_heads=3, num_classes=4).eval()
    assert base.img_size_list == [16, 32] and base.pretrained_cfg['input_size'] == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    coarse, fine = base(x)
    assert coarse is fine and fine.shape == (2, 4)
    assert torch.equal(base([torch.zeros(2, 3, 16, 16), x])[1], fine)
    loss = torch.nn.functional.kl_div(coarse.log_softmax(-1), fine.detach().softmax(-1), reduction='batchmean')
    assert abs(loss.item()) < 1e-6
