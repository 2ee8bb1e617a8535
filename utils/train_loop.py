"""The epoch loop of both training scripts, around :mod:`utils.engine`'s epoch and evaluation pass.

- :func:`train_or_evaluate`: the common end of ``main_deit.run`` and ``main_lvvit.run`` (model to the
  device, parameter count, the ``--eval`` branch, EMA, the DDP wrap, optimizer, scheduler, :func:`fit`);
- :class:`TrainingRun` and :func:`fit`: resume, then train and evaluate epoch by epoch, writing
  ``checkpoint.pth`` (atomically), ``best_checkpoint.pth``, one JSON line in ``log.txt`` and TensorBoard
  scalars on the main process (:func:`write_epoch_outputs`);
- :func:`resume` and :func:`evaluate_only` (``--eval``).

The flags and builders these use are :mod:`utils.train_setup`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset

from .checkpoint import CheckpointError, load_model_weights, save_atomic
from .dist import DistInfo, all_agree, epoch_seed, seed_everything
from .engine import AmpConfig, evaluate, format_eval, train_one_epoch
from .misc import OutputDirError, append_json_line, copy_atomic
from .validation import check_optimizer_state
from .train_setup import (
    BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, LOG_NAME, TENSORBOARD_DIR, ConfigError, build_amp, build_ema,
    build_loaders, build_optimizer, build_scheduler, set_selection, step_scheduler,
)

_logger = logging.getLogger(__name__)


def train_or_evaluate(args: argparse.Namespace, info: DistInfo, output_dir: Optional[Path], model: nn.Module,
                      num_classes: int, train_set: Optional[Dataset], val_set: Dataset,
                      objective: Callable[[], Tuple[Any, Any]], *, find_unused_parameters: bool, summary: str = '',
                      ema_eval: bool = False, metric_key: str = 'fine_acc1', eval_metric: Optional[str] = None,
                      after_train_epoch: Optional[Callable[['TrainingRun'], None]] = None) -> None:
    """The end of both scripts' ``run``, once the model and data sets are built.

    Moves the model to the device, logs its parameter count (with ``summary`` appended), then either
    evaluates (``--eval``) or builds loaders, EMA, the DDP wrap (``find_unused_parameters``: whether some
    parameters may get no gradient), optimizer, ``objective()`` = ``(criterion, batch transform)`` and the
    scheduler, in this order, and runs :func:`fit`. The remaining arguments are :class:`TrainingRun`'s.
    """
    device = info.device
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _logger.info('%s, %d classes, input %s, %.2fM parameters%s', args.model, num_classes, model.img_size_list,
                 n_parameters / 1e6, f'; {summary}' if summary else '')

    amp = build_amp(args, device)
    if args.eval:
        evaluate_only(args, info, model, val_set, amp)
        return

    train_loader, val_loader = build_loaders(args, info, train_set, val_set)
    model_ema = build_ema(args, model)
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=find_unused_parameters)
    optimizer = build_optimizer(args, model_without_ddp, info.world_size)
    criterion, batch_transform = objective()
    fit(TrainingRun(args, info, output_dir, model, model_without_ddp, model_ema, optimizer,
                    build_scheduler(args, optimizer), amp, criterion, batch_transform, train_loader, val_loader,
                    n_parameters, ema_eval=ema_eval, metric_key=metric_key, eval_metric=eval_metric,
                    after_train_epoch=after_train_epoch))


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



@dataclass
class TrainingRun:
    """What the epoch loop (:func:`fit`) needs; :func:`train_or_evaluate` builds it.

    ``model`` may be DDP-wrapped, ``model_without_ddp`` is the module itself. With ``ema_eval`` the
    EMA is evaluated every epoch too and epochs are ranked by its ``metric_key`` (the released
    CF-LV-ViT run); ``eval_metric`` names the ranking in the log and checkpoint (None: fine top-1,
    the DeiT release). ``after_train_epoch(run)`` runs after each epoch's training (e.g. BatchNorm sync).
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
    after_train_epoch: Optional[Callable[['TrainingRun'], None]] = None


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
                run.after_train_epoch(run)
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

def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state_dict (names and raw bytes), for comparing processes."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
