"""Training checkpoints: their file names, what they hold, when they are written, and resuming from them.

- :data:`CHECKPOINT_NAME`, :data:`BEST_CHECKPOINT_NAME`, :data:`STEP_CHECKPOINT_NAME`, :data:`LOG_NAME`:
  the files of a run folder (the released layout);
- :class:`TrainingRun`: the objects of a training run; :func:`training_state`: what every training
  checkpoint holds of them; :func:`write_epoch_outputs` writes the
  end of an epoch (checkpoint, best checkpoint, ``log.txt``, TensorBoard scalars);
- :class:`StepCheckpointer`: the mid-epoch ``checkpoint_step.pth`` (``--save-interval-steps``, a stop request);
- :func:`capture_rng_state` / :func:`restore_rng_state`: Python's ``random``, NumPy's and torch's global
  generators and those of every CUDA device, as plain data (loads with ``weights_only=True``);
- :func:`check_scheduler_state` / :func:`check_step_checkpoint`: what a checkpoint holds of the scheduler and
  of a mid-epoch position fits this run, checked before any of it is used;
- :func:`resolve_resume` (``--resume auto``: :func:`find_auto_resume` picks the furthest readable
  checkpoint) and :func:`resume` (also mid-epoch, at the same sample with the same random state).
"""
from __future__ import annotations

import argparse
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from datasets.safe_read import check_like, is_number, short_repr
from utils.common.atomic import append_json_line, copy_atomic, save_atomic
from utils.common.checkpoint import load_checkpoint_file, load_model_weights
from utils.common.checkpoint_schema import check_optimizer_state
from utils.common.dist import DistInfo, all_agree, broadcast_object, gather_objects
from utils.common.errors import CheckpointError, ConfigError, OutputDirError
from utils.common.flags import parse_model_kwargs
from utils.common.model_builder import adopt_recorded_switches, with_recorded_switches
from utils.common.signals import StopRequested
from utils.common.precision import AmpConfig
from utils.train.engine import MetricMeter

__all__ = [
    'CHECKPOINT_NAME', 'STEP_CHECKPOINT_NAME', 'BEST_CHECKPOINT_NAME', 'LOG_NAME', 'TENSORBOARD_DIR', 'TrainingRun',
    'training_state', 'StepCheckpointer', 'write_epoch_outputs', 'capture_rng_state', 'restore_rng_state',
    'check_scheduler_state', 'check_step_checkpoint', 'progress_of', 'find_auto_resume', 'resolve_resume', 'resume',
]

CHECKPOINT_NAME = 'checkpoint.pth'
#: The mid-epoch checkpoint of --save-interval-steps and of a stop request (SIGTERM).
STEP_CHECKPOINT_NAME = 'checkpoint_step.pth'
BEST_CHECKPOINT_NAME = 'best_checkpoint.pth'
LOG_NAME = 'log.txt'
TENSORBOARD_DIR = 'tensorboard'

_logger = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """What the epoch loop (:func:`fit`) needs; :func:`train_or_evaluate` builds it.

    ``model`` may be DDP-wrapped, ``model_without_ddp`` is the module itself. With ``ema_eval`` the
    EMA is evaluated every epoch too and epochs are ranked by its ``metric_key`` (the released
    CF-LV-ViT run); ``eval_metric`` names the ranking in the log and checkpoint (None: fine top-1,
    the DeiT release). ``dist_bn`` (``'reduce'``, ``'broadcast'`` or ``''``): after each epoch's training, average
    or copy from rank 0 the BatchNorm statistics over the processes (main_lvvit.py's ``--dist-bn``).
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
    dist_bn: str = ''
    classes: Optional[List[str]] = None  # the training set's class folders, in label order (recorded, checked)


# ---------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> Dict[str, Any]:
    """Every global generator's state as plain data: ``python``, ``numpy``, ``torch``, ``cuda`` (one per device)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'gauss': float(gauss)},
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # this process's own GPU, enough to resume where another number of GPUs is visible per process
        'cuda_current': torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Set every global generator back to what :func:`capture_rng_state` returned."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        if len(state['cuda']) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state['cuda'])
        elif state.get('cuda_current') is not None:  # e.g. written with all GPUs visible, resumed with one per task
            torch.cuda.set_rng_state(state['cuda_current'])
        else:  # written before 'cuda_current' was recorded
            raise CheckpointError(f'the mid-epoch checkpoint was written with {len(state["cuda"])} visible GPUs per '
                                  f'process, this run sees {torch.cuda.device_count()}')


def check_scheduler_state(saved: Any, own: Mapping[str, Any], where: str) -> None:
    """A saved timm scheduler state fits the run's own (:func:`check_like`; timm's ``load_state_dict``
    copies every entry onto the scheduler, so the names of the fields it writes must also be the run's)."""
    check_like(saved, own, where, CheckpointError)
    for key in ('param_group_field', '_initial_param_group_field'):
        if key in saved and saved[key] != own.get(key):
            raise CheckpointError(f'{where}: {key} is {short_repr(saved[key])}, this run schedules '
                                  f'{short_repr(own.get(key))}')


