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
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.data import Mixup  # noqa: E402
from timm.data.distributed_sampler import RepeatAugSampler  # noqa: E402
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2, param_groups_weight_decay  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402
from torch.utils.data import (  # noqa: E402
    DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler,
)

import models  # noqa: E402,F401  (registers the CF models with timm)
from datasets.build import (  # noqa: E402
    DATA_SETS, attach_transform, build_dataset, build_transform, check_same_classes,
)
from datasets.folder import DatasetError, collate_skipping  # noqa: E402
from utils.checkpoint import (  # noqa: E402
    CheckpointError, check_state_dict, extract_state_dict, load_checkpoint_file, load_model_weights,
    remove_stale_temp_files, save_atomic,
)
from utils.dist import (  # noqa: E402
    DistInfo, DistributedSetupError, all_agree, cleanup, default_device, epoch_seed, init_distributed,
    seed_everything,
)
from utils.engine import AmpConfig, NonFiniteLossError, evaluate, format_eval, train_one_epoch  # noqa: E402
from utils.losses import CFViTLoss  # noqa: E402
from utils.misc import (  # noqa: E402
    EXIT_BAD_INPUT, EXIT_FAILED, OutputDirError, append_json_line, check_writable_dir, copy_atomic,
    describe_os_error, log_thread_os_errors, positive_int, setup_logging,
)
from utils.misc import parse_model_kwargs as _parse_model_kwargs  # noqa: E402
from utils.run_folder import RunLock, check_outside_inputs, release_locks  # noqa: E402
from utils.signals import exit_status, handle_stop_signals, quiet_worker_signals, stop_requested  # noqa: E402
from utils.validation import (  # noqa: E402
    BadInputError, check_optimizer_state, create_model_checked, device_name, finite_float, float_in, int_at_least,
)

_logger = logging.getLogger('main_deit')

CHECKPOINT_NAME = 'checkpoint.pth'
BEST_CHECKPOINT_NAME = 'best_checkpoint.pth'
LOG_NAME = 'log.txt'
TENSORBOARD_DIR = 'tensorboard'
#: The DeiT rule: the base ``--lr`` is for this many images per step over all processes.
LR_REFERENCE_BATCH = 512.0
#: --sched-step choices: what is added to the finished epoch's index when the scheduler is stepped after it.
SCHED_STEPS = {'epoch': 0, 'next-epoch': 1}
#: Evaluation batches are this much larger than training ones (no gradients to hold).
EVAL_BATCH_FACTOR = 1.5
#: Exit code of a failed training run (non-finite loss); bad input exits with EXIT_BAD_INPUT.
EXIT_TRAINING_FAILED = EXIT_FAILED


class ConfigError(RuntimeError):
    """Flags that cannot work together (message meant for a person)."""


USER_ERRORS = (ConfigError, DatasetError, CheckpointError, OutputDirError, DistributedSetupError, BadInputError)


