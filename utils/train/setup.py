"""What both training scripts (``main_deit.py``, ``main_lvvit.py``) set up and build before the epoch loop.

- the process set-up (distributed, logging, determinism, the output folder) and the data sets
  (:func:`setup_process`, :func:`load_datasets`);
- the builders: model (:func:`build_model_from_args`, :func:`load_finetune_weights`), loaders, optimizer,
  scheduler and its per-epoch step rule (:func:`step_scheduler`, ``--sched-step``), EMA, the mixup flags
  (:func:`mixup_active`, :func:`mixup_kwargs`); precision is :mod:`utils.common.precision`;
- the entry-point error handling: bad input becomes one line and exit status 2 (:func:`run_main`).

The flags are :mod:`utils.train.args`; the epoch loop around these (resume, checkpoints, ``log.txt``)
is :mod:`utils.train.loop`; one epoch and one evaluation pass are :mod:`utils.train.engine`.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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

from datasets.build import build_dataset, check_same_classes
from datasets.folder import DatasetError, collate_skipping
from datasets.safe_read import UnsafeFileError
import models  # noqa: F401  (registers the CF models with timm)
from models.cf_vit import CFVisionTransformer, WeightsNotFoundError
from models.convert import (
    CONVERTED_SWITCHES, ConversionError, convert_state_dict, is_cf_state_dict, plain_vit_state_dict, pretrained_overlay,
)
from utils.common.atomic import remove_stale_temp_files
from utils.common.checkpoint import check_state_dict, extract_state_dict, load_checkpoint_file
from utils.common.dist import DistInfo, all_agree, cleanup, init_distributed, seed_everything
from utils.common.entry import run_entry_point
from utils.common.errors import CheckpointError, ConfigError, OutputDirError, UserError
from utils.common.flags import busy_cpu_hint
from utils.common.flags import parse_model_kwargs as _parse_model_kwargs
from utils.common.logs import log_thread_os_errors, setup_logging
from utils.common.model_builder import (
    adopt_recorded_switches, check_flag_switches, create_model_checked, without_fixed_kwargs,
)
from utils.common.precision import describe_float32, set_tf32
from utils.common.run_folder import LOCK_NAME, check_fixed_names, prepare_output_dir, refuse_overwriting_inputs
from utils.common.signals import quiet_worker_signals
from utils.train.args import LR_REFERENCE_BATCH, SCHED_STEPS
from utils.train.checkpointing import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, LOG_NAME, STEP_CHECKPOINT_NAME
from utils.train.samplers import ResumableSampler, ShardSampler

_logger = logging.getLogger(__name__)

#: Evaluation batches are this much larger than training ones (no gradients to hold).
EVAL_BATCH_FACTOR = 1.5


#: What the training scripts report as bad input (exit 2): every user error, and unreadable data.
USER_ERRORS = (UserError, DatasetError, UnsafeFileError)

#: cuBLAS's documented setting for deterministic results (``--deterministic`` sets it when the environment has none).
DETERMINISTIC_CUBLAS_WORKSPACE = ':4096:8'


# ---------------------------------------------------------------------------------------------- model


def parse_model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """``['depth=4', 'fine_pos_embed_without_selection=True']`` -> ``{'depth': 4, ...}``."""
    try:
        return _parse_model_kwargs(items)
    except ValueError as e:
        raise ConfigError(str(e)) from e


# ---------------------------------------------------------------------------------------------- building
def build_model_from_args(args: argparse.Namespace, num_classes: int, dense: bool = False) -> nn.Module:
    """The CF model of ``--model`` at ``--coarse-stage-size`` with the requested overrides.

    ``dense``: the caller trains with token labeling (main_lvvit.py), so the model must be one
    whose training outputs are dense (CF-LV-ViT); False (CF-DeiT) for this script.
    """
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                                  coarse_stage_size=args.coarse_stage_size)
    for name in ('embed_dim', 'depth', 'num_heads'):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    fixed = {'num_classes': num_classes, 'coarse_stage_size': args.coarse_stage_size}
    extra = without_fixed_kwargs(parse_model_kwargs(args.model_kwargs), fixed, 'the data set and --coarse-stage-size')
    kwargs.update(extra)
    pretrained = getattr(args, 'pretrained', None)
    if args.model.split('.', 1)[0] not in timm.list_models('cf_*'):  # a CF model name may carry a pretrained tag
        if pretrained:
            raise ConfigError(f'--pretrained needs a CF model (cf_*), got --model {args.model}')
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
    if pretrained:
        if args.finetune:
            raise ConfigError('--pretrained and --finetune both choose the starting weights: give one')
        if isinstance(pretrained, str):  # a file: read here (weights_only), converted by the model's filter
            checkpoint = extract_state_dict(load_checkpoint_file(pretrained, unsafe=args.unsafe_load))
            try:
                kwargs['pretrained_cfg_overlay'] = pretrained_overlay(checkpoint)
            except ConversionError as e:
                raise ConfigError(f'--pretrained {pretrained}: {e}') from e
    try:
        model = create_model_checked(args.model, error=ConfigError, pretrained=bool(pretrained), **kwargs)
    except ConfigError as e:
        if not pretrained:
            raise
        # one line without the weights the overlay holds: the conversion's reason, or the loader's first lines
        cause = e.__cause__
        lines = [x.strip() for x in str(cause).splitlines() if x.strip()]
        why = str(cause) if isinstance(cause, (ConversionError, WeightsNotFoundError)) else \
            f'{type(cause).__name__}: {" ".join(lines[:2])}'
        if isinstance(cause, WeightsNotFoundError):
            why += ' (here: --pretrained FILE)'
        raise ConfigError(f'--pretrained{" " + pretrained if isinstance(pretrained, str) else ""} '
                          f'({args.model}): {why}') from cause
    if pretrained:
        check_flag_switches(model, extra, f'--pretrained{" " + pretrained if isinstance(pretrained, str) else ""}'
                                          ' (the weights it loads)')
        source_classes = kwargs.get('pretrained_cfg_overlay', model.pretrained_cfg).get('num_classes')
        _logger.info('%s: weights of %s%s', args.model, pretrained if isinstance(pretrained, str) else 'its pretrained tag',
                     f'; new (randomly initialized) head for {num_classes} classes (the weights have {source_classes})'
                     if source_classes != num_classes else '')
    if getattr(model, 'return_dense', False) and not dense:
        raise ConfigError(f'{args.model} trains with token labeling: use main_lvvit.py')
    if dense and not getattr(model, 'return_dense', False):
        raise ConfigError(f'{args.model} has no token outputs for token labeling: use main_deit.py')
    if dense:
        model.dense_train_outputs = True  # training outputs for token labeling, as released
    model.set_grad_checkpointing(args.grad_checkpointing)
    return model


def mixup_active(args: argparse.Namespace) -> bool:
    """Mixup or cutmix is on (``--mixup``, ``--cutmix`` above 0, or ``--cutmix-minmax``)."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def mixup_kwargs(args: argparse.Namespace, num_classes: int) -> Dict[str, Any]:
    """The arguments of timm's ``Mixup`` (and its token-labeling subclass) that the mixup/cutmix flags give."""
    return dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                num_classes=num_classes)


