"""Train or evaluate CF-LV-ViT with token labeling and MixToken, on one process or many.

Released form (4 GPUs, 256 images per GPU; ``--apex-amp`` means native mixed precision here)::

    python -m torch.distributed.launch --nproc_per_node=4 main_lvvit.py PATH_TO_IMAGENET \\
        --model cf_lvvit_small -b 256 --apex-amp --drop-path 0.1 --token-label \\
        --token-label-data PATH_TO_TOKENLABEL --model-ema --eval-metric top1_f \\
        --coarse-stage-size 7 --output PATH_TO_LOG

The same with ``torchrun --nproc_per_node=4 main_lvvit.py ...``; one process: ``python main_lvvit.py ...``.
``PATH_TO_IMAGENET`` holds ``train/`` and ``val/`` ImageFolder trees; the label maps
(``<class folder>/<image stem>.pt``, SPEC 7) come from the TokenLabeling release for ImageNet or
from ``make_token_labels.py`` for any dataset.

The recipe (SPEC 6-7, TokenLabeling's LV-ViT flags): AdamW at ``--lr 1.6e-3`` (absolute, the
release's value at 1024 images per step), weight decay 0.05, cosine schedule with 5 warm-up
epochs, RandAugment, random erasing, drop path, EMA; MixToken in the model; loss = token labeling
on the fine stage (class token against the MixToken-mixed class target, every token against its
RoI-aligned dense target) + KL(coarse || fine, detached). Without ``--token-label`` the class
token alone is trained with soft-target cross-entropy. Informative selection switches on after
``--selection-start-epoch``.

This file holds the recipe only (its flags, data, criterion and ``run``). Everything around it is
shared with ``main_deit.py`` through the library: flags, data sets, model building, loaders, optimizer,
AMP, EMA (:mod:`utils.train.setup`), and the epoch loop with resume and checkpoints
(``checkpoint.pth`` atomically, ``best_checkpoint.pth`` by ``--eval-metric``), one JSON line per
epoch in ``log.txt`` and TensorBoard scalars under ``--output`` (:mod:`utils.train.loop`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import utils.common.startup  # noqa: F401  (first, before torch and timm: HF_HUB_OFFLINE, stop signals)

import torch.nn as nn
from timm.data import Mixup

from datasets.build import attach_transform, build_transform
from datasets.token_labels.augment import build_token_label_transform
from datasets.token_labels.batch import ClassLabelBatch, TokenLabelBatch
from datasets.token_labels.dataset import TokenLabelDataset
from datasets.token_labels.maps import folder_samples
from datasets.token_labels.mixup import TokenLabelMixup
from datasets.token_labels.targets import CROP_MODES, SMOOTHING_MODES
from utils.common.errors import EXIT_BAD_INPUT, EXIT_FAILED, ConfigError
from utils.common.flags import MAX_LR, default_workers, float_in, int_at_least, positive_int, worker_count
from utils.train.args import adopt_recorded_architecture, flags_given
from utils.train.args import get_args_parser as training_args_parser
from utils.train.loop import train_or_evaluate
from utils.train.setup import (
    USER_ERRORS, build_model_from_args, load_datasets, load_finetune_weights, mixup_active, mixup_kwargs, run_main,
    setup_process,
)
from utils.train.token_label_loss import CFTokenLabelingLoss, TokenLabelingLoss

__all__ = ['get_args_parser', 'check_args', 'build_objective', 'run', 'main', 'EXIT_BAD_INPUT',
           'EXIT_FAILED', 'USER_ERRORS']
#: ``--eval-metric`` -> the key of :func:`utils.train.engine.evaluate`'s result.
EVAL_METRICS = {'top1_f': 'fine_acc1', 'top1_c': 'coarse_acc1'}
#: LV-ViT's learning rate and the global batch it was tuned for (8 GPUs x 128, or 4 x 256).
LVVIT_LR, LVVIT_BATCH = 1.6e-3, 1024


# ---------------------------------------------------------------------------------------------- flags
def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """The training flags (:func:`utils.train.args.get_args_parser`) with TokenLabeling's spellings and
    LV-ViT defaults, plus token labeling.

    Reusable with ``parents=[get_args_parser()]``.
    """
    parser = argparse.ArgumentParser('CF-LV-ViT training with token labeling', add_help=add_help,
                                     parents=[training_args_parser()], conflict_handler='resolve')
    bool_flag = argparse.BooleanOptionalAction
    parser.add_argument('data_dir', nargs='?', default=None, metavar='DIR',
                        help='dataset root with train/ and val/ ImageFolder trees (or --data-path)')

    g = parser.add_argument_group('LV-ViT recipe (TokenLabeling spellings)')
    g.add_argument('-b', '--batch-size', '--batch_size', dest='batch_size', type=positive_int, default=64,
                   help='images per process and step')
    g.add_argument('-j', '--workers', '--num-workers', '--num_workers', dest='num_workers', type=worker_count,
                   default=default_workers(8),
                   help='data loading processes per training process')
    g.add_argument('--lr', type=float_in(0, MAX_LR, low_open=True), default=LVVIT_LR,
                   help=f'learning rate, used as given (LV-ViT: {LVVIT_LR:g} at {LVVIT_BATCH} images per step)')
    g.add_argument('--apex-amp', '--apex_amp', '--native-amp', '--native_amp', dest='amp', action='store_true',
                   help='mixed precision through torch.autocast (there is no apex; all three flags and --amp '
                        'mean native AMP)')
    g.add_argument('--unscale-lr', action='store_true', help=argparse.SUPPRESS)  # --lr is never scaled here
    g.add_argument('--print-freq', '--log-interval', dest='print_freq', type=int_at_least(1), default=50,
                   help='log a line every this many steps')
    g.add_argument('--eval-metric', choices=sorted(EVAL_METRICS), default='top1_f',
                   help='what picks best_checkpoint.pth (and drives plateau schedules): the top-1 of the fine '
                        '(top1_f) or the coarse (top1_c) stage; of the EMA weights when --model-ema, as released')
    g.add_argument('--hflip', type=float_in(0, 1), default=0.5, help='horizontal flip probability')
    g.add_argument('--dist-bn', choices=('reduce', 'broadcast', ''), default='reduce',
                   help='after every epoch, average (reduce) or copy from rank 0 (broadcast) the running statistics '
                        'of the stem\'s BatchNorm layers over the processes, so that every process evaluates and '
                        'saves the same model; \'\' keeps them per process (the release\'s default)')
    g.add_argument('--mix-token', action=bool_flag, default=True,
                   help='MixToken in the model (a box of coarse patch embeddings from the batch flipped)')

    g = parser.add_argument_group('token labeling')
    g.add_argument('--token-label', action='store_true',
                   help='train with dense token labels (needs --token-label-data)')
    g.add_argument('--token-label-data', default='', metavar='DIR',
                   help='label maps: DIR/<class folder>/<image stem>.pt, tensors (2, K, H, W) of top-K scores and '
                        'class indices (make_token_labels.py writes them)')
    g.add_argument('--token-label-size', type=int_at_least(1), default=None,
                   help='side of the dense target: 2 x --coarse-stage-size (default, one per fine patch), or 1 for '
                        'class targets only')
    g.add_argument('--dense-weight', type=float_in(0), default=1.0,
                   help='weight of the per-token loss: 1.0 as the released CF-LV-ViT run (and TokenLabeling\'s code) '
                        'trained; the TokenLabeling paper names 0.5')
    g.add_argument('--cls-weight', type=float_in(0), default=1.0, help='weight of the class-token loss')
    g.add_argument('--coarse-dense-weight', type=float_in(0), default=0.0,
                   help='weight of a per-token loss on the coarse stage too, against the dense target averaged '
                        'over 2x2 cells (0: the release, which supervised the fine stage only)')
    g.add_argument('--token-label-crop', choices=CROP_MODES, default='transposed',
                   help='where the targets are read from the label map: \'transposed\' as released (the crop '
                        'mirrored about the diagonal, in the flipped image\'s frame: roi_align got (top, left, '
                        'bottom, right) for (x1, y1, x2, y2)), or \'image\', the crop the image got')
    g.add_argument('--token-label-smoothing', choices=SMOOTHING_MODES, default='unnormalized',
                   help='how --smoothing s smooths the token-label targets p: \'unnormalized\' as released, '
                        '(1 - s + s/C) p + s/C (sums to 1 + s/C), or \'normalized\', (1 - s) p + s/C')

    parser.set_defaults(
        model='cf_lvvit_small', amp=False, model_ema=False, model_ema_decay=0.99992, unscale_lr=True, seed=42,
        mixup=0.0, cutmix=0.0, repeated_aug=False, train_interpolation='random', sched_step='next-epoch')
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Flags that cannot work together, as one :class:`ConfigError`."""
    if args.data_dir and args.data_path and Path(args.data_dir) != Path(args.data_path):
        raise ConfigError(f'two datasets given: {args.data_dir} and --data-path {args.data_path}')
    args.data_path = args.data_dir or args.data_path
    if args.eval:
        return
    if args.token_label and not args.token_label_data:
        raise ConfigError('--token-label needs --token-label-data DIR (label maps <class folder>/<image stem>.pt; '
                          'make them with make_token_labels.py)')
    if args.token_label_data and not args.token_label:
        raise ConfigError(f'--token-label-data {args.token_label_data} is given without --token-label: add '
                          f'--token-label to train with it')
    if args.token_label and args.data_set != 'IMNET':
        raise ConfigError('--token-label needs an ImageFolder dataset (--data-set IMNET)')
    weights = (args.cls_weight, args.dense_weight, args.coarse_dense_weight)
    if min(weights) < 0 or args.cls_weight + args.dense_weight <= 0:
        raise ConfigError('--cls-weight, --dense-weight and --coarse-dense-weight must be >= 0, the first two '
                          'not both 0')
    if mixup_active(args) and args.batch_size % 2:
        raise ConfigError(f'mixup/cutmix pair up images: -b must be even, got {args.batch_size}')
    if mixup_active(args) and args.token_label and args.mixup_mode != 'batch':
        raise ConfigError('with --token-label, mixup/cutmix work per batch only (--mixup-mode batch)')


