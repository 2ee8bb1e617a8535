"""What both training scripts (``main_deit.py``, ``main_lvvit.py``) set up and build before the epoch loop.

- the flags every training run reads, with the released DeiT recipe's defaults
  (:func:`get_args_parser`, reused by the scripts with ``parents=[...]``);
- the process set-up (distributed, logging, determinism, the output folder) and the data sets
  (:func:`setup_process`, :func:`load_datasets`);
- the builders: model (:func:`build_model`, :func:`load_finetune_weights`), loaders, optimizer,
  scheduler and its per-epoch step rule (:func:`step_scheduler`, ``--sched-step``), EMA, AMP;
- the entry-point error handling: bad input becomes one line and exit status 2 (:func:`run_main`).

The epoch loop around these (resume, checkpoints, ``log.txt``) is :mod:`utils.train_loop`; one
epoch and one evaluation pass are :mod:`utils.engine`.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.data.distributed_sampler import RepeatAugSampler
from timm.layers import resample_abs_pos_embed
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

import models  # noqa: F401  (registers the CF models with timm)
from datasets.build import DATA_SETS, build_dataset, check_same_classes
from datasets.folder import DatasetError, collate_skipping

from .checkpoint import (
    CheckpointError, check_state_dict, extract_state_dict, load_checkpoint_file, remove_stale_temp_files,
)
from .dist import (
    DistInfo, DistributedSetupError, PeerFailedError, all_agree, cleanup, default_device, init_distributed,
    seed_everything,
)
from .cuda import check_amp_dtype, describe_float32, set_tf32
from .engine import AmpConfig, NonFiniteLossError
from .preemption import EXIT_STOPPED, ResumableSampler, StopRequested
from .misc import (
    EXIT_BAD_INPUT, EXIT_FAILED, OutputDirError, check_writable_dir, default_workers, describe_os_error,
    log_thread_os_errors, positive_int, setup_logging, user_message,
)
from .misc import parse_model_kwargs as _parse_model_kwargs
from .run_folder import RunLock, check_outside_inputs, release_locks
from .signals import exit_status, handle_stop_signals, quiet_worker_signals, stop_requested
from .validation import BadInputError, create_model_checked, device_name, finite_float, float_in, int_at_least

_logger = logging.getLogger(__name__)

CHECKPOINT_NAME = 'checkpoint.pth'
#: The mid-epoch checkpoint of --save-interval-steps and of a stop request (SIGTERM).
STEP_CHECKPOINT_NAME = 'checkpoint_step.pth'
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


#: cuBLAS's documented setting for deterministic results (``--deterministic`` sets it when the environment has none).
DETERMINISTIC_CUBLAS_WORKSPACE = ':4096:8'


class ConfigError(RuntimeError):
    """Flags that cannot work together (message meant for a person)."""


USER_ERRORS = (ConfigError, DatasetError, CheckpointError, OutputDirError, DistributedSetupError, BadInputError)


# ---------------------------------------------------------------------------------------------- flags
def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """The flags of every training run: the DeiT recipe's, with the released main_deit.py's defaults, plus
    CF-ViT's. ``main_deit.py`` takes them as they are; ``main_lvvit.py`` adds TokenLabeling's spellings and
    LV-ViT defaults. Reusable with ``parents=[get_args_parser()]``."""
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
    g.add_argument('--tf32', action=bool_flag, default=None,
                   help='CUDA float32: --tf32 runs matmuls and cuDNN convolutions in TF32 (as the release\'s PyTorch '
                        '1.10 did on Ampere and newer), --no-tf32 in IEEE float32; default: PyTorch\'s (matmuls '
                        'IEEE, convolutions TF32). The log says which')

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
    g.add_argument('--grad-checkpointing', action='store_true',
                   help='recompute the blocks of both stages in the backward pass: less memory, same gradients')
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
    g.add_argument('--resume', default='',
                   help="continue from this checkpoint (or evaluate it with --eval); 'auto': from the output "
                        "folder's furthest readable checkpoint (checkpoint_step.pth, checkpoint.pth, "
                        "best_checkpoint.pth), or a new run when it has none: one command to resubmit")
    g.add_argument('--save-interval-steps', type=int, default=0, metavar='N',
                   help='also write checkpoint_step.pth every N optimizer steps (atomically), for an exact '
                        'mid-epoch resume after preemption; 0: only at the end of each epoch')
    g.add_argument('--unsafe-load', action='store_true',
                   help='allow full unpickling of a checkpoint you trust (never needed for ours)')

    g = parser.add_argument_group('data')
    g.add_argument('--data-path', '--data_path', default=None, help='dataset root')
    g.add_argument('--data-set', '--data_set', default='IMNET', type=str.upper, choices=DATA_SETS)
    g.add_argument('--inat-category', default='name',
                   choices=('kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name'))
    g.add_argument('--subset', type=int_at_least(1), default=None,
                   help='debug: use at most this many images of each split, evenly spaced')
    g.add_argument('--num_workers', '--num-workers', type=int_at_least(0), default=default_workers(10),
                   help='loader processes per training process (default: 10 as released, capped by the cores)')
    g.add_argument('--pin-mem', action=bool_flag, default=True, help='pin loader memory (CUDA only)')

    g = parser.add_argument_group('distributed')
    g.add_argument('--world_size', '--world-size', type=int_at_least(1), default=1,
                   help='number of processes (read from the launcher when it sets WORLD_SIZE)')
    g.add_argument('--dist_url', '--dist-url', default='env://')
    g.add_argument('--dist-timeout', type=float, default=30.0, metavar='MINUTES',
                   help='process-group timeout of a collective (a process that hangs without failing)')
    g.add_argument('--local_rank', '--local-rank', type=int, default=None,
                   help='set by torch.distributed.launch (LOCAL_RANK in the environment wins)')
    # Tests only: every process writes a digest of its final weights to PATH.rank<r>.json.
    g.add_argument('--debug-weights-digest', default=None, help=argparse.SUPPRESS)
    # Tests only: RANK:EPOCH:STEP:kill|data, a fault on the first attempt (utils.preemption.FaultInjection).
    g.add_argument('--debug-fault', default=None, help=argparse.SUPPRESS)
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
                baseline = create_baseline(args.model, **kwargs)
            except (TypeError, ValueError, AssertionError) as e:
                raise ConfigError(f'cannot build the baseline {args.model} with {kwargs}: {e}') from e
            baseline.set_grad_checkpointing(args.grad_checkpointing)
            return baseline
        raise ConfigError(f'unknown --model {args.model!r}; registered: {", ".join(timm.list_models("cf_*"))}')
    model = create_model_checked(args.model, error=ConfigError, pretrained=False, **kwargs)
    if getattr(model, 'return_dense', False) and not dense:
        raise ConfigError(f'{args.model} trains with token labeling: use main_lvvit.py')
    if dense and not getattr(model, 'return_dense', False):
        raise ConfigError(f'{args.model} has no token outputs for token labeling: use main_deit.py')
    if dense:
        model.dense_train_outputs = True  # training outputs for token labeling, as released
    model.set_grad_checkpointing(args.grad_checkpointing)
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
    train_loader = DataLoader(train_set, sampler=ResumableSampler(train_sampler), batch_size=args.batch_size,
                              drop_last=True, **common)
    if len(train_loader) == 0:
        raise DatasetError(
            f'the training split gives {len(train_sampler)} images per process per epoch, fewer than '
            f'--batch-size {args.batch_size} (incomplete batches are dropped): lower --batch-size')
    return train_loader, val_loader

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
    if args.unscale_lr:
        _logger.info('optimizer %s, lr %.3e (--unscale-lr: as given), weight decay %g', args.opt, lr, args.weight_decay)
    else:
        _logger.info('optimizer %s, lr %.3e = base %.3e x %d images per step / %d (the linear scaling rule), '
                     'weight decay %g', args.opt, lr, args.lr, args.batch_size * world_size, int(LR_REFERENCE_BATCH),
                     args.weight_decay)
    return create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                               param_group_fn=group_fn, **opt_kwargs)


def build_amp(args: argparse.Namespace, device: torch.device) -> AmpConfig:
    """Autocast dtype and (float16 only) gradient scaler; the log says which precision."""
    enabled = args.amp if args.amp is not None else device.type == 'cuda'
    amp = AmpConfig()
    if enabled:
        dtype = getattr(torch, args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16'))
        try:
            check_amp_dtype(dtype, device)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        amp = AmpConfig(dtype=dtype, scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None)
    _logger.info('precision: %s', f'autocast {str(amp.dtype).replace("torch.", "")}' + (
        ' with a gradient scaler' if amp.scaler is not None else '') if amp.enabled else 'float32')
    return amp


def set_selection(enabled: bool, *models_: Optional[nn.Module]) -> None:
    """Switch informative selection of every given model (the model and its EMA)."""
    for m in models_:
        if m is not None:
            m.set_informative_selection(enabled)


# ---------------------------------------------------------------------------------- run set-up, EMA, schedule
def setup_process(args: argparse.Namespace) -> Tuple[DistInfo, torch.device, Optional[Path]]:
    """Distributed set-up, logging, determinism flags, and the output folder (checked by rank 0,
    agreed by all processes). Shared by the training scripts."""
    if args.save_interval_steps < 0:
        raise ConfigError(f'--save-interval-steps must be >= 0, got {args.save_interval_steps}')
    if args.resume == 'auto' and (args.eval or not args.output_dir):
        raise ConfigError('--resume auto continues a training run in its --output_dir: give --output_dir '
                          '(and no --eval)')
    info = init_distributed(args.device, args.dist_url, args.local_rank, args.world_size,
                            timeout_minutes=args.dist_timeout)
    setup_logging(info.rank == 0)
    device = info.device
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = not args.deterministic
        set_tf32(getattr(args, 'tf32', None))
        _logger.info('%s', describe_float32(getattr(args, 'tf32', None)))
    if args.deterministic:
        if device.type == 'cuda' and not os.environ.get('CUBLAS_WORKSPACE_CONFIG'):
            # cuBLAS is deterministic only with a fixed workspace; read when its first handle is made (later)
            os.environ['CUBLAS_WORKSPACE_CONFIG'] = DETERMINISTIC_CUBLAS_WORKSPACE
            _logger.info('--deterministic: CUBLAS_WORKSPACE_CONFIG=%s set for this run', DETERMINISTIC_CUBLAS_WORKSPACE)
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
                stale = remove_stale_temp_files(
                    output_dir, (CHECKPOINT_NAME, BEST_CHECKPOINT_NAME, STEP_CHECKPOINT_NAME, LOG_NAME),
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


# ---------------------------------------------------------------------------------------------- entry point
def run_main(run_fn: Any, args: argparse.Namespace) -> int:
    """Run ``run_fn(args)``; bad input, a non-finite loss, SIGINT or SIGTERM become one message and an exit
    code (2, 1, 130, 143). Shared by the training scripts."""
    setup_logging(True)
    log_thread_os_errors()  # TensorBoard's writer thread on a full disk: one line, not its traceback
    code = 0
    # SIGTERM (a scheduler's preemption notice) is deferred to the next step boundary, where training writes
    # its mid-epoch checkpoint and exits 143 (utils.preemption); SIGINT ends the run at the next step, 130.
    with handle_stop_signals(deferred=(signal.SIGTERM,)):
        try:
            run_fn(args)
        except StopRequested:
            _logger.error('stopped on request (SIGTERM) at a step boundary%s', f'; {STEP_CHECKPOINT_NAME} in '
                          f'{args.output_dir} continues it with --resume auto' if args.output_dir else '')
            code = EXIT_STOPPED
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM outside the step loop (utils.signals)
            _logger.error('interrupted; the last checkpoint (if any) is intact')
            code = exit_status(e)
        except Exception as e:
            if isinstance(e, PeerFailedError):  # another process failed with its own message; this one stops with it
                _logger.error('%s', e)
                code = e.exit_code
            elif stop_requested() is not None:  # e.g. a loader worker's error while the run was stopping
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
