"""visualize.py and utils/vis/figures.py on CPU with a tiny random CF-DeiT and generated images."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import visualize
from datasets.transforms import data_config, eval_transform
from utils.vis.figures import (
    GridItem, GridLayout, ClassIndex, draw_grid, fade_unselected, fine_patch_boxes, grid_png_size, read_class_index, resolve_classes, unnormalize,
)

pytestmark = pytest.mark.usefixtures('own_logging')

ROOT = Path(__file__).resolve().parents[1]
G, CLASSES, SIDE = 3, 4, 96  # coarse grid 3x3 -> fine input 96 px
TINY = dict(embed_dim=48, depth=4, num_heads=3)
CLI = ['--model', 'cf_deit_tiny', '--coarse-stage-size', str(G), '--model-kwargs', 'embed_dim=48', 'depth=4',
       'num_heads=3', '--num-workers', '0', '--device', 'cpu', '--no-progress']


def tiny_model(name: str = 'cf_deit_tiny', num_classes: int = CLASSES) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, coarse_stage_size=G, num_classes=num_classes, **TINY).eval()


def write_image(path: Path, seed: int, size=(120, 100), mode: str = 'RGB') -> Path:
    """A random-noise image with a bright block, in any PIL mode."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    pixels = (torch.rand(h, w, 3, generator=g) * 200).to(torch.uint8)
    x0, y0 = int(torch.randint(0, w // 2, (1,), generator=g)), int(torch.randint(0, h // 2, (1,), generator=g))
    pixels[y0:y0 + h // 3, x0:x0 + w // 3] = torch.tensor([250, 40, 40], dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).convert(mode).save(path)
    return path


def run_main(argv, capsys):
    """``visualize.main(argv)`` -> (return code, stderr); argparse's SystemExit gives its code."""
    try:
        code = visualize.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A released-layout checkpoint of the tiny model, and the model itself."""
    model = tiny_model()
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.pth'
    torch.save({'model': model.state_dict(), 'flop': [0.1, 0.2]}, path)
    return path, model


def _details(model, paths, threshold=None):
    """forward_details of the script's eval transform of ``paths``, in one batch."""
    tf = eval_transform(model)
    x = torch.stack([tf(Image.open(p).convert('RGB')) for p in paths])
    with torch.no_grad():
        return model.forward_details(x, threshold)


# ------------------------------------------------------------------------------------ masking
def test_faded_pixels_are_the_unselected_patches(checkpoint):
    _, model = checkpoint
    cfg = data_config(model)
    mean, std = torch.tensor(cfg['mean']).view(3, 1, 1), torch.tensor(cfg['std']).view(3, 1, 1)
    images = torch.rand(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) * 0.98
    with torch.no_grad():
        out = model.forward_details((images - mean) / std, threshold=0.5)
    k, patch, fine = model.num_informative, SIDE // G, SIDE // (2 * G)
    assert out.important_coarse_index.shape == (3, k)
    for b in range(3):
        important = out.important_coarse_index[b]
        expected = torch.zeros(SIDE, SIDE, dtype=torch.bool)
        for i in important.tolist():
            r, c = divmod(i, G)
            expected[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = True
        image = unnormalize((images[b] - mean) / std, cfg['mean'], cfg['std'])
        faded, boxes = fade_unselected(image, (G, G), important, fade=0.7)
        changed = (faded != image).any(dim=0)
        assert torch.equal(changed, ~expected)  # faded exactly outside the re-split patches
        assert torch.equal(faded[:, expected], image[:, expected])
        torch.testing.assert_close(faded[:, ~expected], image[:, ~expected] * 0.3 + 0.7)
        # the outlines are the 4k fine patches of forward_details' important_fine_index
        assert len(boxes) == 4 * k and all(bw == bh == fine for _, _, bw, bh in boxes)
        fine_w = SIDE // fine
        got = sorted((y // fine) * fine_w + x // fine for x, y, _, _ in boxes)
        assert got == sorted(out.important_fine_index[b].tolist())
        covered = torch.zeros(SIDE, SIDE, dtype=torch.bool)
        for x, y, bw, bh in boxes:
            covered[y:y + bh, x:x + bw] = True
        assert torch.equal(covered, expected)


def test_fade_rejects_bad_geometry():
    with pytest.raises(ValueError):
        fade_unselected(torch.rand(3, 100, 100), (3, 3), torch.tensor([0]))
    assert fine_patch_boxes(torch.tensor([4]), (3, 3), (96, 96)) == [
        (32, 32, 16, 16), (48, 32, 16, 16), (32, 48, 16, 16), (48, 48, 16, 16)]


@pytest.mark.parametrize('n,panel', [(1, 96), (5, 64)])
def test_grid_png_has_the_computed_size(tmp_path, n, panel):
    items = [GridItem(torch.rand(3, SIDE, SIDE), torch.tensor([0, 4]), [('a', 'black')] * 4) for _ in range(n)]
    layout = GridLayout(panel=panel)
    size = draw_grid(items, (G, G), tmp_path / 'g.png', ['head'], layout)
    assert Image.open(tmp_path / 'g.png').size == size == grid_png_size(n, layout)
    assert not [p for p in tmp_path.iterdir() if p.name != 'g.png']  # no temp file left behind


# -------------------------------------------------------------------------------- class index
def test_class_index_formats(tmp_path):
    tsv = tmp_path / 'classes.txt'
    tsv.write_text('# folder\tindex\timagenet\tname\nn01440764\t0\t0\ttench\nn02102040\t1\t217\tEnglish springer\n')
    ten = read_class_index(tsv, 2)  # as many classes as rows: the dataset index
    assert ten.folder_index == {'n01440764': 0, 'n02102040': 1} and ten.names[1] == 'English springer'
    big = read_class_index(tsv, 1000)  # 1000 classes: the ImageNet index
    assert big.folder_index['n02102040'] == 217 and big.names[217] == 'English springer'
    (tmp_path / 'names.txt').write_text('cat\ndog house\n')
    assert read_class_index(tmp_path / 'names.txt', 2).names == {0: 'cat', 1: 'dog house'}
    (tmp_path / 'k.json').write_text(json.dumps({'0': ['n01440764', 'tench'], '1': ['n02102040', 'springer']}))
    assert read_class_index(tmp_path / 'k.json', 2).folder_index == {'n01440764': 0, 'n02102040': 1}
    (tmp_path / 'l.json').write_text(json.dumps(['a', 'b', 'c']))
    with pytest.raises(ValueError, match='outside'):
        read_class_index(tmp_path / 'l.json', 2)
    names, targets = resolve_classes(1000, ['n02102040', 'n01440764'], big)
    assert targets == {'n02102040': 217, 'n01440764': 0} and names[217] == 'English springer'
    names, targets = resolve_classes(2, ['b', 'a'], None)
    assert targets == {'b': 0, 'a': 1} and names == ['b', 'a']
    with pytest.raises(ValueError, match='3 class folders but the model has 2'):
        resolve_classes(2, ['a', 'b', 'c'], ClassIndex())


# ---------------------------------------------------------------------------------- end to end
def test_dataset_run_matches_forward_details(tmp_path, checkpoint, capsys):
    ckpt, model = checkpoint
    staged = [write_image(tmp_path / 'stage' / f'{i}.png', seed=i, size=(100 + 9 * i, 90),
                          mode='L' if i == 3 else 'RGBA' if i == 4 else 'RGB') for i in range(12)]
    out = _details(model, staged)
    conf = out.confidence.sort().values
    threshold = float((conf[5] + conf[6]) / 2)  # half the images exit
    out = _details(model, staged, threshold)
    coarse = out.coarse_logits.argmax(1)
    fine = out.fine_logits.argmax(1)
    # Put each image in the folder of the class that makes it land in a known grid.
    folders = [f'n0000000{c}' for c in range(CLASSES)]
    expect_coarse = expect_fine = 0
    for i, p in enumerate(staged):
        if out.exited[i]:
            label, expect_coarse = int(coarse[i]), expect_coarse + 1
        elif fine[i] != coarse[i]:
            label, expect_fine = int(fine[i]), expect_fine + 1
        else:
            label = (int(coarse[i]) + 1) % CLASSES
        dest = tmp_path / 'data' / 'val' / folders[label] / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, dest)
    for f in folders:
        (tmp_path / 'data' / 'val' / f).mkdir(parents=True, exist_ok=True)
    (tmp_path / 'data' / 'classes.txt').write_text(
        '#wnid\tindex\tname\n' + ''.join(f'{f}\t{c}\tthing {c}\n' for c, f in enumerate(folders)))
    out_dir = tmp_path / 'out'
    code, err = run_main(CLI + ['--resume', ckpt, '--data_path', tmp_path / 'data', '--output_dir', out_dir,
                                '--threshold', threshold, '--batch_size', 5, '--num-images', 5], capsys)
    assert code == 0, err
    summary = json.loads((out_dir / 'summary.json').read_text())
    assert summary['images'] == 12 and summary['unreadable'] == 0 and summary['ground_truth']
    assert summary['exited'] == 6 and summary['exit_share'] == 0.5
    assert summary['class_index_file'].endswith('classes.txt') and not summary['random_weights']
    outputs = summary['outputs']
    assert outputs['coarse_correct']['count'] == expect_coarse == 6
    assert outputs['fine_only_correct']['count'] == expect_fine
    assert summary['accuracy_percent']['coarse_on_exited'] == 100.0
    for key in ('coarse_correct', 'fine_only_correct'):
        shown = outputs[key]['shown']
        assert len(shown) == min(5, outputs[key]['count'])
        if shown:
            size = Image.open(out_dir / outputs[key]['png']).size
            assert size == grid_png_size(len(shown), GridLayout(panel=SIDE))
    assert Image.open(out_dir / 'confidence_histogram.png').size == (640, 400)
    assert not list(out_dir.glob('.*.tmp'))


def test_own_images_without_ground_truth(tmp_path, capsys, caplog):
    for i in range(3):
        write_image(tmp_path / 'imgs' / f'{i}.jpg', seed=20 + i)
    (tmp_path / 'imgs' / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
    out_dir = tmp_path / 'out'
    code, err = run_main(CLI + ['--img-path', tmp_path / 'imgs', '--output-dir', out_dir, '--threshold', 0,
                                '--num-classes', 5, '--panel-size', 64], capsys)
    assert code == 0, err
    assert 'RANDOM weights' in caplog.text  # the loud warning
    assert '1 file(s) could not be read' in caplog.text
    summary = json.loads((out_dir / 'summary.json').read_text())
    assert summary['images'] == 3 and summary['unreadable'] == 1 and summary['random_weights']
    assert summary['exited'] == 3 and summary['accuracy_percent'] is None and summary['num_classes'] == 5
    assert Image.open(out_dir / 'coarse_exit.png').size == grid_png_size(3, GridLayout(panel=64))
    assert summary['outputs']['fine_stage']['png'] is None and not (out_dir / 'fine_stage.png').exists()


# ---------------------------------------------------------------------------------- bad input
@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp('bad')
    (root / 'empty').mkdir()
    (root / 'notes.txt').write_text('not an image')
    (root / 'noimages' / 'val' / 'cls').mkdir(parents=True)
    (root / 'noimages' / 'val' / 'cls' / 'readme.md').write_text('x')
    for c in range(3):
        write_image(root / 'three' / 'val' / f'c{c}' / 'a.png', seed=c)
    torch.save({'model': tiny_model('cf_lvvit_tiny').state_dict()}, root / 'lvvit.pth')
    (root / 'garbage.pth').write_bytes(b'not a checkpoint')
    return root


@pytest.mark.parametrize('args,message', [
    (['--img-path', '{root}/notes.txt'], 'is not an image'),
    (['--img-path', '{root}/empty'], 'holds no images'),
    (['--img-path', '{root}/missing.png'], 'does not exist'),
    (['--data-path', '{root}/missing'], 'does not exist'),
    (['--data-path', '{root}/empty'], 'no val/ folder and no class folders'),
    (['--data-path', '{root}/noimages'], 'no images'),
    (['--data-path', '{root}/three', '--resume', '{ckpt}'], '3 class folders but the model has 4 classes'),
    (['--img-path', '{root}/three/val/c0', '--resume', '{root}/lvvit.pth'], 'does not fit'),
    (['--img-path', '{root}/three/val/c0', '--resume', '{root}/garbage.pth'], 'garbage.pth'),
    (['--data-path', '{root}/three', '--resume', '{root}/nothing.pth'], 'checkpoint not found'),
    (['--data-path', '{root}/three', '--threshold', '1.5'], 'argument --threshold: must be in [0, 1], got 1.5'),
    (['--data-path', '{root}/three', '--output-dir', '{root}/notes.txt/out'], 'cannot write to --output-dir'),
], ids=['not-image', 'empty-img-dir', 'missing-img', 'missing-data', 'empty-data', 'no-images', 'class-count',
        'other-model', 'garbage-ckpt', 'missing-ckpt', 'threshold', 'output-dir'])
def test_bad_input_gives_one_line_and_nonzero_exit(bad_inputs, checkpoint, tmp_path, capsys, args, message):
    args = [a.format(root=bad_inputs, ckpt=checkpoint[0]) for a in args]
    if '--output-dir' not in args:
        args += ['--output-dir', str(tmp_path / 'out')]
    code, err = run_main(CLI + args, capsys)
    assert code == visualize.EXIT_BAD_INPUT == 2
    lines = [ln for ln in err.splitlines() if ln.startswith('visualize.py: error:')]
    assert len(lines) == 1 and message in lines[0], err
    assert 'Traceback' not in err


def test_cli_takes_one_source_and_runs_as_a_script(bad_inputs, capsys):
    with pytest.raises(SystemExit) as e:
        visualize.main(CLI + ['--data-path', 'a', '--img-path', 'b'])
    assert e.value.code == 2 and 'not allowed with argument' in capsys.readouterr().err
    env = dict(os.environ, HF_HUB_OFFLINE='1', MPLBACKEND='Agg')
    proc = subprocess.run([sys.executable, str(ROOT / 'visualize.py'), '--img-path', str(bad_inputs / 'notes.txt')],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith('visualize.py: error:')
    assert 'Traceback' not in proc.stderr
