"""The epoch loop of both training scripts, around :mod:`utils.engine`'s epoch and evaluation pass.

- :func:`train_or_evaluate`: the common end of ``main_deit.run`` and ``main_lvvit.run`` (model to the
  device, parameter count, the ``--eval`` branch, EMA, the DDP wrap, optimizer, scheduler, :func:`fit`);
- :class:`TrainingRun` and :func:`fit`: resume, then train and evaluate epoch by epoch, writing
  ``checkpoint.pth`` (atomically), ``best_checkpoint.pth``, one JSON line in ``log.txt`` and TensorBoard
  scalars on the main process (:func:`write_epoch_outputs`);
- :class:`StepCheckpointer`: the mid-epoch ``checkpoint_step.pth`` (``--save-interval-steps``, a stop request);
- :func:`resolve_resume` (``--resume auto``), :func:`resume` (also mid-epoch) and :func:`evaluate_only` (``--eval``).

The flags and builders these use are :mod:`utils.train_setup`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset

from .checkpoint import CheckpointError, load_model_weights, save_atomic
from . import preemption
from .dist import DistInfo, all_agree, broadcast_object, epoch_seed, gather_objects, seed_everything
from .engine import AmpConfig, evaluate, format_eval, train_one_epoch
from .misc import MetricMeter, OutputDirError, append_json_line, copy_atomic
from .preemption import FaultInjection, StopRequested, capture_rng_state, find_auto_resume, restore_rng_state
from .safe_io import check_scheduler_state, check_step_checkpoint
from .validation import check_optimizer_state
from .train_setup import (
    BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, LOG_NAME, STEP_CHECKPOINT_NAME, TENSORBOARD_DIR, ConfigError, build_amp,
    build_ema,
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
    when the outputs cannot be written. With ``--save-interval-steps`` (and on a stop request) the
    mid-epoch checkpoint is written too (:class:`StepCheckpointer`); a run resumed from it continues at
    the same sample with the same random state."""
    args, info, output_dir = run.args, run.info, run.output_dir
    model_ema, lr_scheduler, amp = run.model_ema, run.lr_scheduler, run.amp
    start_epoch, best_metric = args.start_epoch, -1.0  # the first epoch's checkpoint is always a best one
    mid_epoch: Optional[Dict[str, Any]] = None
    resume_from = resolve_resume(args, info, output_dir)
    if resume_from:
        start_epoch, best_metric, mid_epoch = resume(args, resume_from, run, info)
    if lr_scheduler is not None and start_epoch > 0:
        step_scheduler(lr_scheduler, args, start_epoch - 1)
    metric_name = run.eval_metric or 'fine top-1'
    fault = FaultInjection(args.debug_fault, info.rank) if args.debug_fault else None

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
            sampler = run.train_loader.sampler
            if hasattr(sampler, 'set_epoch'):
                sampler.set_epoch(epoch)
            start_step, meter = 0, None
            if mid_epoch is not None and epoch == start_epoch:  # the same order, from the same sample on
                start_step, meter = mid_epoch['step'], mid_epoch['meter']
                sampler.start_after(start_step * run.train_loader.batch_size,
                                    partial(restore_rng_state, mid_epoch['rng']))
            selection = epoch > args.selection_start_epoch
            set_selection(selection, run.model_without_ddp, model_ema.module if model_ema is not None else None)

            loader = fault.wrap(run.train_loader, epoch, start_step) if fault is not None else run.train_loader
            train_stats = train_one_epoch(
                run.model, run.criterion, loader, run.optimizer, info.device, epoch, amp=amp,
                clip_grad=args.clip_grad, clip_mode=args.clip_mode, model_ema=model_ema,
                batch_transform=run.batch_transform, lr_scheduler=lr_scheduler, log_writer=writer,
                print_freq=args.print_freq, progress=info.rank == 0, start_step=start_step, meter=meter,
                stop_requested=preemption.stop_requested,
                on_step_end=StepCheckpointer(run, epoch, len(run.train_loader), best_metric))
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
                    **training_state(run, epoch, best_metric),
                    'coarse_acc1': test_stats['coarse_acc1'],
                    'fine_acc1': test_stats['fine_acc1'],
                    **({'eval_metric': run.eval_metric} if run.eval_metric else {}),
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