def resolve_label_size(args: argparse.Namespace, model: nn.Module) -> int:
    """``--token-label-size``, defaulting to the fine grid's side (2g)."""
    side = model.fine_grid[0]
    size = args.token_label_size or side
    if size not in (1, side):
        raise ConfigError(f'--token-label-size must be {side} (2 x --coarse-stage-size: one cell per fine patch) '
                          f'or 1 (class targets only), got {size}')
    return size


# ---------------------------------------------------------------------------------------------- building
def build_train_set(args: argparse.Namespace, model: nn.Module, train_set: Any, num_classes: int) -> Any:
    """The training set with its transform: label maps and recorded geometry, or plain images."""
    if not args.token_label:
        attach_transform(train_set, build_transform(True, args, model))
        return train_set
    samples, classes = folder_samples(train_set)
    return TokenLabelDataset(samples, args.token_label_data, num_classes,
                             transform=build_token_label_transform(args, model), classes=classes)


def build_objective(args: argparse.Namespace, num_classes: int, label_size: int) -> tuple:
    """``(criterion, batch transform)``: the CF token-labeling loss, and what turns a loader batch
    into images and :class:`datasets.token_labels.targets.TokenLabelTargets` (with mixup/cutmix if on)."""
    active, mixup_args = mixup_active(args), mixup_kwargs(args, num_classes)
    if args.token_label:
        mixup = TokenLabelMixup(**mixup_args) if active else None
        batch_transform: Any = TokenLabelBatch(num_classes, label_size, args.smoothing, mixup,
                                               crop=args.token_label_crop,
                                               smoothing_mode=args.token_label_smoothing)
    else:
        mixup = Mixup(label_smoothing=args.smoothing, **mixup_args) if active else None
        batch_transform = ClassLabelBatch(num_classes, args.smoothing, mixup)
    criterion = CFTokenLabelingLoss(TokenLabelingLoss(args.cls_weight, args.dense_weight),
                                    coarse_dense_weight=args.coarse_dense_weight)
    return criterion, batch_transform