# ---------------------------------------------------------------------------------------------- flags
def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """The flags of the DeiT recipe plus CF-ViT's; reusable with ``parents=[get_args_parser()]``."""
    parser = argparse.ArgumentParser('CF-DeiT training and evaluation', add_help=add_help)
    bool_flag = argparse.BooleanOptionalAction

    g = parser.add_argument_group('run')
    g.add_argument('--batch-size', '--batch_size', type=positive_int, default=64, help='images per process and step')
    g.add_argument('--epochs', type=int_at_least(1), default=300)
    g.add_argument('--start_epoch', '--start-epoch', type=int_at_least(0), default=0,
                   help='first epoch (set by --resume)')
    g.add_argument('--stop-at-epoch', type=int_at_least(0), default=None,
                   help='end this run before this 0-based epoch, as if interrupted (the schedule still spans '
                        '--epochs); continue later with --resume')
    g.add_argument('--eval', action='store_true', help='only evaluate (both stages) and exit')
    g.add_argument('--dist-eval', '--dist_eval', action='store_true',
                   help='split evaluation over the processes (else every process evaluates everything)')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--deterministic', action='store_true',
                   help='deterministic algorithms (slower on GPU); CPU runs are deterministic anyway')
    g.add_argument('--output_dir', '--output-dir', '--output', dest='output_dir', default='',
                   help='folder for checkpoints, log.txt and TensorBoard events; empty: write nothing')
    g.add_argument('--device', type=device_name, default=default_device(), help='cuda (default when available) or cpu')
    g.add_argument('--print-freq', type=int_at_least(1), default=50, help='log a line every this many steps')
    g.add_argument('--amp', action=bool_flag, default=None,
                   help='mixed precision through torch.autocast; default on for CUDA (as the release trained), '
                        'off for CPU (bfloat16 is emulated, hence slow, on CPUs without native support)')
    g.add_argument('--apex-amp', '--apex_amp', dest='amp', action='store_true', default=None,
                   help='the released scripts\' flag; means native --amp')
    g.add_argument('--amp-dtype', choices=('bfloat16', 'float16'), default=None,
                   help='autocast dtype; default float16 (with a gradient scaler) on CUDA, bfloat16 on CPU')

    g = parser.add_argument_group('model')
    g.add_argument('--model', default='cf_deit_small', help='a registered CF-DeiT model (cf_deit_small, cf_deit_tiny)')
    g.add_argument('--coarse-stage-size', '--coarse_stage_size', type=positive_int, default=7,
                   help='coarse grid side g (7 or 9 for the released models); fine images are 32*g pixels')
    g.add_argument('--embed-dim', type=int_at_least(1), default=None, help='override the width (small CPU experiments)')
    g.add_argument('--depth', type=int_at_least(1), default=None, help='override the number of blocks')
    g.add_argument('--num-heads', type=int_at_least(1), default=None, help='override the number of heads')
    g.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='more timm.create_model overrides, values as Python literals '
                        '(e.g. fine_pos_embed_without_selection=True)')
    g.add_argument('--drop', type=float_in(0, 1, high_open=True), default=0.0, help='dropout rate')
    g.add_argument('--drop-path', '--drop_path', type=float_in(0, 1, high_open=True), default=0.1,
                   help='stochastic depth rate')
    g.add_argument('--selection-start-epoch', type=int_at_least(-1), default=200,
                   help='informative selection is off while the 0-based epoch is <= this, on afterwards '
                        '(the paper: 200)')
    g.add_argument('--model-ema', action=bool_flag, default=True, help='keep an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float_in(0, 1), default=0.99996)
    g.add_argument('--model-ema-force-cpu', action='store_true', help='keep the EMA on the CPU')

    g = parser.add_argument_group('optimizer and schedule')
    g.add_argument('--opt', default='adamw', help='timm optimizer name')
    g.add_argument('--opt-eps', type=float_in(0, low_open=True), default=1e-8)
    g.add_argument('--opt-betas', type=float_in(0, 1, high_open=True), nargs='+', default=None)
    g.add_argument('--momentum', type=float_in(0, 1), default=0.9)
    g.add_argument('--weight-decay', type=float_in(0), default=0.05)
    g.add_argument('--exempt-pos-embed-from-wd', action='store_true',
                   help='exempt pos_embed_list.0/.1 from weight decay (the release decayed them; see '
                        'CFVisionTransformer.no_weight_decay)')
    g.add_argument('--clip-grad', type=float_in(0, low_open=True), default=None,
                   help='clip gradients to this norm (default: off)')
    g.add_argument('--clip-mode', choices=('norm', 'value'), default='norm')
    g.add_argument('--sched', default='cosine', help='timm scheduler name')
    g.add_argument('--sched-step', choices=SCHED_STEPS, default='epoch',
                   help="what the per-epoch scheduler is stepped with after epoch E: 'epoch' = step(E), the "
                        "released main_deit.py (epochs 0 and 1 at --warmup-lr, the peak one epoch later); "
                        "'next-epoch' = step(E + 1), timm's train.py and the released main_lvvit.py")
    g.add_argument('--lr', type=float_in(0, low_open=True), default=5e-4,
                   help=f'learning rate at {int(LR_REFERENCE_BATCH)} images per step')
    g.add_argument('--unscale-lr', action='store_true', help='use --lr as is, without the linear scaling rule')
    g.add_argument('--lr-noise', type=finite_float, nargs='+', default=None)
    g.add_argument('--lr-noise-pct', type=float_in(0), default=0.67)
    g.add_argument('--lr-noise-std', type=float_in(0), default=1.0)
    g.add_argument('--warmup-lr', type=float_in(0), default=1e-6)
    g.add_argument('--min-lr', type=float_in(0), default=1e-5)
    g.add_argument('--decay-epochs', type=float_in(0, low_open=True), default=30)
    g.add_argument('--warmup-epochs', type=int_at_least(0), default=5)
    g.add_argument('--cooldown-epochs', type=int_at_least(0), default=10)
    g.add_argument('--patience-epochs', type=int_at_least(0), default=10)
    g.add_argument('--decay-rate', '--dr', type=float_in(0), default=0.1)

    g = parser.add_argument_group('augmentation')
    g.add_argument('--color-jitter', type=float_in(0), default=0.4, help='(unused while --aa is on)')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help='timm auto-augment policy, "none" for none')
    g.add_argument('--smoothing', type=float_in(0, 1, high_open=True), default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', default='bicubic')
    g.add_argument('--crop-scale', type=float_in(0, 1, low_open=True), nargs=2, default=(0.08, 1.0),
                   metavar=('MIN', 'MAX'),
                   help='area range of the random-resized crop (timm default 0.08 1.0)')
    g.add_argument('--repeated-aug', action=bool_flag, default=True,
                   help='repeated augmentation (timm RepeatAugSampler, 3 repeats)')
    g.add_argument('--reprob', type=float_in(0, 1), default=0.25, help='random erasing probability')
    g.add_argument('--remode', default='pixel', help='random erasing mode')
    g.add_argument('--recount', type=int_at_least(1), default=1, help='random erasing count')
    g.add_argument('--mixup', type=float_in(0), default=0.8, help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=float_in(0), default=1.0, help='cutmix alpha (0: off)')
    g.add_argument('--cutmix-minmax', type=float_in(0, 1), nargs=2, default=None)
    g.add_argument('--mixup-prob', type=float_in(0, 1), default=1.0)
    g.add_argument('--mixup-switch-prob', type=float_in(0, 1), default=0.5)
    g.add_argument('--mixup-mode', choices=('batch', 'pair', 'elem'), default='batch')

    g = parser.add_argument_group('weights')
    g.add_argument('--finetune', default='', help='start from these weights (head and grids adapted)')
    g.add_argument('--resume', default='', help='continue from this checkpoint (or evaluate it with --eval)')
    g.add_argument('--unsafe-load', action='store_true',
                   help='allow full unpickling of a checkpoint you trust (never needed for ours)')

    g = parser.add_argument_group('data')
    g.add_argument('--data-path', '--data_path', default=None, help='dataset root')
    g.add_argument('--data-set', '--data_set', default='IMNET', type=str.upper, choices=DATA_SETS)
    g.add_argument('--inat-category', default='name',
                   choices=('kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name'))
    g.add_argument('--subset', type=int_at_least(1), default=None,
                   help='debug: use at most this many images of each split, evenly spaced')
    g.add_argument('--num_workers', '--num-workers', type=int_at_least(0), default=10)
    g.add_argument('--pin-mem', action=bool_flag, default=True, help='pin loader memory (CUDA only)')

    g = parser.add_argument_group('distributed')
    g.add_argument('--world_size', '--world-size', type=int_at_least(1), default=1,
                   help='number of processes (read from the launcher when it sets WORLD_SIZE)')
    g.add_argument('--dist_url', '--dist-url', default='env://')
    g.add_argument('--local_rank', '--local-rank', type=int, default=None,
                   help='set by torch.distributed.launch (LOCAL_RANK in the environment wins)')
    # Tests only: every process writes a digest of its final weights to PATH.rank<r>.json.
    g.add_argument('--debug-weights-digest', default=None, help=argparse.SUPPRESS)
    return parser


def parse_model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """``['depth=4', 'fine_pos_embed_without_selection=True']`` -> ``{'depth': 4, ...}``."""
    try:
        return _parse_model_kwargs(items)
    except ValueError as e:
        raise ConfigError(str(e)) from e


# ---------------------------------------------------------------------------------------------- building
def build_model(args: argparse.Namespace, num_classes: int, dense: bool = False) -> nn.Module:
    """The CF model of ``--model`` at ``--coarse-stage-size`` with the requested overrides.

    ``dense``: the caller trains with token labeling (main_lvvit.py), so the model must be one
    whose training outputs are dense (CF-LV-ViT); False (CF-DeiT) for this script.
    """
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                                  coarse_stage_size=args.coarse_stage_size)
    for name in ('embed_dim', 'depth', 'num_heads'):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    kwargs.update(parse_model_kwargs(args.model_kwargs))
    if args.model not in timm.list_models('cf_*'):
        if args.model in timm.list_models() and not dense:
            # a plain baseline (e.g. deit_tiny_patch16_224) trained with the same recipe
            from models.baseline import create_baseline
            try:
                return create_baseline(args.model, **kwargs)
            except (TypeError, ValueError, AssertionError) as e:
                raise ConfigError(f'cannot build the baseline {args.model} with {kwargs}: {e}') from e
        raise ConfigError(f'unknown --model {args.model!r}; registered: {", ".join(timm.list_models("cf_*"))}')
    model = create_model_checked(args.model, error=ConfigError, pretrained=False, **kwargs)
    if getattr(model, 'return_dense', False) and not dense:
        raise ConfigError(f'{args.model} trains with token labeling: use main_lvvit.py')
    if dense and not getattr(model, 'return_dense', False):
        raise ConfigError(f'{args.model} has no token outputs for token labeling: use main_deit.py')
    return model


