"""The epoch loop of both training scripts, around :mod:`utils.train.engine`'s epoch and evaluation pass.

- :func:`train_or_evaluate`: the common end of ``main_deit.run`` and ``main_lvvit.run`` (model to the
  device, parameter count, the ``--eval`` branch, EMA, the DDP wrap, optimizer, scheduler, :func:`fit`);
- :func:`fit`: resume, then train and evaluate epoch by epoch, writing the checkpoints, ``log.txt`` and
  TensorBoard scalars on the main process (:mod:`utils.train.checkpointing`);
- :func:`evaluate_only` (``--eval``);
- :class:`FaultInjection`: the hidden ``--debug-fault`` of the tests (a rank SIGKILLed or failing on a
  data error at a given step, on the first attempt of a ``torchrun`` job only).

The flags are :mod:`utils.train.args`, the builders :mod:`utils.train.setup`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.utils import distribute_bn
from torch.utils.data import Dataset

from datasets.build import unwrap_subset
from datasets.folder import DatasetError
from utils.common.checkpoint import load_model_weights
from utils.common.dist import DistInfo, all_agree, epoch_seed, seed_everything
from utils.common.errors import ConfigError, OutputDirError
from utils.common.flags import parse_model_kwargs
from utils.common.model_builder import adopt_recorded_switches
from utils.common.precision import AmpConfig, training_amp
from utils.train.checkpointing import (
    CHECKPOINT_NAME, TENSORBOARD_DIR, StepCheckpointer, TrainingRun, check_same_class_labels, restore_rng_state,
    resolve_resume, resume, training_state, write_epoch_outputs,
)
from utils.train.engine import TrainStep, evaluate, format_eval, train_one_epoch
from utils.train.setup import (
    build_ema, build_loaders, build_optimizer, build_scheduler, set_selection,
    step_scheduler,
)

_logger = logging.getLogger(__name__)


def train_or_evaluate(args: argparse.Namespace, info: DistInfo, output_dir: Optional[Path], model: nn.Module,
                      num_classes: int, train_set: Optional[Dataset], val_set: Dataset,
                      criterion: Any, batch_transform: Any, *, find_unused_parameters: bool, summary: str = '',
                      ema_eval: bool = False, metric_key: str = 'fine_acc1', eval_metric: Optional[str] = None,
                      dist_bn: str = '') -> None:
    """The end of both scripts' ``run``, once the model and data sets are built.

    Moves the model to the device, logs its parameter count (with ``summary`` appended), then either
    evaluates (``--eval``) or builds loaders, EMA, the DDP wrap (``find_unused_parameters``: whether some
    parameters may get no gradient), optimizer and scheduler, in this order, and runs :func:`fit` with the
    script's ``criterion`` and ``batch_transform`` (None with ``--eval``). The remaining arguments are
    :class:`TrainingRun`'s.
    """
    device = info.device
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _logger.info('%s, %d classes, input %s, %.2fM parameters%s', args.model, num_classes, model.img_size_list,
                 n_parameters / 1e6, f'; {summary}' if summary else '')

    amp = training_amp(args.amp, args.amp_dtype, device)
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
    fit(TrainingRun(args, info, output_dir, model, model_without_ddp, model_ema, optimizer,
                    build_scheduler(args, optimizer), amp, criterion, batch_transform, train_loader, val_loader,
                    n_parameters, ema_eval=ema_eval, metric_key=metric_key, eval_metric=eval_metric,
                    dist_bn=dist_bn, classes=class_names(train_set)))


def class_names(dataset: Optional[Dataset]) -> Optional[List[str]]:
    """The class folder names of an ImageFolder-like data set in label order (None for others)."""
    classes = getattr(unwrap_subset(dataset), 'classes', None) if dataset is not None else None
    return [str(c) for c in classes] if isinstance(classes, (list, tuple)) and classes else None


def evaluate_only(args: argparse.Namespace, info: DistInfo, model: nn.Module, val_set: Dataset,
                  amp: AmpConfig) -> None:
    """``--eval``: load ``--resume`` (or keep the ``--finetune``/initial weights), evaluate both
    stages with informative selection, log the result and print it as one JSON line."""
    _, val_loader = build_loaders(args, info, None, val_set)
    if args.resume:
        checkpoint = load_model_weights(model, args.resume, unsafe=args.unsafe_load)
        check_same_class_labels(checkpoint.get('classes'), class_names(val_set), args.resume)
        adopt_recorded_switches([model], checkpoint, parse_model_kwargs(args.model_kwargs), f'--resume {args.resume}',
                                evaluation=True)
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


def fit(run: TrainingRun) -> None:
    """Resume if asked, then train and evaluate epoch by epoch, writing the checkpoint, the best
    checkpoint, ``log.txt`` and TensorBoard scalars on the main process. Every process stops together
    when the outputs cannot be written. With ``--save-interval-steps`` (and on a stop request) the
    mid-epoch checkpoint is written too (:class:`StepCheckpointer`); a run resumed from it continues at
    the same sample with the same random state."""
    args, info, output_dir = run.args, run.info, run.output_dir
    start_epoch, best_metric, mid_epoch, resume_from = _resume_or_start(run)
    metric_name = run.eval_metric or 'fine top-1'
    fault = FaultInjection(args.debug_fault, info.rank) if args.debug_fault else None
    end_epoch = end_epoch_of(args, start_epoch, resume_from)
    writer = None
    if output_dir is not None and info.rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR))
    _log_plan(run, start_epoch, end_epoch, metric_name)
    train_step = TrainStep(run.model, run.criterion, run.optimizer, amp=run.amp, clip_grad=args.clip_grad,
                           clip_mode=args.clip_mode, model_ema=run.model_ema, batch_transform=run.batch_transform,
                           lr_scheduler=run.lr_scheduler)
    started = time.time()
    try:
        for epoch in range(start_epoch, end_epoch):
            selection = epoch > args.selection_start_epoch
            train_stats = _train_epoch(run, train_step, epoch, mid_epoch if epoch == start_epoch else None,
                                       fault, writer, best_metric)
            test_stats, ema_stats = _evaluate_epoch(run)
            metric = (ema_stats or test_stats)[run.metric_key]
            if run.lr_scheduler is not None:
                step_scheduler(run.lr_scheduler, args, epoch, metric)
            is_best = metric > best_metric
            best_metric = max(best_metric, metric)
            _logger.info('epoch %d: selection %s | %s%s | best %s %.3f', epoch, 'on' if selection else 'off',
                         format_eval(test_stats), f' | EMA: {format_eval(ema_stats)}' if ema_stats else '',
                         metric_name, best_metric)
            record: Dict[str, Any] = {
                'epoch': epoch, **{f'train_{k}': v for k, v in train_stats.items()},
                **{f'test_{k}': v for k, v in test_stats.items()},
                **{f'test_ema_{k}': v for k, v in (ema_stats or {}).items()}}
            if run.eval_metric:
                record.update(eval_metric=run.eval_metric, best_metric=best_metric)
            record.update(informative_selection=selection, n_parameters=run.n_parameters)
            _write_epoch(run, writer, epoch, best_metric, test_stats, is_best, record)
    finally:
        if writer is not None:
            writer.close()
    _logger.info('done in %.1f s; best %s %.3f', time.time() - started, metric_name, best_metric)
    if args.debug_weights_digest:
        digest = {'rank': info.rank, 'model': weights_digest(run.model_without_ddp),
                  'model_ema': weights_digest(run.model_ema.module) if run.model_ema is not None else None}
        Path(f'{args.debug_weights_digest}.rank{info.rank}.json').write_text(json.dumps(digest))


def _resume_or_start(run: TrainingRun) -> Tuple[int, float, Optional[Dict[str, Any]], str]:
    """``(start epoch, best metric, mid-epoch state or None, the checkpoint resumed from or '')``: the run
    resumed if asked (its scheduler stepped to the start epoch), else a new one (warning when it replaces
    an earlier run's checkpoint)."""
    args, info, output_dir = run.args, run.info, run.output_dir
    start_epoch, best_metric = args.start_epoch, -1.0  # the first epoch's checkpoint is always a best one
    mid_epoch: Optional[Dict[str, Any]] = None
    resume_from = resolve_resume(args, info, output_dir)
    if resume_from:
        start_epoch, best_metric, mid_epoch = resume(args, resume_from, run, info)
    elif output_dir is not None and info.rank == 0 and (output_dir / CHECKPOINT_NAME).is_file():
        _logger.warning('%s holds an earlier run\'s checkpoint: this new run starts over and replaces it '
                        '(--resume %s or --resume auto continues it instead)', output_dir, output_dir / CHECKPOINT_NAME)
    if run.lr_scheduler is not None and start_epoch > 0:
        step_scheduler(run.lr_scheduler, args, start_epoch - 1)
    return start_epoch, best_metric, mid_epoch, resume_from


def _log_plan(run: TrainingRun, start_epoch: int, end_epoch: int, metric_name: str) -> None:
    """The log lines that say which epochs run, and from which epoch informative selection is on."""
    args = run.args
    _logger.info('training epochs %d..%d of %d, %d steps each; best checkpoint by %s%s', start_epoch,
                 end_epoch - 1, args.epochs, len(run.train_loader), metric_name, ' of the EMA' if run.ema_eval else '')
    if start_epoch <= args.selection_start_epoch:
        first = args.selection_start_epoch + 1
        _logger.info('informative selection %s: until then each epoch\'s evaluation runs the fine stage on every fine '
                     'patch (its line says "selection off"), so its fine top-1 is not what --eval and '
                     'dynamic_inference.py measure (they always select)',
                     f'from epoch {first}' if first < end_epoch else f'not in these epochs (from epoch {first})')


def _train_epoch(run: TrainingRun, train_step: TrainStep, epoch: int, mid_epoch: Optional[Dict[str, Any]],
                 fault: Optional[FaultInjection], writer: Any, best_metric: float) -> Dict[str, float]:
    """One epoch's training (from ``mid_epoch``'s sample on, with its random state, when resuming one), with
    its seed, sampler epoch and selection switch; then ``--dist-bn``. Returns the epoch's training means."""
    args, info = run.args, run.info
    seed_everything(epoch_seed(args.seed, epoch, info.rank, info.world_size))
    sampler = run.train_loader.sampler
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)
    start_step, meter = 0, None
    if mid_epoch is not None:  # the same order, from the same sample on
        start_step, meter = mid_epoch['step'], mid_epoch['meter']
        sampler.start_after(start_step * run.train_loader.batch_size, partial(restore_rng_state, mid_epoch['rng']))
    set_selection(epoch > args.selection_start_epoch, run.model_without_ddp,
                  run.model_ema.module if run.model_ema is not None else None)
    loader = fault.wrap(run.train_loader, epoch, start_step) if fault is not None else run.train_loader
    train_stats = train_one_epoch(
        train_step, loader, info.device, epoch, log_writer=writer, print_freq=args.print_freq,
        progress=info.rank == 0, start_step=start_step, meter=meter,
        on_step_end=StepCheckpointer(run, epoch, len(run.train_loader), best_metric))
    if run.dist_bn and info.distributed:  # e.g. the conv stem's BatchNorm statistics differ across processes
        sync_batchnorm_statistics(run)
    return train_stats