# ---------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace, given: Optional[frozenset] = None) -> None:
    """Train (or with ``--eval`` evaluate) as the flags say. Raises the errors of :data:`USER_ERRORS`.

    ``given``: the flags the command line set (:func:`utils.train.args.flags_given`); with ``--eval --resume``
    the architecture a training checkpoint records fills in the others. None: the flags as they are.
    """
    adopt_recorded_architecture(args, given)
    check_args(args)
    info, _, output_dir = setup_process(args)
    train_set, val_set, num_classes = load_datasets(args)

    if not args.mix_token:
        args.model_kwargs = list(args.model_kwargs) + ['mix_token=False']
    model = build_model_from_args(args, num_classes, dense=True)
    label_size = resolve_label_size(args, model) if args.token_label else 1
    if train_set is not None:
        train_set = build_train_set(args, model, train_set, num_classes)
    attach_transform(val_set, build_transform(False, args, model))
    if args.finetune:
        load_finetune_weights(model, args.finetune, unsafe=args.unsafe_load, model_kwargs=args.model_kwargs)

    # aux_head gets no gradient without dense targets; with them every parameter is used, except
    # pos_embed_list.1 while selection is off when the non-selective fine stage omits it
    dense_loss = args.token_label and label_size > 1 and args.dense_weight > 0
    # (a resumed checkpoint may record fine_pos_embed_without_selection=False, set back after this point;
    # reuse_block is unused with feature_reuse=False, the paper's ablation)
    all_used = (dense_loss and model.fine_pos_embed_without_selection and getattr(model, 'feature_reuse', True)
                and not args.resume)
    criterion, batch_transform = build_objective(args, num_classes, label_size) if not args.eval else (None, None)
    train_or_evaluate(
        args, info, output_dir, model, num_classes, train_set, val_set, criterion, batch_transform,
        find_unused_parameters=not all_used,
        summary=f'token labels {label_size}x{label_size} from {args.token_label_data}' if args.token_label
        else 'class labels only',
        ema_eval=args.model_ema and not args.model_ema_force_cpu,  # the release ranked epochs by the EMA
        metric_key=EVAL_METRICS[args.eval_metric], eval_metric=args.eval_metric,
        dist_bn=args.dist_bn)  # the conv stem's BatchNorm statistics differ across processes


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: parse, run, and turn bad input into one clear message and a non-zero exit code."""
    parser = argparse.ArgumentParser('CF-LV-ViT training with token labeling', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    given = flags_given(parser, argv)
    return run_main(lambda a: run(a, given), args)


if __name__ == '__main__':
    sys.exit(main())