def load_finetune_weights(model: nn.Module, path: str, unsafe: bool = False) -> None:
    """Load ``path`` for fine-tuning: a head of another class count is left fresh, position
    embeddings of another grid are resampled; anything else that does not fit is an error."""
    state_dict = extract_state_dict(load_checkpoint_file(path, unsafe=unsafe))
    own = model.state_dict()
    fresh: List[str] = []
    for key in list(state_dict):
        if key not in own or state_dict[key].shape == own[key].shape:
            continue
        if key.split('.')[0] in ('head', 'aux_head'):
            fresh.append(key)
            del state_dict[key]
        elif key.startswith('pos_embed_list.'):
            grid = model.coarse_grid if key.endswith('.0') else model.fine_grid
            state_dict[key] = resample_abs_pos_embed(state_dict[key], new_size=list(grid), num_prefix_tokens=1)
            _logger.info('resampled %s to the %dx%d grid', key, *grid)
    problem = check_state_dict(model, {**{k: own[k] for k in fresh}, **state_dict})
    if problem is not None:
        raise CheckpointError(f'--finetune {path} does not fit {model.pretrained_cfg["architecture"]}: {problem}')
    model.load_state_dict(state_dict, strict=False)
    if fresh:
        _logger.info('fine-tuning from %s; new (randomly initialized): %s', path, ', '.join(fresh))
    else:
        _logger.info('fine-tuning from %s; every weight loaded', path)


