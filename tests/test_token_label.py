"""Token-label data pipeline (``datasets/token_labels/``): RoI-aligned targets, flips, geometric
augmentation, the released transposed crop and unnormalized smoothing, cutmix coverage and box
rounding, label-map checks, the posterize fix (``datasets/transforms.py``), and the generator's
per-location teacher logits."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.mixup import rand_bbox
from torchvision.ops import roi_align

from datasets.token_labels.augment import GEOMETRIC_OPS, build_token_label_transform
from datasets.token_labels.batch import TokenLabelBatch
from datasets.token_labels.maps import TokenLabelError, label_map_path, validate_label_map
from datasets.token_labels.mixup import TokenLabelMixup, box_coverage
from datasets.token_labels.targets import TokenLabelTargets, token_label_targets
from datasets.transforms import keep_zero_bit_posterize


C = 4
TL, TR, BL, BR = range(4)


def quadrant_map(side: int = 8) -> torch.Tensor:
    """(2, 2, side, side): quadrant q scores class q 4 and class q+1 1; other classes 0."""
    m = torch.zeros(2, 2, side, side)
    half = side // 2
    for q, (rows, cols) in enumerate([(slice(0, half), slice(0, half)), (slice(0, half), slice(half, side)),
                                      (slice(half, side), slice(0, half)), (slice(half, side), slice(half, side))]):
        m[0, 0, rows, cols], m[1, 0, rows, cols] = 4.0, q
        m[0, 1, rows, cols], m[1, 1, rows, cols] = 1.0, (q + 1) % C
    return m


def logits_of(q: int) -> torch.Tensor:
    v = torch.zeros(C)
    v[q], v[(q + 1) % C] = 4.0, 1.0
    return v


def targets(box, flip=False, label_size=3, smoothing=0.0, maps=None, crop='image', smoothing_mode='normalized'):
    """Targets of one crop of ``maps`` (default: the quadrant map); the image's crop and normalized
    smoothing unless told otherwise (the released switches are tested on their own below)."""
    maps = quadrant_map() if maps is None else maps
    return token_label_targets(maps[None], torch.tensor([box], dtype=torch.float32), torch.tensor([flip]), None,
                               C, label_size, smoothing, crop, smoothing_mode)


def test_roi_aligned_targets_of_a_known_crop_box():
    # crop rows/cols 0..6 of an 8x8 map (top 0, left 0, height = width = 0.75) into 3x3 cells of 2 px:
    # columns 0-1, 2-3 lie in the left quadrants, 4-5 in the right ones
    out = targets([0.0, 0.0, 0.75, 0.75])
    expected = [TL, TL, TR, TL, TL, TR, BL, BL, BR]
    torch.testing.assert_close(out.dense[0], torch.stack([logits_of(q).softmax(0) for q in expected]))
    # the class target averages the scores over the 6x6 crop: 16 TL, 8 TR, 8 BL, 4 BR pixels
    mean = (16 * logits_of(TL) + 8 * logits_of(TR) + 8 * logits_of(BL) + 4 * logits_of(BR)) / 36
    torch.testing.assert_close(out.cls[0], mean.softmax(0))


def test_roi_aligned_targets_of_a_flipped_crop():
    out = targets([0.0, 0.0, 0.75, 0.75], flip=True)
    expected = [TR, TL, TL, TR, TL, TL, BR, BL, BL]  # each row mirrored
    torch.testing.assert_close(out.dense[0], torch.stack([logits_of(q).softmax(0) for q in expected]))
    torch.testing.assert_close(out.cls[0], targets([0.0, 0.0, 0.75, 0.75]).cls[0])  # flip-invariant


def test_off_corner_box_and_smoothing():
    # the bottom-right 4x4 quadrant, 2x2 cells, smoothed
    out = targets([0.5, 0.5, 0.5, 0.5], label_size=2, smoothing=0.1)
    p = logits_of(BR).softmax(0) * 0.9 + 0.1 / C
    torch.testing.assert_close(out.dense[0], p.expand(4, C))
    torch.testing.assert_close(out.cls[0], p)
    assert targets([0.5, 0.5, 0.5, 0.5], label_size=1).dense is None  # class targets only


def test_integer_class_indices_and_dense_rows_are_distributions():
    maps = quadrant_map()
    out = targets([0.1, 0.2, 0.6, 0.7], label_size=4, maps=maps)
    torch.testing.assert_close(out.dense.sum(-1), torch.ones(1, 16))
    long_maps = maps.clone()
    # class indices stored as integers (a long tensor) give the same targets
    scores, index = maps[0], maps[1].long()
    as_long = token_label_targets(torch.stack([scores, index.float()])[None], torch.tensor([[0.1, 0.2, 0.6, 0.7]]),
                                  torch.tensor([False]), None, C, 4, crop='image')
    torch.testing.assert_close(as_long.dense, out.dense)
    assert long_maps.shape == (2, 2, 8, 8)


def softmax_of(*quadrants: int) -> torch.Tensor:
    """(N, C): per row, the softmax of the mean teacher logits of the listed quadrants (a tuple) or
    of one quadrant."""
    rows = [torch.stack([logits_of(q) for q in (qs if isinstance(qs, tuple) else (qs,))]).mean(0)
            for qs in quadrants]
    return torch.stack(rows).softmax(-1)


# the top half of the image: not symmetric about the diagonal. 2x2 cells of 2 x 4 map pixels.
TOP_HALF = [0.0, 0.0, 0.5, 1.0]


@pytest.mark.parametrize('flip', [False, True])
def test_image_crop_reads_the_crop_the_image_got(flip):
    out = targets(TOP_HALF, flip=flip, label_size=2)
    cells = [TR, TL, TR, TL] if flip else [TL, TR, TL, TR]
    torch.testing.assert_close(out.dense[0], softmax_of(*cells))
    torch.testing.assert_close(out.cls[0], softmax_of((TL, TR))[0])  # half TL, half TR


def test_released_transposed_crop_reads_the_crop_mirrored_about_the_diagonal():
    # unflipped: roi_align reads x over [top, bottom] = columns 0..4 and y over [left, right] = rows 0..8,
    # the left half: cells (rows 0-4, cols 0-2), (rows 0-4, cols 2-4), then the same rows 4-8
    out = targets(TOP_HALF, label_size=2, crop='transposed')
    torch.testing.assert_close(out.dense[0], softmax_of(TL, TL, BL, BL))
    torch.testing.assert_close(out.cls[0], softmax_of((TL, BL))[0])
    assert (out.dense[0] - targets(TOP_HALF, label_size=2).dense[0]).abs().max() > 0.5
    # flipped: the release flipped the image first, so the crop is the flipped image's top half and
    # its transpose the flipped image's left half = the right half of the unflipped map
    out = targets(TOP_HALF, flip=True, label_size=2, crop='transposed')
    torch.testing.assert_close(out.dense[0], softmax_of(TR, TR, BR, BR))
    torch.testing.assert_close(out.cls[0], softmax_of((TR, BR))[0])


def test_released_transposed_crop_of_a_diagonal_crop_is_wrong_only_when_flipped():
    top_left = [0.0, 0.0, 0.5, 0.5]
    torch.testing.assert_close(targets(top_left, label_size=2, crop='transposed').dense[0], softmax_of(*[TL] * 4))
    # in the flipped frame the crop is the top-right quadrant; transposed, the bottom-left one, which
    # is the unflipped map's bottom right
    flipped = targets(top_left, flip=True, label_size=2, crop='transposed')
    torch.testing.assert_close(flipped.dense[0], softmax_of(*[BR] * 4))
    torch.testing.assert_close(targets(top_left, flip=True, label_size=2).dense[0], softmax_of(*[TL] * 4))


def test_released_transposed_crop_equals_the_released_recipe_on_random_maps():
    """Restating the release's steps (flip the map, crop in the flipped frame, roi_align of
    (top, left, bottom, right) * W - 0.5 without ``aligned``): same targets, boxes of every shape."""
    gen = torch.Generator().manual_seed(0)
    B, S = 16, 4
    maps = torch.stack([torch.randn(B, C, 8, 8, generator=gen) * 3, torch.zeros(B, C, 8, 8)], dim=1)
    maps[:, 1] = torch.arange(C, dtype=torch.float32).view(1, C, 1, 1)  # K = C: every class scored
    size = 0.3 + 0.7 * torch.rand(B, 2, generator=gen)
    corner = torch.rand(B, 2, generator=gen) * (1 - size)
    boxes = torch.cat([corner, size], dim=1)  # (top, left, height, width)
    flips = torch.arange(B) % 2 == 1
    ours = token_label_targets(maps, boxes, flips, None, C, S, crop='transposed', smoothing_mode='normalized')

    scores = maps[:, 0].clone()
    scores[flips] = scores[flips].flip(-1)  # RandomHorizontalFlipWithLabel: label.flip(3), before the crop
    top, left, h, w = boxes.unbind(1)
    left = torch.where(flips, 1 - left - w, left)  # the same pixels, in the flipped image
    coords = torch.stack([top, left, top + h, left + w], 1) * 8 - 0.5
    rois = torch.cat([torch.arange(B, dtype=torch.float32)[:, None], coords], 1)
    dense = roi_align(scores, rois, output_size=S).flatten(2).softmax(1).transpose(1, 2)
    cls = roi_align(scores, rois, output_size=1).flatten(1).softmax(1)
    torch.testing.assert_close(ours.dense, dense)
    torch.testing.assert_close(ours.cls, cls)
    # and it differs from the image's crop, for these asymmetric boxes
    image = token_label_targets(maps, boxes, flips, None, C, S, crop='image', smoothing_mode='normalized')
    assert (image.dense - ours.dense).abs().amax() > 0.3


def test_released_smoothing_is_unnormalized():
    s, p = 0.1, softmax_of(BR)[0]
    unnormalized = targets([0.5, 0.5, 0.5, 0.5], label_size=2, smoothing=s, smoothing_mode='unnormalized')
    expected = p * (1 - s + s / C) + s / C  # 0.925 p + 0.025
    torch.testing.assert_close(unnormalized.dense[0], expected.expand(4, C))
    torch.testing.assert_close(unnormalized.cls[0], expected)
    torch.testing.assert_close(unnormalized.dense.sum(-1), torch.full((1, 4), 1 + s / C))  # 1.025
    normalized = targets([0.5, 0.5, 0.5, 0.5], label_size=2, smoothing=s, smoothing_mode='normalized')
    torch.testing.assert_close(normalized.dense.sum(-1), torch.ones(1, 4))


def test_batch_transform_defaults_to_the_release():
    batch = TokenLabelBatch(C, 2, smoothing=0.1)
    assert (batch.crop, batch.smoothing_mode) == ('transposed', 'unnormalized')
    maps = quadrant_map()[None]
    records = (torch.tensor([0]), maps, torch.tensor([TOP_HALF]), torch.tensor([False]), None)
    _, out = batch(torch.zeros(1, 3, 8, 8), records)
    torch.testing.assert_close(out.dense[0], softmax_of(TL, TL, BL, BL) * (1 - 0.1 + 0.1 / C) + 0.1 / C)
    with pytest.raises(ValueError, match='crop must be one of'):
        TokenLabelBatch(C, 2, crop='diagonal')


def test_timm_cutmix_box_keeps_odd_cut_sizes():
    """timm 1.x spans ``cy - cut // 2 .. cy + (cut + 1) // 2``: an odd cut of 51 px stays 51 px;
    the release's timm 0.4.5 spanned ``cy +- cut // 2``, 50 px (README, released behaviour)."""
    lam = 1 - (51.5 / 101) ** 2  # cut = int(101 * sqrt(1 - lam)) = 51
    np.random.seed(0)
    sides = set()
    for _ in range(50):
        yl, yh, xl, xh = rand_bbox((3, 101, 101), lam)
        if 0 < yl and yh < 101:  # not clipped at the border
            sides.add(int(yh - yl))
    assert sides == {51}


