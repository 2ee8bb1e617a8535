"""The released checkpoint layout: state_dict names and shapes, loading, and the loader's errors."""
import json
import os

import pytest
import timm
import torch

from helpers import REPO_GOLDEN_DIR, build_from_config, load_case

from utils.common.atomic import save_atomic
from utils.common.checkpoint import load_checkpoint_file, load_model_weights
from utils.common.errors import CheckpointError

MANIFEST = json.loads((REPO_GOLDEN_DIR / 'full_size_manifest.json').read_text())


def layout(model):
    return [(k, list(v.shape), str(v.dtype).replace('torch.', '')) for k, v in model.state_dict().items()]


def manifest_layout(entry):
    return [(e['key'], e['shape'], e['dtype']) for e in entry['state_dict']]


@pytest.mark.parametrize('name', sorted(MANIFEST['full_size']))
def test_full_size_state_dict_matches_release(name):
    entry = MANIFEST['full_size'][name]
    g = entry['coarse_stage_size']
    model = timm.create_model(entry['model_name'], img_size_list=entry['img_size_list'],
                              num_classes=entry['num_classes'], drop_path_rate=0.1)
    assert model.img_size_list == [16 * g, 32 * g]
    assert layout(model) == manifest_layout(entry)
    assert sum(p.numel() for p in model.parameters()) == entry['num_parameters']
    assert sum(v.numel() for v in model.state_dict().values()) == entry['num_state_dict_elements']
    # the coarse_stage_size shorthand builds the same model
    same = timm.create_model(entry['model_name'], coarse_stage_size=g, num_classes=entry['num_classes'])
    assert layout(same) == manifest_layout(entry)


@pytest.mark.parametrize('case', sorted(MANIFEST['small_test_models']))
def test_small_models_state_dict_matches_release(case):
    model = build_from_config(load_case(REPO_GOLDEN_DIR / f'{case}.pt')['config'])
    entry = MANIFEST['small_test_models'][case]
    assert layout(model) == manifest_layout(entry)
    assert sum(p.numel() for p in model.parameters()) == entry['num_parameters']


def test_released_9x9_checkpoint_shape_loads_strictly():
    entry = MANIFEST['full_size']['cf_deit_small_c9']
    g = torch.Generator().manual_seed(0)
    state_dict = {e['key']: torch.randn(e['shape'], generator=g) if e['dtype'] == 'float32'
                  else torch.zeros(e['shape'], dtype=torch.int64) for e in entry['state_dict']}
    model = timm.create_model('cf_deit_small', img_size_list=[144, 288], num_classes=1000)
    model.load_state_dict(state_dict, strict=True)
    assert torch.equal(model.pos_embed_list[1], state_dict['pos_embed_list.1'])


@torch.no_grad()
def test_synthetic_release_checkpoint_loads_and_reproduces_logits(tmp_path):
    path = REPO_GOLDEN_DIR / 'deit_c7_synthetic_checkpoint.pth'
    before = path.read_bytes()
    case = load_case(REPO_GOLDEN_DIR / 'deit_c7.pt')
    model = build_from_config(case['config']).eval()
    checkpoint = load_model_weights(model, path)
    assert path.read_bytes() == before  # never modified
    assert sorted(checkpoint) == ['anytime_classification', 'budgeted_batch_classification', 'flop', 'model']
    assert checkpoint['flop'] == pytest.approx([0.021575616, 0.089947776])
    assert len(checkpoint['budgeted_batch_classification'][0]) == 100
    model.set_informative_selection(True)
    x_f = case['x_fine_int8'].float() / case['x_fine_scale']
    coarse, fine = model.forward_stages([case['x_coarse'], x_f])
    torch.testing.assert_close(fine, case['sel_fine_logits'], rtol=1e-4, atol=1e-4)