class ShardSampler(Sampler):
    """Every ``world_size``-th index from ``rank``: disjoint shards, no padding (exact evaluation)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, len(dataset), world_size))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _seed_worker(worker_id: int) -> None:
    """Seed NumPy in a loader worker (torch and ``random`` are seeded by the loader itself); stop signals
    are left to the main process."""
    np.random.seed(torch.initial_seed() % (2 ** 32))
    quiet_worker_signals(worker_id)


def build_loaders(args: argparse.Namespace, info: DistInfo, train_set: Optional[Dataset],
                  val_set: Dataset) -> Tuple[Optional[DataLoader], DataLoader]:
    """Training loader (repeated augmentation or shuffled shards, full batches; None without a
    training set) and validation loader (disjoint unpadded shards with ``--dist-eval``; unreadable
    images skipped and counted). Unreadable training images are replaced by the dataset itself."""
    pin = args.pin_mem and info.device.type == 'cuda'
    common: Dict[str, Any] = dict(num_workers=args.num_workers, pin_memory=pin, worker_init_fn=_seed_worker)
    if info.distributed and args.dist_eval:
        val_sampler: Sampler = ShardSampler(val_set, info.rank, info.world_size)
    else:
        val_sampler = SequentialSampler(val_set)
    val_loader = DataLoader(val_set, sampler=val_sampler, batch_size=int(EVAL_BATCH_FACTOR * args.batch_size),
                            drop_last=False, collate_fn=collate_skipping, **common)
    if train_set is None:
        return None, val_loader
    if args.repeated_aug:
        train_sampler: Sampler = RepeatAugSampler(train_set, num_replicas=info.world_size, rank=info.rank,
                                                  shuffle=True)
    elif info.distributed:
        train_sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                           seed=args.seed)
    else:
        train_sampler = RandomSampler(train_set)
    train_loader = DataLoader(train_set, sampler=train_sampler, batch_size=args.batch_size, drop_last=True, **common)
    if len(train_loader) == 0:
        raise DatasetError(
            f'the training split gives {len(train_sampler)} images per process per epoch, fewer than '
            f'--batch-size {args.batch_size} (incomplete batches are dropped): lower --batch-size')
    return train_loader, val_loader


def build_criterion(args: argparse.Namespace, num_classes: int) -> Tuple[CFViTLoss, Optional[Mixup]]:
    """The CF-ViT loss around the DeiT criterion, and the mixup/cutmix batch transform (or None)."""
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    mixup_fn = None
    if mixup_active:
        if args.batch_size % 2:
            raise ConfigError(f'mixup/cutmix pair up images: --batch-size must be even, got {args.batch_size}')
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        base: nn.Module = SoftTargetCrossEntropy()  # mixup makes the (smoothed) soft targets
    elif args.smoothing > 0:
        base = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base = nn.CrossEntropyLoss()
    return CFViTLoss(base), mixup_fn


def build_optimizer(args: argparse.Namespace, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
    """AdamW (``--opt``) with the linear lr scaling rule and the release's weight-decay exemptions."""
    lr = args.lr if args.unscale_lr else args.lr * args.batch_size * world_size / LR_REFERENCE_BATCH
    no_decay = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    if args.exempt_pos_embed_from_wd:
        # The release's list named 'pos_embed_list', which matches no parameter exactly; match the items.
        no_decay |= {'pos_embed_list.*'}
    group_fn = partial(param_groups_weight_decay, weight_decay=args.weight_decay, no_weight_decay_list=no_decay)
    opt_kwargs: Dict[str, Any] = {}
    if args.opt_eps is not None:
        opt_kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs['betas'] = tuple(args.opt_betas)
    _logger.info('optimizer %s, lr %.3e (base %.3e at %d images per step), weight decay %g',
                 args.opt, lr, args.lr, args.batch_size * world_size, args.weight_decay)
    return create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                               param_group_fn=group_fn, **opt_kwargs)


