"""Train or evaluate CF-DeiT with the DeiT recipe, on one process or many.

Released form (4 GPUs, 256 images per GPU)::

    python -m torch.distributed.launch --nproc_per_node=4 main_deit.py --model cf_deit_small \\
        --batch-size 256 --data-path PATH --coarse-stage-size 7 --dist-eval --output PATH_TO_LOG

The same with ``torchrun --nproc_per_node=4 main_deit.py ...``; one process: ``python main_deit.py ...``.
Evaluate a checkpoint: ``python main_deit.py --eval --resume cf-deit-s-224.pth --data-path PATH``.

The recipe (SPEC 6): RandAugment, mixup/cutmix with label smoothing, random erasing, repeated
augmentation, AdamW with lr scaled by ``batch * processes / 512``, cosine schedule with warm-up,
drop path, EMA of weights; loss = fine-stage criterion + KL(coarse || fine, detached), the coarse
image derived from the (mixed) fine batch on the fly. Informative selection switches on after
``--selection-start-epoch``.

Each epoch the main process writes, under ``--output_dir``: ``checkpoint.pth`` (atomically),
``best_checkpoint.pth`` (best fine-stage top-1), one JSON line in ``log.txt`` and TensorBoard
scalars under ``tensorboard/``.

This file holds the recipe only (its criterion and ``run``); the flags, the builders and the epoch
loop that ``main_lvvit.py`` shares are in :mod:`utils.train.setup` and :mod:`utils.train.loop`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence, Tuple

import utils.common.startup  # noqa: F401  (first, before torch and timm: HF_HUB_OFFLINE, stop signals)

import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from datasets.build import attach_transform, build_transform
from utils.common.errors import EXIT_BAD_INPUT, EXIT_FAILED, ConfigError
from utils.train.args import adopt_recorded_architecture, flags_given, get_args_parser
from utils.train.loop import train_or_evaluate
from utils.train.losses import CFViTLoss
from utils.train.setup import (
    USER_ERRORS, build_model_from_args, load_datasets, load_finetune_weights, mixup_active, mixup_kwargs, run_main,
    setup_process,
)

__all__ = ['get_args_parser', 'build_criterion', 'run', 'main', 'EXIT_BAD_INPUT', 'EXIT_FAILED',
           'USER_ERRORS']


def build_criterion(args: argparse.Namespace, num_classes: int) -> Tuple[CFViTLoss, Optional[Mixup]]:
    """The CF-ViT loss around the DeiT criterion, and the mixup/cutmix batch transform (or None)."""
    mixup_fn = None
    if mixup_active(args):
        if args.batch_size % 2:
            raise ConfigError(f'mixup/cutmix pair up images: --batch-size must be even, got {args.batch_size}')
        mixup_fn = Mixup(label_smoothing=args.smoothing, **mixup_kwargs(args, num_classes))
        base: nn.Module = SoftTargetCrossEntropy()  # mixup makes the (smoothed) soft targets
    elif args.smoothing > 0:
        base = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base = nn.CrossEntropyLoss()
    return CFViTLoss(base), mixup_fn


def run(args: argparse.Namespace, given: Optional[frozenset] = None) -> None:
    """Train (or with ``--eval`` evaluate) as the flags say. Raises the errors of :data:`USER_ERRORS`.

    ``given``: the flags the command line set (:func:`utils.train.args.flags_given`); with ``--eval --resume``
    the architecture a training checkpoint records fills in the others. None: the flags as they are.
    """
    adopt_recorded_architecture(args, given)
    info, _, output_dir = setup_process(args)
    train_set, val_set, num_classes = load_datasets(args)

    model = build_model_from_args(args, num_classes)
    if train_set is not None:
        attach_transform(train_set, build_transform(True, args, model))
    attach_transform(val_set, build_transform(False, args, model))
    if args.finetune:
        load_finetune_weights(model, args.finetune, unsafe=args.unsafe_load, model_kwargs=args.model_kwargs)
    criterion, mixup_fn = build_criterion(args, num_classes) if not args.eval else (None, None)
    # find_unused_parameters: while selection is off, the released CF-DeiT's fine stage leaves
    # pos_embed_list.1 out of the graph (SPEC 4.4), so some parameters get no gradient.
    train_or_evaluate(args, info, output_dir, model, num_classes, train_set, val_set, criterion, mixup_fn,
                      find_unused_parameters=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: parse, run, and turn bad input into one clear message and a non-zero exit code."""
    parser = argparse.ArgumentParser('CF-DeiT training and evaluation', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    given = flags_given(parser, argv)
    return run_main(lambda a: run(a, given), args)


if __name__ == '__main__':
    sys.exit(main())