def _evaluate_epoch(run: TrainingRun) -> Tuple[Dict[str, float], Optional[Dict[str, float]]]:
    """The epoch's evaluation of the model, and of its EMA when the run evaluates it (else None)."""
    info, reduce = run.info, run.info.distributed and run.args.dist_eval
    test_stats = evaluate(run.model_without_ddp, run.val_loader, info.device, run.amp,
                          reduce_over_processes=reduce, progress=info.rank == 0)
    ema_stats = evaluate(run.model_ema.module, run.val_loader, info.device, run.amp, reduce_over_processes=reduce,
                         progress=info.rank == 0) if run.ema_eval else None
    return test_stats, ema_stats


def _write_epoch(run: TrainingRun, writer: Any, epoch: int, best_metric: float, test_stats: Dict[str, float],
                 is_best: bool, record: Dict[str, Any]) -> None:
    """The main process writes the epoch's checkpoints, ``log.txt`` line and TensorBoard scalars; every
    process stops together (:class:`OutputDirError`) when it could not."""
    problem, output_dir = None, run.output_dir
    if output_dir is not None and run.info.rank == 0:
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


def end_epoch_of(args: argparse.Namespace, start_epoch: int, resume_from: str) -> int:
    """The epoch the run stops before (``--epochs``, ``--stop-at-epoch``). A run that would train nothing
    (and write nothing, and report "best -1") is refused: :class:`ConfigError`, one line."""
    end_epoch = args.epochs if args.stop_at_epoch is None else min(args.epochs, args.stop_at_epoch)
    stop = f', --stop-at-epoch {args.stop_at_epoch}' if args.stop_at_epoch is not None else ''
    if start_epoch >= end_epoch:
        raise ConfigError(f'nothing to train: the run would start at epoch {start_epoch}'
                          f'{f" (after {resume_from})" if resume_from else ""} and end before epoch {end_epoch} '
                          f'(--epochs {args.epochs}{stop})')
    return end_epoch