def build_amp(args: argparse.Namespace, device: torch.device) -> AmpConfig:
    """Autocast dtype and (float16 only) gradient scaler; the log says which precision."""
    enabled = args.amp if args.amp is not None else device.type == 'cuda'
    amp = AmpConfig()
    if enabled:
        dtype = getattr(torch, args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16'))
        amp = AmpConfig(dtype=dtype, scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None)
    _logger.info('precision: %s', f'autocast {str(amp.dtype).replace("torch.", "")}' + (
        ' with a gradient scaler' if amp.scaler is not None else '') if amp.enabled else 'float32')
    return amp


def set_selection(enabled: bool, *models_: Optional[nn.Module]) -> None:
    """Switch informative selection of every given model (the model and its EMA)."""
    for m in models_:
        if m is not None:
            m.set_informative_selection(enabled)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state_dict (names and raw bytes), for comparing processes."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- run
def setup_process(args: argparse.Namespace) -> Tuple[DistInfo, torch.device, Optional[Path]]:
    """Distributed set-up, logging, determinism flags, and the output folder (checked by rank 0,
    agreed by all processes). Shared by the training scripts."""
    info = init_distributed(args.device, args.dist_url, args.local_rank, args.world_size)
    setup_logging(info.rank == 0)
    device = info.device
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = not args.deterministic
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if info.distributed:
        _logger.info('distributed: %d processes, %s backend', info.world_size, info.backend)
    output_dir: Optional[Path] = Path(args.output_dir) if args.output_dir else None
    problem = None
    if output_dir is not None and info.rank == 0:
        try:
            check_outside_inputs(output_dir, input_folders(args))
            check_writable_dir(output_dir)
            if not getattr(args, 'eval', False):  # one training run per folder (--eval writes nothing there)
                RunLock(output_dir)
        except OutputDirError as e:
            problem = str(e)
        else:
            if not getattr(args, 'eval', False):  # left by a run killed while saving (SIGKILL, power loss)
                stale = remove_stale_temp_files(output_dir, (CHECKPOINT_NAME, BEST_CHECKPOINT_NAME, LOG_NAME),
                                                keep=(args.resume, args.finetune))  # never a file the user named
                if stale:
                    _logger.info('removed %d temporary files of an interrupted save in %s', len(stale), output_dir)
    if not all_agree(problem is None):
        raise OutputDirError(problem or 'the main process cannot write the output folder')
    return info, device, output_dir


def input_folders(args: argparse.Namespace) -> List[Optional[str]]:
    """The data folders a run reads (its output folder may not be inside them)."""
    return [getattr(args, 'data_path', None), getattr(args, 'data_dir', None), getattr(args, 'token_label_data', None)]


def load_datasets(args: argparse.Namespace) -> Tuple[Optional[Dataset], Dataset, int]:
    """``(train_set or None with --eval, val_set, num_classes)``, after seeding every process alike."""
    seed_everything(args.seed)  # the same on every process: identical initial weights
    train_set, num_classes = build_dataset(True, args) if not args.eval else (None, None)
    val_set, val_classes = build_dataset(False, args)
    if train_set is not None:
        check_same_classes(train_set, val_set)
    return train_set, val_set, num_classes or val_classes


def run(args: argparse.Namespace) -> None:
    """Train (or with ``--eval`` evaluate) as the flags say. Raises the errors of :data:`USER_ERRORS`."""
    info, device, output_dir = setup_process(args)
    train_set, val_set, num_classes = load_datasets(args)

    model = build_model(args, num_classes)
    if train_set is not None:
        attach_transform(train_set, build_transform(True, args, model))
    attach_transform(val_set, build_transform(False, args, model))
    if args.finetune:
        load_finetune_weights(model, args.finetune, unsafe=args.unsafe_load)
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _logger.info('%s, %d classes, input %s, %.2fM parameters', args.model, num_classes, model.img_size_list,
                 n_parameters / 1e6)

    amp = build_amp(args, device)
    if args.eval:
        evaluate_only(args, info, model, val_set, amp)
        return

    train_loader, val_loader = build_loaders(args, info, train_set, val_set)
    model_ema = build_ema(args, model)
    if info.distributed:
        # find_unused_parameters: while selection is off, the released CF-DeiT's fine stage leaves
        # pos_embed_list.1 out of the graph (SPEC 4.4), so some parameters get no gradient.
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, find_unused_parameters=True)
    optimizer = build_optimizer(args, model_without_ddp, info.world_size)
    criterion, mixup_fn = build_criterion(args, num_classes)
    fit(TrainingRun(args, info, output_dir, model, model_without_ddp, model_ema, optimizer,
                    build_scheduler(args, optimizer), amp, criterion, mixup_fn, train_loader, val_loader, n_parameters))


