"""Evaluation loops over a dataset: both stages for every image, and timed early exit.

Both loops call the model's single coarse-to-fine path (``forward_details``). The pieces every
evaluation shares are here too, and the training evaluation (:func:`utils.train.engine.evaluate`)
uses them: :func:`top_k_hits` (and :func:`datasets.folder.unpack_batch`, :func:`utils.common.precision.autocast_context`).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from datasets.folder import DatasetError, unpack_batch
from models.token_ops import coarse_from_fine

from utils.common.precision import autocast_context
from utils.common.signals import check_stop, stop_at_steps

__all__ = ['StagePredictions', 'ExitResult', 'predict_stages', 'timed_early_exit',
           'top_k_hits', 'model_device']

_logger = logging.getLogger(__name__)


@dataclass
class StagePredictions:
    """Per-sample outcome of both stages over a dataset (compact: no class scores kept).

    Attributes:
        confidence: (2, N) max softmax probability of the coarse and fine stage.
        prediction: (2, N) top-1 class of each stage.
        top5_correct: (2, N) whether the label is among each stage's top 5.
        targets: (N,) labels.
        skipped: images that could not be read.
    """
    confidence: torch.Tensor
    prediction: torch.Tensor
    top5_correct: torch.Tensor
    targets: torch.Tensor
    skipped: int = 0

    @property
    def correct(self) -> torch.Tensor:
        """(2, N) top-1 correctness of each stage."""
        return self.prediction.eq(self.targets.view(1, -1))

    def accuracy(self) -> List[float]:
        """Top-1 (%) of the coarse and the fine stage (``anytime_classification``)."""
        return [float(v) for v in (self.correct.double().mean(dim=1) * 100).tolist()]


def top_k_hits(logits: torch.Tensor, targets: torch.Tensor, k: int = 5) -> torch.Tensor:
    """(B, k') bool, k' = min(k, C): whether the label (B,) is each of the k' highest classes of ``logits``
    (B, C), best first: column 0 is the top-1 hit, any column the top-k hit. Both evaluation loops count with it."""
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices.eq(targets.view(-1, 1))


@torch.no_grad()
@stop_at_steps()
def predict_stages(model: nn.Module, loader: Iterable, device: torch.device,
                   amp_dtype: Optional[torch.dtype] = None, desc: str = 'both stages') -> StagePredictions:
    """Run both stages (with the model's selection setting) on every image of ``loader``.

    Args:
        model: a CF model.
        loader: yields ``(images (B, C, S_f, S_f), targets (B,), n_skipped)`` (see
            ``datasets.collate_skipping``) or ``(images, targets)``.
        device: where to run.
        amp_dtype: autocast dtype, or None for float32.
    """
    model.eval()
    conf, pred, top5, tgts = [], [], [], []
    skipped = 0
    for batch in tqdm(loader, desc=desc, unit='batch', leave=False, disable=None):  # no bar when not a terminal
        check_stop()  # a stop signal ends the run at the next step
        images, targets, n_skipped, _ = unpack_batch(batch, device)
        skipped += n_skipped
        if images is None:
            continue
        with autocast_context(device, amp_dtype):
            out = model.forward_details(images)
        logits = [out.coarse_logits.float(), out.fine_logits.float()]
        probs = [lg.softmax(dim=1) for lg in logits]
        stage_max = [p.max(dim=1) for p in probs]
        conf.append(torch.stack([m.values for m in stage_max]).cpu())
        pred.append(torch.stack([m.indices for m in stage_max]).cpu())
        top5.append(torch.stack([top_k_hits(lg, targets).any(dim=1) for lg in logits]).cpu())
        tgts.append(targets.cpu())
    if not tgts:
        raise DatasetError('no readable images in the dataset')
    return StagePredictions(torch.cat(conf, 1), torch.cat(pred, 1), torch.cat(top5, 1), torch.cat(tgts), skipped)


@dataclass
class ExitResult:
    """Outcome of timed early-exit inference.

    Attributes:
        images: images evaluated; timed_images: those inside the timed region (after warm-up).
        seconds: model time over the timed images (data loading and transfers excluded).
        top1, top5: accuracy (%) of the early-exit predictions.
        exit_share: fraction of images that stopped at the coarse stage.
        batch_seconds: time of each timed batch.
        warmup_batches: batches run untimed before timing started (0 when the data had too few batches).
    """
    images: int
    timed_images: int
    seconds: float
    top1: float
    top5: float
    exit_share: float
    skipped: int = 0
    batch_seconds: List[float] = field(default_factory=list)
    warmup_batches: int = 0

    @property
    def throughput(self) -> float:
        """Images per second over the timed batches."""
        return self.timed_images / self.seconds if self.seconds > 0 else float('nan')

    def expected_gflops(self, flops: List[float]) -> float:
        """Average GFLOPs per image at the measured exit share."""
        return self.exit_share * flops[0] + (1 - self.exit_share) * flops[1]


def model_device(model: nn.Module, default: torch.device) -> torch.device:
    """The device of the model's first parameter (or buffer); ``default`` for a model without any (or for a
    predictor that is no ``nn.Module``, such as onnxruntime's)."""
    if not isinstance(model, nn.Module):
        return default
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return default


@torch.no_grad()
@stop_at_steps()
def timed_early_exit(model: nn.Module, loader: Iterable, device: torch.device, threshold: float,
                     warmup_batches: int = 2, amp_dtype: Optional[torch.dtype] = None) -> ExitResult:
    """Early-exit inference at ``threshold`` with the model time of every batch measured.

    Only the forward pass is timed: CUDA events on GPU (recorded on the current stream of the
    model's device, which is also the current device while the forward runs), a wall clock on CPU. The first
    ``warmup_batches`` batches are evaluated but not timed (if the data has no more batches than
    that, every batch is timed and a warning says so).
    """
    model.eval()
    c = model.img_size_list[0]
    time_dev = model_device(model, device)
    use_events = time_dev.type == 'cuda'
    on_model_device = (lambda: torch.cuda.device(time_dev)) if use_events else contextlib.nullcontext
    n_images = n_timed = n_exit = n_top1 = n_top5 = skipped = 0
    seconds = 0.0
    batch_seconds: List[float] = []
    try:
        n_batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    if n_batches is not None and n_batches <= warmup_batches:
        _logger.warning('only %d batch%s, not more than the %d warm-up batches asked for: timing every batch, '
                        'with no warm-up', n_batches, '' if n_batches == 1 else 'es', warmup_batches)
        warmup_batches = 0
    for i, batch in enumerate(tqdm(loader, desc=f'early exit @ {threshold:g}', unit='batch', leave=False,
                                   disable=None)):  # no bar when stderr is not a terminal (piped, logged)
        check_stop()  # a stop signal ends the run at the next step
        x_f, targets, n_skipped, _ = unpack_batch(batch, device)
        skipped += n_skipped
        if x_f is None:
            continue
        x_c = coarse_from_fine(x_f, (c, c))
        timed = i >= warmup_batches
        if use_events:
            with on_model_device():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(time_dev)
                start.record(torch.cuda.current_stream(time_dev))
        else:
            t0 = time.perf_counter()
        with on_model_device(), autocast_context(device, amp_dtype):
            out = model.forward_details([x_c, x_f], threshold)
        if use_events:
            with on_model_device():
                end.record(torch.cuda.current_stream(time_dev))
                torch.cuda.synchronize(time_dev)
            dt = start.elapsed_time(end) / 1000.0
        else:
            dt = time.perf_counter() - t0
        if timed:
            seconds += dt
            n_timed += x_f.shape[0]
            batch_seconds.append(dt)
        logits = out.fine_logits.float()
        n_images += x_f.shape[0]
        n_exit += int(out.exited.sum())
        n_top1 += int(logits.argmax(dim=1).eq(targets).sum())
        n_top5 += int(top_k_hits(logits, targets).any(dim=1).sum())
    if n_images == 0:
        raise DatasetError('no readable images in the dataset')
    return ExitResult(n_images, n_timed, seconds, 100.0 * n_top1 / n_images, 100.0 * n_top5 / n_images,
                      n_exit / n_images, skipped, batch_seconds, warmup_batches)
