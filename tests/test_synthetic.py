"""The built-in synthetic shapes set: deterministic, boxes right, written once and atomically."""
import json

import numpy as np
import pytest

from datasets.synthetic import SYNTHETIC_CLASSES, draw_sample, load_boxes, make_synthetic_dataset


def test_deterministic_and_boxes_hold_the_object(tmp_path):
    a = make_synthetic_dataset(tmp_path / 'a', n_train=30, n_val=12, seed=3)
    b = make_synthetic_dataset(tmp_path / 'b', n_train=30, n_val=12, seed=3)
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob('*.png'))
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob('*.png'))
    assert files_a == files_b and len(files_a) == 42
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    boxes = load_boxes(a)
    assert sorted(boxes) == files_a
    assert {f.split('/')[1] for f in files_a} <= set(SYNTHETIC_CLASSES)
    sizes = [bx['box'][2] - bx['box'][0] for bx in boxes.values()]
    small = [bx['small'] for bx in boxes.values()]
    assert any(small) and not all(small)
    assert max(s for s, sm in zip(sizes, small) if sm) < min(s for s, sm in zip(sizes, small) if not sm)
    # the object's colour (bright) dominates inside its box
    img, cls, box, is_small = draw_sample(3, 'val', 0)
    x = np.asarray(img).astype(float)
    inside = x[box[1]:box[3], box[0]:box[2]].max(axis=2).mean()
    assert inside > x.max(axis=2).mean()
    assert (a / 'classes.txt').read_text().startswith('# folder')


def test_written_once_and_other_params_refused(tmp_path):
    root = make_synthetic_dataset(tmp_path / 's', n_train=6, n_val=6)
    mtime = (root / 'params.json').stat().st_mtime_ns
    assert make_synthetic_dataset(root, n_train=6, n_val=6) == root
    assert (root / 'params.json').stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(root, n_train=7, n_val=6)
    assert json.loads((root / 'params.json').read_text())['n_train'] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temporary folder left