# ---------------------------------------------------------------------------------------------- shared by main_lvvit
def evaluate_only(args: argparse.Namespace, info: DistInfo, model: nn.Module, val_set: Dataset,
                  amp: AmpConfig) -> None:
    """``--eval``: load ``--resume`` (or keep the ``--finetune``/initial weights), evaluate both
    stages with informative selection, log the result and print it as one JSON line."""
    _, val_loader = build_loaders(args, info, None, val_set)
    if args.resume:
        load_model_weights(model, args.resume, unsafe=args.unsafe_load)
    else:
        _logger.warning('--eval without --resume evaluates %s', 'the --finetune weights' if args.finetune
                        else 'randomly initialized weights')
    set_selection(True, model)  # inference always uses informative selection
    stats = evaluate(model, val_loader, info.device, amp, reduce_over_processes=info.distributed and args.dist_eval,
                     progress=info.rank == 0)
    _logger.info('evaluation: %s', format_eval(stats))
    if info.rank == 0:
        print(json.dumps({'coarse_acc1': stats['coarse_acc1'], 'fine_acc1': stats['fine_acc1'],
                          'num_samples': stats['num_samples']}))


def build_ema(args: argparse.Namespace, model: nn.Module) -> Optional[ModelEmaV3]:
    """timm's ModelEmaV3 of ``model`` with ``--model-ema``, else None."""
    if not args.model_ema:
        return None
    return ModelEmaV3(model, decay=args.model_ema_decay,
                      device=torch.device('cpu') if args.model_ema_force_cpu else None)


def step_scheduler(lr_scheduler: Any, args: argparse.Namespace, finished_epoch: int,
                   metric: Optional[float] = None) -> None:
    """Step the per-epoch scheduler after ``finished_epoch`` (also on resume, for the epoch the checkpoint
    finished), with ``--sched-step``'s rule: ``step(E)`` as the released main_deit.py, or ``step(E + 1)``."""
    lr_scheduler.step(finished_epoch + SCHED_STEPS[args.sched_step], metric)


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer) -> Any:
    """timm's scheduler from the ``--sched`` flags (stepped once per epoch, see ``--sched-step``)."""
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
        noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed)
    return lr_scheduler


@dataclass
class TrainingRun:
    """What the epoch loop (:func:`fit`) needs; ``main_deit.run`` and ``main_lvvit.run`` build it.

    ``model`` may be DDP-wrapped, ``model_without_ddp`` is the module itself. With ``ema_eval`` the
    EMA is evaluated every epoch too and epochs are ranked by its ``metric_key`` (the released
    CF-LV-ViT run); ``eval_metric`` names the ranking in the log and checkpoint (None: fine top-1,
    the DeiT release). ``after_train_epoch`` runs after each epoch's training (e.g. BatchNorm sync).
    """
    args: argparse.Namespace
    info: DistInfo
    output_dir: Optional[Path]
    model: nn.Module
    model_without_ddp: nn.Module
    model_ema: Optional[ModelEmaV3]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    amp: AmpConfig
    criterion: Any
    batch_transform: Any
    train_loader: DataLoader
    val_loader: DataLoader
    n_parameters: int
    ema_eval: bool = False
    metric_key: str = 'fine_acc1'
    eval_metric: Optional[str] = None
    after_train_epoch: Optional[Any] = None