def _quadrant_image(width: int = 80, height: int = 64) -> Image.Image:
    colors = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)]
    px = np.zeros((height, width, 3), dtype=np.uint8)
    px[:height // 2, :width // 2], px[:height // 2, width // 2:] = colors[0], colors[1]
    px[height // 2:, :width // 2], px[height // 2:, width // 2:] = colors[2], colors[3]
    return Image.fromarray(px), colors


def test_dense_targets_follow_crop_flip_and_geometric_randaugment():
    """The image's colour at each cell centre and the target's class agree after every augmentation."""
    torch.manual_seed(0)
    np.random.seed(0)
    import random
    random.seed(0)
    model = timm.create_model('cf_lvvit_tiny', coarse_stage_size=2, embed_dim=48, depth=2, num_heads=3, num_classes=C)
    args = argparse.Namespace(aa='rand-m9-mstd0.5-inc1', color_jitter=0.4, train_interpolation='bicubic', reprob=0.0,
                              remode='pixel', recount=1, crop_scale=(0.3, 1.0), hflip=0.5)
    transform = build_token_label_transform(args, model)
    (ra,) = [t for t in transform.secondary.transforms if isinstance(t, RandAugment)]
    ra.ops = [op for op in ra.ops if op.name in GEOMETRIC_OPS]  # only the ops that move content, always applied
    for op in ra.ops:
        op.prob = 1.0
    image, colors = _quadrant_image()
    mean = torch.tensor(model.pretrained_cfg['mean']).view(3, 1, 1)
    std = torch.tensor(model.pretrained_cfg['std']).view(3, 1, 1)
    palette = torch.tensor(colors, dtype=torch.float32) / 255  # (4, 3)
    label_map = torch.zeros(2, 1, 16, 16)
    label_map[0] = 6.0
    label_map[1, 0, :8, :8], label_map[1, 0, :8, 8:], label_map[1, 0, 8:, :8], label_map[1, 0, 8:, 8:] = 0, 1, 2, 3

    agree = total = warped = flipped = 0
    for _ in range(24):
        img, box, flip, theta = transform(image)
        flipped += flip
        warped += not torch.equal(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
        out = token_label_targets(label_map[None], box[None], torch.tensor([flip]), theta[None], C, 8, crop='image')
        rgb = img * std + mean  # (3, 64, 64) in [0, 1]
        for cell in range(64):
            r, c = divmod(cell, 8)
            pixel = rgb[:, 8 * r + 4, 8 * c + 4]
            dist = (palette - pixel).abs().sum(1)
            target = out.dense[0, cell]
            if dist.min() > 0.15 or target.max() < 0.6:  # fill colour, or a cell across a border
                continue
            total += 1
            agree += int(dist.argmin() == target.argmax())
    assert warped >= 20 and 0 < flipped < 24
    assert total > 600 and agree / total > 0.95, (agree, total)


def test_cutmix_coverage_and_mixup_of_targets():
    cover = box_coverage((0, 3, 0, 8), (8, 8), 4)  # rows 0..3 of an 8 px image, 2 px cells
    torch.testing.assert_close(cover.view(4, 4), torch.tensor([[1.0] * 4, [0.5] * 4, [0.0] * 4, [0.0] * 4]))

    mix = TokenLabelMixup(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=C)
    np.random.seed(1)
    x = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 8, 8).clone()  # image b is all b
    cls = torch.eye(C)[:2]
    dense = torch.eye(C)[:2, None].expand(2, 16, C).clone()
    mixed_x, t = mix(x, TokenLabelTargets(cls, dense))
    share = (mixed_x[0, 0] == 1).float()  # pixels of image 0 taken from image 1
    lam = 1 - share.mean().item()
    torch.testing.assert_close(t.cls[0], torch.tensor([lam, 1 - lam, 0, 0]))
    per_cell = torch.nn.functional.avg_pool2d(share[None, None], 2).flatten()  # (16,)
    torch.testing.assert_close(t.dense[0, :, 1], per_cell)


@pytest.mark.parametrize('bad, message', [
    (torch.zeros(3, 2, 4, 4), 'expected (2, K, H, W)'),
    (torch.zeros(2, 4, 4), 'expected (2, K, H, W)'),
    (torch.stack([torch.ones(2, 4, 4), torch.full((2, 4, 4), 7.0)]), 'class index 7'),
    (torch.zeros(2, 5, 4, 4), 'top 5 classes'),
    ({'scores': torch.zeros(1)}, 'holds a dict'),
])
def test_malformed_label_maps(bad, message):
    with pytest.raises(TokenLabelError, match=message.replace('(', r'\(').replace(')', r'\)')):
        validate_label_map(bad, 'x.pt', C)
    with pytest.raises(TokenLabelError, match='first label map'):
        validate_label_map(torch.zeros(2, 2, 4, 4), 'y.pt', C, expected_shape=(2, 5, 5))


def test_posterize_at_zero_bits_gives_black_instead_of_an_error():
    from timm.data.auto_augment import rand_augment_transform

    ra = rand_augment_transform('rand-n1-m10-inc1', {}, transforms=['PosterizeIncreasing'])
    ra.ops[0].prob = 1.0  # magnitude 10 asks for 0 bits, which Pillow >= 13 refuses
    img = Image.new('RGB', (8, 8), (200, 100, 50))
    keep_zero_bit_posterize(ra)
    assert np.asarray(ra(img)).max() == 0  # what Pillow < 13 returned: every bit cleared



def test_both_training_transforms_carry_the_posterize_fix():
    """``build_transform`` (class labels) and ``build_token_label_transform`` each wrap timm's posterize ops."""
    from datasets.build import build_transform
    from datasets.transforms import _ZeroBitPosterize, augment_ops

    model = timm.create_model('cf_lvvit_tiny', coarse_stage_size=2, embed_dim=48, depth=2, num_heads=3, num_classes=C)
    args = argparse.Namespace(aa='rand-m9-mstd0.5-inc1', color_jitter=0.4, train_interpolation='bicubic', reprob=0.0,
                              remode='pixel', recount=1, crop_scale=(0.3, 1.0), hflip=0.5)
    for transform in (build_transform(True, args, model), build_token_label_transform(args, model).secondary):
        posterize = [op for op in augment_ops(transform) if op.name.startswith('Posterize')]
        assert posterize and all(isinstance(op.aug_fn, _ZeroBitPosterize) for op in posterize)
        assert not any(isinstance(op.aug_fn.fn, _ZeroBitPosterize) for op in posterize)  # wrapped once
        assert keep_zero_bit_posterize(transform) is transform
        assert not any(isinstance(op.aug_fn.fn, _ZeroBitPosterize) for op in posterize)  # a second call changes nothing

def test_label_map_path():
    assert str(label_map_path('/labels', '/data/train/n01440764/n01440764_10026.JPEG')) == \
        '/labels/n01440764/n01440764_10026.pt'


def test_generator_per_location_logits_of_a_vit_and_a_cnn():
    import make_token_labels as gen
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=1, embed_dim=24, num_heads=2,
                            num_classes=C).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = vit.forward_features(x)[:, 1:]  # normed patch tokens (B, 4, D)
    expected = vit.head(tokens).transpose(1, 2).reshape(2, C, 2, 2)
    torch.testing.assert_close(gen.dense_logits(vit, x), expected)

    cnn = timm.create_model('resnet10t', num_classes=C).eval()
    feats = cnn.forward_features(x)  # (B, D, 1, 1) at 32 px
    expected = torch.einsum('bdhw,cd->bchw', feats, cnn.fc.weight) + cnn.fc.bias.view(1, C, 1, 1)
    torch.testing.assert_close(gen.dense_logits(cnn, x), expected, rtol=1e-4, atol=1e-5)

    cf = timm.create_model('cf_lvvit_tiny', coarse_stage_size=2, embed_dim=48, depth=2, num_heads=3,
                           num_classes=C).eval()
    x = torch.randn(2, 3, 64, 64)
    fine_tokens = cf.forward_fine(x, cf.forward_coarse(cf.split_inputs(x)[0]), selection=False).tokens
    full = cf.aux_head(fine_tokens[:, 1:])  # (B, 16, C): every fine patch
    torch.testing.assert_close(gen.dense_logits(cf, x, selection=False), full.transpose(1, 2).reshape(2, C, 4, 4))
    with torch.no_grad():
        state = cf.forward_coarse(cf.split_inputs(x)[0])
        fine = cf.forward_fine(x, state, selection=True)
    cells = gen.dense_logits(cf, x, selection=True).flatten(2).transpose(1, 2)  # (B, 16, C)
    k4 = fine.important_fine_index.shape[1]
    own = cf.aux_head(fine.tokens[:, 1:1 + k4])  # the informative patches' children keep their outputs
    torch.testing.assert_close(cells.gather(1, fine.important_fine_index[..., None].expand(-1, -1, C)), own)
    for b in range(2):  # a non-informative coarse patch's output covers its 4 children
        for j, patch in enumerate(fine.unimportant_coarse_index[b].tolist()):
            r, c = divmod(patch, 2)
            children = [(2 * r + dr) * 4 + 2 * c + dc for dr in (0, 1) for dc in (0, 1)]
            expected_cell = cf.aux_head(fine.tokens[b, 1 + k4 + j])
            for child in children:
                torch.testing.assert_close(cells[b, child], expected_cell)

    maps = gen.top_k_maps(expected, 2)
    assert maps.shape == (2, 2, 2, *expected.shape[-2:])
    assert math.isclose(maps[0, 0, 0].max().item(), expected[0].max().item(), rel_tol=1e-6)