def load_finetune_weights(model: nn.Module, path: str, unsafe: bool = False, model_kwargs: Sequence[str] = ()) -> None:
    """Load ``path`` for fine-tuning: a head of another class count is left fresh, position
    embeddings of another grid are resampled; anything else that does not fit is an error.

    A plain timm ViT's weights (timm layout, or ``models.baseline.SingleStageBaseline``'s with its
    ``model.`` prefix) are made coarse-to-fine first (``models.convert``, which also turns on the
    model's ``fine_pos_embed_without_selection``); what cannot be converted is one line. A CF training
    checkpoint's recorded switches are taken over. ``model_kwargs`` (the flags) contradicting either is
    refused with one line."""
    checkpoint = load_checkpoint_file(path, unsafe=unsafe)
    state_dict = extract_state_dict(checkpoint)
    explicit = parse_model_kwargs(model_kwargs)
    if isinstance(model, CFVisionTransformer) and not is_cf_state_dict(state_dict) and (
            not model.return_dense or plain_vit_state_dict(state_dict) is not None):
        try:
            state_dict = convert_state_dict(state_dict, model)
        except ConversionError as e:
            raise CheckpointError(f'--finetune {path}: {e}') from e
        model.set_switches(**CONVERTED_SWITCHES)
        check_flag_switches(model, explicit, f'--finetune {path} (a plain ViT, converted)')
        _logger.info('--finetune %s: a plain ViT, converted to %s (%s)', path, model.pretrained_cfg['architecture'],
                     ', '.join(f'{k}={v}' for k, v in CONVERTED_SWITCHES.items()))
    elif isinstance(model, CFVisionTransformer):
        adopt_recorded_switches([model], checkpoint, explicit, f'--finetune {path}')
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
    if not args.eval and not args.resume and args.start_epoch >= args.epochs:
        raise ConfigError(f'nothing to train: --start_epoch {args.start_epoch} is not below --epochs {args.epochs} '
                          '(epochs count from 0)')
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
    hint = busy_cpu_hint(device) if info.rank == 0 else None
    if hint:
        _logger.info('%s', hint)
    output_dir: Optional[Path] = Path(args.output_dir) if args.output_dir else None
    problem = None
    if output_dir is not None and info.rank == 0:
        try:  # one training run per folder (--eval writes nothing there)
            prepare_output_dir(output_dir, input_folders(args), lock=None if getattr(args, 'eval', False) else LOCK_NAME)
            if not getattr(args, 'eval', False):
                outputs = (CHECKPOINT_NAME, BEST_CHECKPOINT_NAME, STEP_CHECKPOINT_NAME, LOG_NAME)
                check_fixed_names(output_dir, (LOG_NAME,))  # appended in place: never a link or a pipe
                refuse_overwriting_inputs([output_dir / n for n in outputs], [args.finetune])
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
    peak_epoch = args.warmup_epochs + 1 - SCHED_STEPS[args.sched_step]  # the first epoch at the full rate
    if args.warmup_epochs and args.epochs <= peak_epoch:
        _logger.warning('the whole run is learning-rate warm-up: the rate starts at --warmup-lr %g and would reach '
                        'the full rate at epoch %d (--warmup-epochs %d, --sched-step %s), but the last epoch is %d; '
                        'for a short run pass --warmup-epochs 0', args.warmup_lr, peak_epoch, args.warmup_epochs,
                        args.sched_step, args.epochs - 1)
    return lr_scheduler


# ---------------------------------------------------------------------------------------------- entry point
def end_process() -> None:
    """The last step of a training process: leave the process group, and end now the loaders (and their
    workers) that a caught traceback still references, not at interpreter exit."""
    cleanup()
    gc.collect()


def run_main(run_fn: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """The training scripts' ``main``: :func:`utils.common.entry.run_entry_point` with their settings. Bad input,
    a non-finite loss, SIGINT or SIGTERM become one log line and an exit code (2, 1, 130, 143). SIGTERM (a
    scheduler's preemption notice) is deferred to the next step boundary, where training writes its mid-epoch
    checkpoint and exits 143 (:mod:`utils.train.checkpointing`); SIGINT ends the run at the next step, 130."""
    setup_logging()
    log_thread_os_errors()  # TensorBoard's writer thread on a full disk: one line, not its traceback
    kept = '; the last checkpoint (if any) is intact'
    return run_entry_point(lambda: run_fn(args), writing='I/O error', kept=kept, interrupted='interrupted' + kept,
                           deferred=(signal.SIGTERM,), cleanup=end_process)