def fit(run: TrainingRun) -> None:
    """Resume if asked, then train and evaluate epoch by epoch, writing the checkpoint, the best
    checkpoint, ``log.txt`` and TensorBoard scalars on the main process. Every process stops together
    when the outputs cannot be written."""
    args, info, output_dir = run.args, run.info, run.output_dir
    model_ema, lr_scheduler, amp = run.model_ema, run.lr_scheduler, run.amp
    start_epoch, best_metric = args.start_epoch, -1.0  # the first epoch's checkpoint is always a best one
    if args.resume:
        start_epoch, best_metric = resume(args, run.model_without_ddp, model_ema, run.optimizer, lr_scheduler, amp)
    if lr_scheduler is not None and start_epoch > 0:
        step_scheduler(lr_scheduler, args, start_epoch - 1)
    metric_name = run.eval_metric or 'fine top-1'

    writer = None
    if output_dir is not None and info.rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR))
    end_epoch = args.epochs if args.stop_at_epoch is None else min(args.epochs, args.stop_at_epoch)
    _logger.info('training epochs %d..%d of %d, %d steps each; best checkpoint by %s%s', start_epoch,
                 end_epoch - 1, args.epochs, len(run.train_loader), metric_name, ' of the EMA' if run.ema_eval else '')
    started = time.time()
    try:
        for epoch in range(start_epoch, end_epoch):
            seed_everything(epoch_seed(args.seed, epoch, info.rank, info.world_size))
            if hasattr(run.train_loader.sampler, 'set_epoch'):
                run.train_loader.sampler.set_epoch(epoch)
            selection = epoch > args.selection_start_epoch
            set_selection(selection, run.model_without_ddp, model_ema.module if model_ema is not None else None)

            train_stats = train_one_epoch(
                run.model, run.criterion, run.train_loader, run.optimizer, info.device, epoch, amp=amp,
                clip_grad=args.clip_grad, clip_mode=args.clip_mode, model_ema=model_ema,
                batch_transform=run.batch_transform, lr_scheduler=lr_scheduler, log_writer=writer,
                print_freq=args.print_freq, progress=info.rank == 0)
            if run.after_train_epoch is not None:
                run.after_train_epoch()
            reduce = info.distributed and args.dist_eval
            test_stats = evaluate(run.model_without_ddp, run.val_loader, info.device, amp,
                                  reduce_over_processes=reduce, progress=info.rank == 0)
            ema_stats = evaluate(model_ema.module, run.val_loader, info.device, amp, reduce_over_processes=reduce,
                                 progress=info.rank == 0) if run.ema_eval else None
            metric = (ema_stats or test_stats)[run.metric_key]
            if lr_scheduler is not None:
                step_scheduler(lr_scheduler, args, epoch, metric)
            is_best = metric > best_metric
            best_metric = max(best_metric, metric)
            _logger.info('epoch %d: %s%s | best %s %.3f', epoch, format_eval(test_stats),
                         f' | EMA: {format_eval(ema_stats)}' if ema_stats else '', metric_name, best_metric)

            record: Dict[str, Any] = {
                'epoch': epoch, **{f'train_{k}': v for k, v in train_stats.items()},
                **{f'test_{k}': v for k, v in test_stats.items()},
                **{f'test_ema_{k}': v for k, v in (ema_stats or {}).items()}}
            if run.eval_metric:
                record.update(eval_metric=run.eval_metric, best_metric=best_metric)
            record.update(informative_selection=selection, n_parameters=run.n_parameters)
            problem = None
            if output_dir is not None and info.rank == 0:
                checkpoint = {
                    'model': run.model_without_ddp.state_dict(),
                    'optimizer': run.optimizer.state_dict(),
                    'lr_scheduler': lr_scheduler.state_dict() if lr_scheduler is not None else None,
                    'epoch': epoch,
                    'model_ema': model_ema.module.state_dict() if model_ema is not None else None,
                    'scaler': amp.scaler.state_dict() if amp.scaler is not None else None,
                    'args': args,
                    'coarse_acc1': test_stats['coarse_acc1'],
                    'fine_acc1': test_stats['fine_acc1'],
                    **({'eval_metric': run.eval_metric} if run.eval_metric else {}),
                    'max_fine_acc1': best_metric,  # resume() restores the best-so-far value from this key
                }
                try:
                    write_epoch_outputs(output_dir, writer, checkpoint, is_best, record)
                except OSError as e:
                    problem = f'cannot write the epoch {epoch} outputs to {output_dir}: {e.strerror or e}'
            if not all_agree(problem is None):  # every process stops together
                raise OutputDirError(problem or 'the main process could not write its outputs')
    finally:
        if writer is not None:
            writer.close()
    _logger.info('done in %.1f s; best %s %.3f', time.time() - started, metric_name, best_metric)
    if args.debug_weights_digest:
        digest = {'rank': info.rank, 'model': weights_digest(run.model_without_ddp),
                  'model_ema': weights_digest(model_ema.module) if model_ema is not None else None}
        Path(f'{args.debug_weights_digest}.rank{info.rank}.json').write_text(json.dumps(digest))


def write_epoch_outputs(output_dir: Path, writer: Any, checkpoint: Dict[str, Any], is_best: bool,
                        record: Dict[str, Any]) -> None:
    """Main process, end of an epoch: ``checkpoint.pth`` (atomic), ``best_checkpoint.pth`` (an
    atomic copy when the fine top-1 improved), one line in ``log.txt``, TensorBoard scalars."""
    save_atomic(checkpoint, output_dir / CHECKPOINT_NAME)
    if is_best:
        copy_atomic(output_dir / CHECKPOINT_NAME, output_dir / BEST_CHECKPOINT_NAME)
    append_json_line(output_dir / LOG_NAME, record)
    epoch = record['epoch']
    for key, value in record.items():
        if key.startswith('train_'):
            writer.add_scalar(f'train/{key[len("train_"):]}', value, epoch)
    for key in ('loss', 'coarse_acc1', 'fine_acc1', 'coarse_acc5', 'fine_acc5'):
        writer.add_scalar(f'test/{key}', record[f'test_{key}'], epoch)
        if f'test_ema_{key}' in record:  # the EMA's evaluation (main_lvvit)
            writer.add_scalar(f'test_ema/{key}', record[f'test_ema_{key}'], epoch)
    writer.flush()