def sync_batchnorm_statistics(run: TrainingRun) -> None:
    """``--dist-bn``: average (``reduce``) or copy from rank 0 (``broadcast``) the BatchNorm running statistics
    of the model, and of its EMA unless that lives on the CPU, over the processes (timm's ``distribute_bn``)."""
    reduce = run.dist_bn == 'reduce'
    distribute_bn(run.model_without_ddp, run.info.world_size, reduce=reduce)
    if run.model_ema is not None and not run.args.model_ema_force_cpu:
        distribute_bn(run.model_ema.module, run.info.world_size, reduce=reduce)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state_dict (names and raw bytes), for comparing processes."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- tests only
class FaultInjection:
    """``--debug-fault RANK:EPOCH:STEP:KIND`` (tests only): when process RANK is about to fetch batch STEP of
    epoch EPOCH, ``kill`` SIGKILLs it, ``data`` raises the data error of a training set that cannot be
    read, and ``forward`` hands the model a batch one pixel too small, so that its forward fails. Only on a
    job's first attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a restart succeeds."""

    def __init__(self, spec: str, rank: int) -> None:
        try:
            r, e, s, kind = spec.split(':')
            self.rank, self.epoch, self.step, self.kind = int(r), int(e), int(s), kind
        except ValueError:
            raise ValueError(f'--debug-fault takes RANK:EPOCH:STEP:kill|data|forward, got {spec!r}') from None
        self.active = rank == self.rank and os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') in ('', '0')

    def wrap(self, loader: Any, epoch: int, start_step: int) -> Any:
        """``loader`` itself, or on the chosen rank and epoch an iterable that fails at the chosen step."""
        if not self.active or epoch != self.epoch:
            return loader
        return _FailingLoader(loader, self.step - start_step, self.kind)


class _FailingLoader:
    def __init__(self, loader: Any, at: int, kind: str) -> None:
        self.loader, self.at, self.kind = loader, at, kind
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if i == self.at:
                if self.kind == 'kill':
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.kind == 'forward':
                    images, *rest = batch
                    yield (images[..., 1:, 1:], *rest)
                    continue
                raise DatasetError('32 images in a row could not be read (injected by --debug-fault)')
            yield batch
