"""One training epoch and one evaluation pass of a coarse-to-fine model (DeiT's ``engine.py`` shape).

Both functions are model- and recipe-agnostic so that the CF-DeiT and CF-LV-ViT scripts share them:

- the model maps a fine image batch (B, 3, S_f, S_f) to ``[coarse_output, fine_output]``; it
  derives the coarse image from the (mixed) fine batch itself;
- the loss is a criterion object ``criterion(outputs, targets)`` returning a scalar or a dict
  with a ``'loss'`` entry (:class:`utils.train.losses.CFViTLoss`);
- a batch transform (mixup/cutmix, or none) maps ``(images, targets)`` before the forward pass.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from datasets.folder import DatasetError, unpack_batch, unreadable_images

from utils.common.dist import (
    PeerFailedError, collective_device, is_dist_initialized, is_main_process, reduce, step_status,
)
from utils.common.errors import EXIT_BAD_INPUT, EXIT_FAILED, UserError, user_message
from utils.common.precision import AmpConfig
from utils.common.signals import check_stop, step_boundary, stop_at_steps
from utils.inference.predict import top_k_hits
from utils.train.losses import class_logits

__all__ = ['MetricMeter', 'NonFiniteLossError', 'TrainStep', 'train_one_epoch', 'evaluate', 'unwrap_model']

_logger = logging.getLogger(__name__)

#: step_status code of a non-finite loss (a failed run, exit 1; above the bad-input code so it is not hidden).
NON_FINITE = 3

BatchTransform = Callable[[torch.Tensor, Any], Tuple[torch.Tensor, Any]]


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite: the run failed on its own (exit 1)."""
    exit_code = EXIT_FAILED


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    while hasattr(model, 'module') and isinstance(model.module, nn.Module):
        model = model.module
    return model


class MetricMeter:
    """Sample-weighted running means of named scalars, reducible over processes.

    >>> meter = MetricMeter()
    >>> meter.update(n=8, loss=0.5)
    >>> meter.means()['loss']
    0.5
    """

    def __init__(self) -> None:
        self.sums: Dict[str, float] = defaultdict(float)
        self.counts: Dict[str, float] = defaultdict(float)

    def update(self, n: int = 1, **values: Union[float, torch.Tensor]) -> None:
        """Add ``values``, each the mean over ``n`` samples."""
        for name, value in values.items():
            value = float(value.item() if isinstance(value, torch.Tensor) else value)
            self.sums[name] += value * n
            self.counts[name] += n

    def means(self) -> Dict[str, float]:
        """This process's means."""
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}

    def global_means(self, device: Optional[torch.device] = None) -> Dict[str, float]:
        """Means over every process (a collective: every process must call it, with the same names)."""
        names = sorted(self.sums)
        if not names:
            return {}
        t = torch.tensor([[self.sums[k], self.counts[k]] for k in names], dtype=torch.float64,
                         device=device or collective_device())
        t = reduce(t, 'sum')
        return {k: (s / c if c > 0 else math.nan) for k, (s, c) in zip(names, t.tolist())}


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    return obj


def _backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, model: nn.Module, amp: AmpConfig,
                   clip_grad: Optional[float], clip_mode: str) -> None:
    """Backward, optional gradient clipping (on unscaled gradients) and the optimizer step."""
    if amp.scaler is not None:
        amp.scaler.scale(loss).backward()
        if clip_grad is not None:
            amp.scaler.unscale_(optimizer)
            _clip(model, clip_grad, clip_mode)
        amp.scaler.step(optimizer)
        amp.scaler.update()
    else:
        loss.backward()
        if clip_grad is not None:
            _clip(model, clip_grad, clip_mode)
        optimizer.step()


def _failure_code(failure: Optional[BaseException]) -> int:
    """The exit status a step's failure means: 0 none, 2 bad input (unreadable data), 1 anything else."""
    if failure is None:
        return 0
    return EXIT_BAD_INPUT if isinstance(failure, (DatasetError, OSError)) else EXIT_FAILED