def resume(args: argparse.Namespace, model: nn.Module, model_ema: Optional[ModelEmaV3],
           optimizer: torch.optim.Optimizer, lr_scheduler: Optional[Any], amp: AmpConfig) -> Tuple[int, float]:
    """Restore a training checkpoint (or only the weights of a released one).

    Returns:
        ``(first epoch to run, best fine top-1 so far)``.
    """
    if args.resume.startswith(('http://', 'https://')):
        raise ConfigError('--resume takes a local file; download it first (nothing is downloaded at run time)')
    checkpoint = load_model_weights(model, args.resume, unsafe=args.unsafe_load)
    if not all(checkpoint.get(k) is not None for k in ('optimizer', 'epoch')):
        _logger.info('resumed the weights of %s (no training state in it): starting at epoch %d',
                     args.resume, args.start_epoch)
        return args.start_epoch, -1.0
    check_optimizer_state(checkpoint['optimizer'], optimizer, args.resume, _recorded(checkpoint, 'opt'), args.opt)
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
        if lr_scheduler is not None and checkpoint.get('lr_scheduler') is not None:
            lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f'the optimizer state in {args.resume} does not fit this run ({e}); '
                              f'check --opt and the model flags') from e
    if model_ema is not None:
        if checkpoint.get('model_ema') is not None:
            load_model_weights(model_ema.module, checkpoint, key='model_ema')
        else:
            _logger.warning('%s has no EMA weights: the EMA restarts from the model weights', args.resume)
            model_ema.module.load_state_dict(model.state_dict())
    if amp.scaler is not None and checkpoint.get('scaler') is not None:
        amp.scaler.load_state_dict(checkpoint['scaler'])
    epoch = int(checkpoint['epoch']) + 1
    _logger.info('resumed %s: continuing at epoch %d', args.resume, epoch)
    return epoch, float(checkpoint.get('max_fine_acc1', -1.0))


def _recorded(checkpoint: Dict[str, Any], name: str) -> Any:
    """A training flag recorded in a checkpoint's ``args`` (None when absent)."""
    args = checkpoint.get('args')
    return args.get(name) if isinstance(args, dict) else getattr(args, name, None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: parse, run, and turn bad input into one clear message and a non-zero exit code."""
    parser = argparse.ArgumentParser('CF-DeiT training and evaluation', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    return run_main(run, args)


def user_message(error: BaseException) -> str:
    """The message of a user error; for one re-raised from a loader worker, without the traceback."""
    text = str(error)
    if 'Original Traceback' in text:  # torch.utils.data re-raises worker errors with the traceback inside
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(': ', 1)[1] if ': ' in last else last
    return text


def run_main(run_fn: Any, args: argparse.Namespace) -> int:
    """Run ``run_fn(args)``; bad input, a non-finite loss, SIGINT or SIGTERM become one message and an exit
    code (2, 1, 130, 143). Shared by the training scripts."""
    setup_logging(True)
    log_thread_os_errors()  # TensorBoard's writer thread on a full disk: one line, not its traceback
    code = 0
    with handle_stop_signals():  # SIGINT / SIGTERM: exit 130 / 143 (utils.signals)
        try:
            run_fn(args)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (utils.signals)
            _logger.error('interrupted; the last checkpoint (if any) is intact')
            code = exit_status(e)
        except Exception as e:
            if stop_requested() is not None:  # e.g. a loader worker's error while the run was stopping
                _logger.error('interrupted; the last checkpoint (if any) is intact')
                code = exit_status()
            elif isinstance(e, USER_ERRORS):
                _logger.error('%s', user_message(e))
                code = EXIT_BAD_INPUT
            elif isinstance(e, NonFiniteLossError):
                _logger.error('%s', e)
                code = EXIT_TRAINING_FAILED
            elif isinstance(e, OSError):  # e.g. a full disk outside the epoch outputs (which raise OutputDirError)
                _logger.error('%s; the last checkpoint (if any) is intact', describe_os_error(e, 'I/O error'))
                code = EXIT_BAD_INPUT
            else:
                raise
        finally:
            release_locks()
            cleanup()
            gc.collect()  # loaders (and their workers) referenced by a caught traceback end now, not at exit
    return code


if __name__ == '__main__':
    sys.exit(main())