def check_step_checkpoint(checkpoint: Mapping[str, Any], world_size: int, steps_per_epoch: int, rank: int,
                          where: str) -> None:
    """What a mid-epoch checkpoint says about its position and its per-process states fits this run: the step
    lies inside its epoch, there is one state per process, the running means are numbers, and this
    process's RNG states have the run's own layout and are accepted by the generators (tried, then the
    run's states are put back: :func:`capture_rng_state`, :func:`restore_rng_state`).

    Raises:
        CheckpointError: one line naming what does not fit.
    """
    step = checkpoint.get('step_in_epoch')
    if not (is_number(step) and float(step).is_integer() and 0 <= step <= steps_per_epoch):
        raise CheckpointError(f'{where}: step_in_epoch is {short_repr(step)}, but its epoch has {steps_per_epoch} steps '
                              f'(a step beyond its epoch would skip the epoch and save it as trained)')
    states = checkpoint.get('process_states')
    if not isinstance(states, (list, tuple)) or len(states) != world_size:
        raise CheckpointError(f'{where}: process_states is {short_repr(states)}, expected one state per process '
                              f'({world_size})')
    state = states[rank]
    if not (isinstance(state, Mapping) and isinstance(state.get('rng'), Mapping)
            and isinstance(state.get('meter'), Mapping)):
        raise CheckpointError(f'{where}: the state of process {rank} is {short_repr(state)}, expected its rng and meter')
    meter = state['meter']
    for part in ('sums', 'counts'):
        values = meter.get(part)
        if not (isinstance(values, Mapping) and all(isinstance(k, str) and is_number(v) and math.isfinite(v)
                                                     for k, v in values.items())):
            raise CheckpointError(f'{where}: meter.{part} of process {rank} is {short_repr(values)}, '
                                  f'expected named finite numbers')
    if any(v < 0 for v in meter['counts'].values()):
        raise CheckpointError(f'{where}: meter.counts of process {rank} holds a negative count')
    rng, own = state['rng'], capture_rng_state()
    check_like({k: v for k, v in rng.items() if k != 'cuda'}, {k: v for k, v in own.items() if k != 'cuda'},
               f'{where}: rng of process {rank}', CheckpointError)
    cuda = rng.get('cuda', [])
    if not (isinstance(cuda, (list, tuple)) and all(type(t).__name__ == 'Tensor' for t in cuda)):
        raise CheckpointError(f'{where}: rng.cuda of process {rank} is {short_repr(cuda)}, expected generator states')
    try:
        restore_rng_state(rng)
    except Exception as e:  # noqa: BLE001 (the generators reject garbage with many types)
        raise CheckpointError(f'{where}: the RNG states of process {rank} are not valid generator states '
                              f'({type(e).__name__}: {" ".join(str(e).split())[:120]})') from None
    finally:
        restore_rng_state(own)


# ---------------------------------------------------------------------------------------------- --resume auto
def progress_of(checkpoint: Dict[str, Any]) -> Tuple[int, int]:
    """How far a training checkpoint got, as ``(epoch, optimizer steps done in it)``: a mid-epoch checkpoint
    of epoch e after s steps is ``(e, s)``; an end-of-epoch one of epoch e is ``(e + 1, 0)``."""
    epoch = int(checkpoint['epoch'])
    if checkpoint.get('step_in_epoch') is not None:
        return epoch, int(checkpoint['step_in_epoch'])
    return epoch + 1, 0