def training_state(run: TrainingRun, epoch: int, best_metric: float) -> Dict[str, Any]:
    """What every training checkpoint holds (the released layout): weights, optimizer, scheduler, EMA,
    scaler, flags, the epoch, and the best metric so far (``max_fine_acc1``, which :func:`resume` restores)."""
    return {
        'model': run.model_without_ddp.state_dict(),
        'optimizer': run.optimizer.state_dict(),
        'lr_scheduler': run.lr_scheduler.state_dict() if run.lr_scheduler is not None else None,
        'epoch': epoch,
        'model_ema': run.model_ema.module.state_dict() if run.model_ema is not None else None,
        'scaler': run.amp.scaler.state_dict() if run.amp.scaler is not None else None,
        'args': run.args,
        'max_fine_acc1': best_metric,
    }


class StepCheckpointer:
    """``on_step_end`` of :func:`utils.engine.train_one_epoch`: writes ``checkpoint_step.pth`` every
    ``--save-interval-steps`` optimizer steps (counted over the run) and when a stop was requested, then
    on a stop raises :class:`StopRequested` (exit 143).

    The checkpoint is :func:`training_state` plus ``step_in_epoch`` (steps done in ``epoch``, which is the
    epoch in progress), ``steps_per_epoch``, ``world_size`` and, for every process, its RNG states and the
    running means of the epoch so far (``process_states``). Every process calls it at the same steps
    (the stop decision is agreed in the step's collective); the main process writes.
    """

    def __init__(self, run: TrainingRun, epoch: int, steps_per_epoch: int, best_metric: float) -> None:
        self.run, self.epoch, self.steps_per_epoch, self.best_metric = run, epoch, steps_per_epoch, best_metric

    def __call__(self, steps_done: int, meter: MetricMeter, stop: bool) -> None:
        run, interval = self.run, self.run.args.save_interval_steps
        due = interval > 0 and (self.epoch * self.steps_per_epoch + steps_done) % interval == 0
        if (due or stop) and run.output_dir is not None:
            mine = {'rng': capture_rng_state(), 'meter': {'sums': dict(meter.sums), 'counts': dict(meter.counts)}}
            states = gather_objects(mine)
            problem = None
            if run.info.rank == 0:
                checkpoint = {**training_state(run, self.epoch, self.best_metric), 'step_in_epoch': steps_done,
                              'steps_per_epoch': self.steps_per_epoch, 'world_size': run.info.world_size,
                              'process_states': states}
                try:
                    save_atomic(checkpoint, run.output_dir / STEP_CHECKPOINT_NAME)
                except OSError as e:
                    problem = f'cannot write {run.output_dir / STEP_CHECKPOINT_NAME}: {e.strerror or e}'
            if not all_agree(problem is None):
                raise OutputDirError(problem or 'the main process could not write its mid-epoch checkpoint')
            _logger.info('epoch %d, step %d/%d: wrote %s', self.epoch, steps_done, self.steps_per_epoch,
                         STEP_CHECKPOINT_NAME)
        if stop:
            raise StopRequested(f'stopped at epoch {self.epoch}, step {steps_done}')


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


def resolve_resume(args: argparse.Namespace, info: DistInfo, output_dir: Optional[Path]) -> str:
    """The file ``--resume`` names; for ``auto``, the main process's pick among the output folder's
    checkpoints (:func:`utils.preemption.find_auto_resume`, shared with every process), or '' for a new run."""
    if args.resume != 'auto':
        return args.resume
    problem, chosen = None, None
    if info.rank == 0:
        try:
            found = find_auto_resume(output_dir, (STEP_CHECKPOINT_NAME, CHECKPOINT_NAME, BEST_CHECKPOINT_NAME),
                                     info.world_size, unsafe=args.unsafe_load, batch_size=args.batch_size)
            chosen = str(found) if found is not None else ''
        except CheckpointError as e:
            problem = str(e)
    if not all_agree(problem is None):
        raise CheckpointError(problem or 'the main process found no checkpoint to continue from')
    chosen = broadcast_object(chosen)
    if not chosen:
        _logger.info('--resume auto: no checkpoint in %s, starting a new run', output_dir)
    return chosen