def test_training_checkpoint_with_namespace_and_ddp_prefix_loads(tmp_path):
    import argparse
    model = timm.create_model('cf_deit_tiny', embed_dim=48, depth=4, num_heads=3, num_classes=5)
    state = {f'module.{k}': v for k, v in model.state_dict().items()}
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'model': state, 'epoch': 3, 'args': argparse.Namespace(lr=1e-3)}, path)
    other = timm.create_model('cf_deit_tiny', embed_dim=48, depth=4, num_heads=3, num_classes=5)
    checkpoint = load_model_weights(other, path)
    assert checkpoint['args'].lr == 1e-3
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_mismatch_is_one_clear_message():
    small = timm.create_model('cf_deit_tiny', embed_dim=48, depth=2, num_heads=3, num_classes=10)
    sd = small.state_dict()
    with pytest.raises(CheckpointError) as e:
        load_model_weights(timm.create_model('cf_deit_tiny', embed_dim=48, depth=3, num_heads=3, num_classes=10), sd)
    assert 'missing keys: blocks.2.norm1.weight' in str(e.value)
    with pytest.raises(CheckpointError) as e:
        load_model_weights(timm.create_model('cf_deit_tiny', embed_dim=48, depth=2, num_heads=3, num_classes=7), sd)
    assert 'head.weight (checkpoint [10, 48] vs model [7, 48])' in str(e.value)
    assert '--finetune' in str(e.value)
    with pytest.raises(CheckpointError) as e:
        load_model_weights(timm.create_model('cf_deit_tiny', embed_dim=48, depth=2, num_heads=3, num_classes=10,
                                             coarse_stage_size=9), sd)
    assert 'pos_embed_list.0 (checkpoint [1, 50, 48] vs model [1, 82, 48])' in str(e.value)
    assert '--coarse-stage-size' in str(e.value)
    sd = dict(sd, extra=torch.zeros(1))
    with pytest.raises(CheckpointError, match='1 unexpected keys: extra'):
        load_model_weights(small, sd)


class _Payload:
    def __reduce__(self):
        return (os.system, ('touch PWNED_BY_CHECKPOINT',))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'x': _Payload()}, path)
    with pytest.raises(CheckpointError, match='--unsafe-load') as e:
        load_checkpoint_file(path)
    assert 'type posix.system' in str(e.value) or 'system' in str(e.value)
    assert not (tmp_path / 'PWNED_BY_CHECKPOINT').exists()


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match='not found'):
        load_checkpoint_file(tmp_path / 'nope.pth')
    good = tmp_path / 'good.pth'
    save_atomic({'model': {'w': torch.zeros(100)}}, good)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match='truncated or not a PyTorch checkpoint'):
        load_checkpoint_file(truncated)
    for junk in (bytes(range(256)) * 3, b'hello, not a checkpoint'):
        garbage = tmp_path / 'garbage.pth'
        garbage.write_bytes(junk)
        with pytest.raises(CheckpointError, match='truncated or not a PyTorch checkpoint'):
            load_checkpoint_file(garbage)


def test_save_atomic_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'epoch': 1}, path)

    def boom(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', boom)
    with pytest.raises(OSError, match='No space left'):
        save_atomic({'epoch': 2}, path)
    monkeypatch.undo()
    assert load_checkpoint_file(path) == {'epoch': 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth']  # no temp file left


def test_safetensors_roundtrip(tmp_path):
    model = timm.create_model('cf_lvvit_tiny', embed_dim=48, depth=4, num_heads=3, num_classes=5)
    path = tmp_path / 'weights.safetensors'
    save_atomic(model.state_dict(), path)
    other = timm.create_model('cf_lvvit_tiny', embed_dim=48, depth=4, num_heads=3, num_classes=5)
    load_model_weights(other, path)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_atomic_files_get_the_permissions_open_would_give(tmp_path):
    """mkstemp makes 0600 files; saved checkpoints must be as readable as any file the user writes."""
    import os

    import utils.common.atomic
    save_atomic({'epoch': 1}, tmp_path / 'checkpoint.pth')
    with open(tmp_path / 'plain', 'wb'):
        pass
    mode = (tmp_path / 'checkpoint.pth').stat().st_mode & 0o777
    assert mode == (tmp_path / 'plain').stat().st_mode & 0o777 == 0o666 & ~utils.common.atomic._UMASK
    assert os.access(tmp_path / 'checkpoint.pth', os.R_OK)


def test_a_checkpoint_path_that_is_not_a_regular_file_says_what_it_is(tmp_path):
    import os

    from utils.common.checkpoint import load_checkpoint_file
    from utils.common.errors import CheckpointError
    fifo = tmp_path / 'ckpt.pth'
    os.mkfifo(fifo)
    cases = [(fifo, 'is a named pipe'), ('/dev/zero', 'is a character device'), (tmp_path, 'is a folder'),
             (tmp_path / 'missing.pth', None)]
    for path, kind in cases:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint_file(path)
        expected = f'checkpoint {path} {kind}: expected a regular file' if kind else f'checkpoint not found: {path}'
        assert str(info.value) == expected