def find_auto_resume(output_dir: Path, names: Sequence[str], world_size: int,
                     unsafe: bool = False, batch_size: Optional[int] = None) -> Optional[Path]:
    """The checkpoint ``--resume auto`` continues from: among ``names`` in ``output_dir``, the readable
    training checkpoint that got furthest (:func:`progress_of`).

    An unreadable file (truncated by a disk error, foreign) is skipped with a warning naming it and the
    next one is used; a mid-epoch checkpoint written by another number of processes is skipped too (its
    per-process states do not fit), and one written with another ``batch_size`` (its steps are other
    samples): the run continues from the last end-of-epoch checkpoint, with a warning line. Returns None when there is no checkpoint at all (a new run).

    Raises:
        CheckpointError: checkpoint files exist but none can be continued from (never start over silently).
    """
    found: List[Tuple[Tuple[int, int], Path]] = []
    rejected: List[str] = []
    for name in names:
        path = output_dir / name
        if not path.exists():
            continue
        try:
            checkpoint = load_checkpoint_file(path, unsafe=unsafe)
            if not isinstance(checkpoint, dict) or checkpoint.get('optimizer') is None or 'epoch' not in checkpoint:
                raise CheckpointError('no training state in it')
        except CheckpointError as e:
            _logger.warning('--resume auto: skipping %s (%s)', path, e)
            rejected.append(f'{name}: {e}')
            continue
        written_by = checkpoint.get('world_size')
        if checkpoint.get('step_in_epoch') is not None and written_by != world_size:
            _logger.warning('--resume auto: skipping %s (mid-epoch checkpoint of %s processes, this run has %d)',
                            path, written_by, world_size)
            rejected.append(f'{name}: written by {written_by} processes')
            continue
        args = checkpoint.get('args')
        written_batch = args.get('batch_size') if isinstance(args, dict) else getattr(args, 'batch_size', None)
        if checkpoint.get('step_in_epoch') is not None and None not in (batch_size, written_batch) \
                and written_batch != batch_size:  # its step count means other samples: continue from the epoch
            _logger.warning('--resume auto: skipping %s (mid-epoch checkpoint of --batch-size %s, this run has %d)',
                            path, written_batch, batch_size)
            rejected.append(f'{name}: written with --batch-size {written_batch}')
            continue
        found.append((progress_of(checkpoint), path))
    if found:
        return max(found, key=lambda item: item[0])[1]
    if rejected:
        raise CheckpointError(f'--resume auto: no checkpoint in {output_dir} can be continued from '
                              f'({"; ".join(rejected)}); not starting over: move them away or pass --resume FILE')
    return None


# ---------------------------------------------------------------------------------------------- saving
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
        'args': with_recorded_switches(run.args, run.model_without_ddp),  # the switches set in memory too
        'max_fine_acc1': best_metric,
        'classes': list(run.classes) if run.classes is not None else None,
    }


class StepCheckpointer:
    """``on_step_end`` of :func:`utils.train.engine.train_one_epoch`: writes ``checkpoint_step.pth`` every
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
            where = run.args.output_dir
            raise StopRequested('stopped on request (SIGTERM) at a step boundary' + (
                f'; {STEP_CHECKPOINT_NAME} in {where} continues it with --resume auto' if where else ''))


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
    checkpoints (:func:`find_auto_resume`, shared with every process), or '' for a new run."""
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
    check_same_class_labels(checkpoint.get('classes'), run.classes, path)
    adopt_recorded_switches([model, model_ema.module if model_ema is not None else None], checkpoint,
                            parse_model_kwargs(args.model_kwargs), f'--resume {path}')
    if not all(checkpoint.get(k) is not None for k in ('optimizer', 'epoch')):
        _logger.info('resumed the weights of %s (no training state in it): starting at epoch %d',
                     path, args.start_epoch)
        return args.start_epoch, -1.0, None
    check_optimizer_state(checkpoint['optimizer'], optimizer, path, _recorded(checkpoint, 'opt'), args.opt)
    if lr_scheduler is not None and checkpoint.get('lr_scheduler') is not None:  # e.g. a string for a number
        check_scheduler_state(checkpoint['lr_scheduler'], lr_scheduler.state_dict(), f'{path}: lr_scheduler')
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
    check_step_checkpoint(checkpoint, info.world_size, len(run.train_loader), info.rank,
                          str(path))  # position and states, before any use
    state = checkpoint['process_states'][info.rank]
    meter = MetricMeter()
    meter.sums.update(state['meter']['sums'])
    meter.counts.update(state['meter']['counts'])
    _logger.info('resumed %s: continuing epoch %d after step %d of %d', path, epoch, step, len(run.train_loader))
    return epoch, best, {'step': step, 'rng': state['rng'], 'meter': meter}


def check_same_class_labels(recorded: Optional[Sequence[str]], classes: Optional[Sequence[str]], path: str) -> None:
    """Refuse (:class:`CheckpointError`, one line) a data set whose class folders are not the ones the checkpoint
    was trained on, in the same order: label i would silently mean another class (a folder renamed, added or
    removed between training and ``--resume`` / ``--eval``). Checkpoints that record none are not checked."""
    if not recorded or not classes or list(recorded) == list(classes):
        return
    if len(recorded) != len(classes):
        raise CheckpointError(f'{path} was trained on {len(recorded)} class folders, the data set has {len(classes)}')
    i = next(i for i, (a, b) in enumerate(zip(recorded, classes)) if a != b)
    raise CheckpointError(f'{path} was trained with label {i} = class folder {recorded[i]!r}, but in this data set '
                          f'label {i} is {classes[i]!r}: class folders were renamed or replaced since training, so '
                          'every label would mean another class; restore the folders the checkpoint was trained on')


def _recorded(checkpoint: Dict[str, Any], name: str) -> Any:
    """A training flag recorded in a checkpoint's ``args`` (None when absent)."""
    args = checkpoint.get('args')
    return args.get(name) if isinstance(args, dict) else getattr(args, name, None)