def resume(args: argparse.Namespace, path: str, run: TrainingRun,
           info: DistInfo) -> Tuple[int, float, Optional[Dict[str, Any]]]:
    """Restore a training checkpoint (or only the weights of a released one).

    Returns:
        ``(first epoch to run, best metric so far, mid-epoch state or None)``; the mid-epoch state of a
        ``checkpoint_step.pth`` is this process's ``{'step', 'rng', 'meter'}``.
    """
    model, model_ema, optimizer, lr_scheduler, amp = (run.model_without_ddp, run.model_ema, run.optimizer,
                                                      run.lr_scheduler, run.amp)
    if path.startswith(('http://', 'https://')):
        raise ConfigError('--resume takes a local file; download it first (nothing is downloaded at run time)')
    checkpoint = load_model_weights(model, path, unsafe=args.unsafe_load)
    if not all(checkpoint.get(k) is not None for k in ('optimizer', 'epoch')):
        _logger.info('resumed the weights of %s (no training state in it): starting at epoch %d',
                     path, args.start_epoch)
        return args.start_epoch, -1.0, None
    check_optimizer_state(checkpoint['optimizer'], optimizer, path, _recorded(checkpoint, 'opt'), args.opt)
    if lr_scheduler is not None and checkpoint.get('lr_scheduler') is not None:  # e.g. a string for a number
        check_scheduler_state(checkpoint['lr_scheduler'], lr_scheduler.state_dict(), f'{path}: lr_scheduler',
                              CheckpointError)
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
        if lr_scheduler is not None and checkpoint.get('lr_scheduler') is not None:
            lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f'the optimizer state in {path} does not fit this run ({e}); '
                              f'check --opt and the model flags') from e
    if model_ema is not None:
        if checkpoint.get('model_ema') is not None:
            load_model_weights(model_ema.module, checkpoint, key='model_ema')
        else:
            _logger.warning('%s has no EMA weights: the EMA restarts from the model weights', path)
            model_ema.module.load_state_dict(model.state_dict())
    if amp.scaler is not None and checkpoint.get('scaler') is not None:
        amp.scaler.load_state_dict(checkpoint['scaler'])
    best = float(checkpoint.get('max_fine_acc1', -1.0))
    if checkpoint.get('step_in_epoch') is None:
        epoch = int(checkpoint['epoch']) + 1
        _logger.info('resumed %s: continuing at epoch %d', path, epoch)
        return epoch, best, None
    epoch, step = int(checkpoint['epoch']), int(checkpoint['step_in_epoch'])
    if checkpoint.get('world_size') != info.world_size or checkpoint.get('steps_per_epoch') != len(run.train_loader):
        raise CheckpointError(
            f'{path} is a mid-epoch checkpoint of {checkpoint.get("world_size")} processes with '
            f'{checkpoint.get("steps_per_epoch")} steps per epoch; this run has {info.world_size} processes and '
            f'{len(run.train_loader)} steps: resume from {CHECKPOINT_NAME} instead (the epoch restarts)')
    check_step_checkpoint(checkpoint, info.world_size, len(run.train_loader), info.rank, capture_rng_state,
                          restore_rng_state, str(path), CheckpointError)  # position and states, before any use
    state = checkpoint['process_states'][info.rank]
    meter = MetricMeter()
    meter.sums.update(state['meter']['sums'])
    meter.counts.update(state['meter']['counts'])
    _logger.info('resumed %s: continuing epoch %d after step %d of %d', path, epoch, step, len(run.train_loader))
    return epoch, best, {'step': step, 'rng': state['rng'], 'meter': meter}



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