def _clip(model: nn.Module, value: float, mode: str) -> None:
    """Clip the gradients of ``model``'s trainable parameters to ``value`` (their norm, or each value)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if mode == 'norm':
        torch.nn.utils.clip_grad_norm_(params, value)
    elif mode == 'value':
        torch.nn.utils.clip_grad_value_(params, value)
    else:
        raise ValueError(f'unknown gradient clipping mode {mode!r}')


@dataclass
class TrainStep:
    """What one training step does, the same at every step of every epoch.

    Attributes:
        model: the model (possibly DistributedDataParallel); ``model(images)`` with images
            (B, 3, S_f, S_f) returns ``[coarse_output, fine_output]``.
        criterion: ``criterion(outputs, targets)`` -> scalar loss, or a dict with ``'loss'`` (the
            one to back-propagate) and other scalars to report.
        optimizer: the optimizer.
        amp: mixed precision (default: full precision).
        clip_grad: clip gradients to this norm (or value), or None.
        clip_mode: ``'norm'`` or ``'value'``.
        model_ema: a ``timm.utils.ModelEmaV3`` updated after every optimizer step, or None.
        batch_transform: ``(images, targets) -> (images, targets)`` applied on the device before
            the forward pass (timm's ``Mixup``), or None.
        lr_scheduler: a timm scheduler; its ``step_update`` is called after every step (a no-op
            for per-epoch schedules).
    """
    model: nn.Module
    criterion: Callable[[Any, Any], Any]
    optimizer: torch.optim.Optimizer
    amp: AmpConfig = field(default_factory=AmpConfig)
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    model_ema: Optional[nn.Module] = None
    batch_transform: Optional[BatchTransform] = None
    lr_scheduler: Optional[Any] = None

    def forward_loss(self, images: Any, targets: Any, device: torch.device) -> Tuple[int, Dict[str, torch.Tensor]]:
        """The batch to ``device``, the batch transform, the model under autocast and the criterion.
        Returns the batch size and the losses (``'loss'`` the one to back-propagate)."""
        images = _to_device(images, device)
        targets = _to_device(targets, device)
        if self.batch_transform is not None:
            images, targets = self.batch_transform(images, targets)
        with self.amp.autocast(device):
            outputs = self.model(images)  # [coarse, fine]; the coarse image is derived from this fine batch
        losses = self.criterion(outputs, targets)
        if isinstance(losses, torch.Tensor):
            losses = {'loss': losses}
        return images.shape[0], losses

    def update(self, loss: torch.Tensor, num_updates: int) -> float:
        """Backward and optimizer step, the EMA and the scheduler's update; returns the learning rate."""
        self.optimizer.zero_grad(set_to_none=True)
        _backward_step(loss, self.optimizer, self.model, self.amp, self.clip_grad, self.clip_mode)
        if self.model_ema is not None:
            self.model_ema.update(unwrap_model(self.model))
        if self.lr_scheduler is not None:
            self.lr_scheduler.step_update(num_updates=num_updates)
        return self.optimizer.param_groups[0]['lr']


@stop_at_steps()
def train_one_epoch(
        train_step: TrainStep,
        data_loader: Iterable,
        device: torch.device,
        epoch: int,
        log_writer: Optional[Any] = None,
        print_freq: int = 50,
        progress: bool = True,
        start_step: int = 0,
        meter: Optional[MetricMeter] = None,
        on_step_end: Optional[Callable[[int, MetricMeter, bool], None]] = None,
) -> Dict[str, float]:
    """Train ``train_step.model`` for one pass over ``data_loader``.

    Args:
        train_step: the model, criterion, optimizer and what each step does besides.
        data_loader: yields ``(images, targets)``; targets are anything the batch transform and
            the criterion accept (e.g. (B,) class indices).
        device: device of the model.
        epoch: 0-based epoch (for the progress display and the scheduler's update count).
        log_writer: a TensorBoard ``SummaryWriter`` (main process only), or None.
        print_freq: log a line (and a TensorBoard point) every this many steps.
        progress: show a tqdm bar (the caller passes False on non-main processes).
        start_step: the epoch resumes after this many steps (``data_loader`` yields only the rest; its
            length is the whole epoch's).
        meter: the running means of the steps already done (a resumed epoch), or None.
        on_step_end: ``on_step_end(steps_done, meter, stop)`` after every optimizer step, on every
            process (mid-epoch checkpoints); with ``stop`` the epoch then ends early.

    Returns:
        Means over the epoch and over every process: ``loss`` and the criterion's other entries,
        plus ``lr`` (the learning rate at the end of the epoch) and ``unreadable_images`` (reads of
        unreadable files that the datasets replaced, summed over the processes).

    Raises:
        NonFiniteLossError: the loss of some process was not finite; every process raises it at
            the same step, before the optimizer step, so the weights stay those of the last step.
        PeerFailedError: another process failed to read its batch (it raises its own error), at the same step.
    """
    train_step.model.train()
    meter = meter if meter is not None else MetricMeter()
    num_steps = len(data_loader)  # type: ignore[arg-type]
    bar = tqdm(data_loader, total=num_steps, initial=start_step, desc=f'epoch {epoch}',
               disable=not progress or None, dynamic_ncols=True, leave=False)
    batches = iter(bar)
    for step in range(start_step, num_steps):
        # SIGINT ends the run at this step boundary (the last checkpoint intact); a preemption (SIGTERM) stops
        # every process at the end of this step, after on_step_end(stop=True) wrote the mid-epoch checkpoint
        stop_asked = step_boundary()
        failure: Optional[BaseException] = None
        try:
            images, targets = next(batches)
        except StopIteration:
            break
        except Exception as e:  # e.g. an unreadable training set: every process stops at this step
            failure = e
        if is_dist_initialized():
            # agree on the batches before the forward: DDP's forward broadcasts buffers (CF-LV-ViT's BatchNorm),
            # a collective that a process without a batch would leave the others waiting in
            _agree_on_step(_failure_code(failure), failure, False, epoch, step)
        if failure is None:
            try:  # any failure here (a CUDA out-of-memory error too) reaches the step agreement below
                batch_size, losses = train_step.forward_loss(images, targets, device)
                loss_value = float(losses['loss'].item())
            except Exception as e:
                failure = e
        code = NON_FINITE if failure is None and not math.isfinite(loss_value) else _failure_code(failure)
        stop = _agree_on_step(code, failure, stop_asked, epoch, step, loss_value if failure is None else None)

        lr = train_step.update(losses['loss'], num_updates=epoch * num_steps + step + 1)
        meter.update(n=batch_size, **losses)
        _report_step(bar if progress else None, log_writer, print_freq, epoch, step, num_steps, loss_value, meter, lr)
        if on_step_end is not None:
            on_step_end(step + 1, meter, stop)
        if stop:
            break
    bar.close()
    return _epoch_stats(meter, train_step.optimizer, data_loader, device, epoch)


def _agree_on_step(code: int, failure: Optional[BaseException], stop_asked: bool, epoch: int, step: int,
                   loss_value: Optional[float] = None) -> bool:
    """The processes' agreement on a step (:func:`utils.common.dist.step_status`), then the same outcome on
    every process: this process's own failure re-raised, :class:`NonFiniteLossError` when some loss was not
    finite, :class:`PeerFailedError` when another process failed. Returns whether any process was asked
    to stop."""
    code, stop, first = step_status(code, stop_asked, '' if failure is None else user_message(failure))
    if failure is not None:
        raise failure
    if code == NON_FINITE:
        raise NonFiniteLossError(
            f'the training loss is not finite (epoch {epoch}, step {step}, loss {loss_value} on this '
            f'process): stopping. The last checkpoint is left as it was; lower --lr, raise '
            f'--warmup-epochs or use --clip-grad.')
    if code:
        rank, message = first
        raise PeerFailedError(f'process {rank} stopped the run at epoch {epoch}, step {step}: {message}', code)
    return stop


def _report_step(bar: Optional[Any], log_writer: Optional[Any], print_freq: int, epoch: int, step: int,
                 num_steps: int, loss_value: float, meter: MetricMeter, lr: float) -> None:
    """The progress bar's postfix; every ``print_freq`` steps (and at the last) a log line and a TensorBoard
    point on the main process."""
    if bar is not None:
        bar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{lr:.2e}', refresh=False)
    if print_freq and (step % print_freq == 0 or step == num_steps - 1) and is_main_process():
        _logger.info('epoch %d [%d/%d] loss %.4f (mean %.4f) lr %.3e', epoch, step + 1, num_steps,
                     loss_value, meter.means()['loss'], lr)
        if log_writer is not None:
            log_writer.add_scalar('train/loss_step', loss_value, epoch * num_steps + step + 1)


def _epoch_stats(meter: MetricMeter, optimizer: torch.optim.Optimizer, data_loader: Iterable,
                 device: torch.device, epoch: int) -> Dict[str, float]:
    """The epoch's means over every process, the last learning rate and the unreadable reads (summed)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    stats = meter.global_means()
    stats['lr'] = optimizer.param_groups[0]['lr']
    # reads of unreadable files the dataset replaced by its next readable image, summed over the processes
    local = unreadable_images(getattr(data_loader, 'dataset', None), reset=True)
    unreadable = int(reduce(torch.tensor([local], dtype=torch.int64, device=collective_device()), 'sum').item())
    if unreadable and is_main_process():
        _logger.warning('epoch %d: %d reads of unreadable training images were replaced by the next readable '
                        'image (see the warnings naming them)', epoch, unreadable)
    stats['unreadable_images'] = unreadable
    return stats


@torch.no_grad()
@stop_at_steps()
def evaluate(
        model: nn.Module,
        data_loader: Iterable,
        device: torch.device,
        amp: Optional[AmpConfig] = None,
        reduce_over_processes: bool = False,
        progress: bool = True,
) -> Dict[str, float]:
    """Top-1/top-5 accuracy of both stages and the fine stage's cross-entropy.

    Args:
        model: the unwrapped model; ``model.forward_stages(images)`` returns ``(coarse_logits,
            fine_logits)``, each (B, C).
        data_loader: yields ``(images, class_indices)`` or ``datasets.collate_skipping``'s
            ``(images, class_indices, n_skipped)``.
        device: device of the model.
        amp: mixed precision; full precision if None.
        reduce_over_processes: the processes evaluated disjoint shards (``--dist-eval``): sum
            their counts. Leave False when every process evaluated the whole set.
        progress: show a tqdm bar.

    Returns:
        ``coarse_acc1``, ``coarse_acc5``, ``fine_acc1``, ``fine_acc5`` (percent), ``loss`` (mean
        cross-entropy of the fine logits), ``num_samples`` and ``num_skipped`` (unreadable images,
        left out of the accuracy); exact over the whole set.
    """
    amp = amp or AmpConfig()
    was_training = model.training
    model.eval()
    # correct counts: coarse top-1, coarse top-5, fine top-1, fine top-5; loss sum; samples; unreadable
    totals = torch.zeros(7, dtype=torch.float64, device=device)
    bar = tqdm(data_loader, desc='eval', disable=not progress or None, dynamic_ncols=True, leave=False)
    for batch in bar:
        check_stop()  # a stop signal ends the run at the next step
        images, targets, skipped, _ = unpack_batch(batch, device)
        totals[6] += skipped
        if images is None:
            continue
        with amp.autocast(device):
            coarse, fine = model.forward_stages(images)
        coarse, fine = class_logits(coarse).float(), class_logits(fine).float()  # (B, C) each
        for i, logits in enumerate((coarse, fine)):
            hit = top_k_hits(logits, targets)  # (B, min(5, C))
            totals[2 * i] += hit[:, 0].sum()
            totals[2 * i + 1] += hit.any(dim=-1).sum()
        totals[4] += F.cross_entropy(fine, targets, reduction='sum')
        totals[5] += targets.shape[0]
    bar.close()
    if reduce_over_processes:
        totals = reduce(totals, 'sum')
    model.train(was_training)
    c1, c5, f1, f5, loss_sum, n, skipped = totals.tolist()
    if n == 0:  # the same totals on every process: all raise together
        raise DatasetError(f'no readable validation images ({int(skipped)} unreadable)' if skipped
                           else 'the validation set is empty')
    if skipped and is_main_process():
        _logger.warning('%d unreadable validation images were skipped: the accuracy is over the other %d',
                        int(skipped), int(n))
    return {
        'coarse_acc1': 100.0 * c1 / n, 'coarse_acc5': 100.0 * c5 / n,
        'fine_acc1': 100.0 * f1 / n, 'fine_acc5': 100.0 * f5 / n,
        'loss': loss_sum / n, 'num_samples': int(n), 'num_skipped': int(skipped),
    }


def format_eval(stats: Mapping[str, float]) -> str:
    """One line for a person: top-1 (and top-5) of both stages."""
    return (f'coarse top-1 {stats["coarse_acc1"]:.3f} top-5 {stats["coarse_acc5"]:.3f} | '
            f'fine top-1 {stats["fine_acc1"]:.3f} top-5 {stats["fine_acc5"]:.3f} | '
            f'{stats["num_samples"]} images')


