"""Evaluate a CF-ViT checkpoint: the released four evaluation modes, on CPU or GPU.

    python dynamic_inference.py --eval-mode {0,1,2,3} --data_url PATH --batch_size N \\
        --model cf_deit_small --checkpoint_path CKPT --coarse-stage-size {7,9} [--threshold T]

Modes (numbers or names):
  0 | anytime     both stages on the whole validation set: top-1 of each stage, per-stage GFLOPs
  1 | budgeted    mode 0, then the sweep over thresholds 0.00..0.99: (expected GFLOPs, top-1)
                  pairs as JSON and a PNG curve; --write-checkpoint also writes them into a NEW
                  checkpoint file (the input file is never modified)
  2 | throughput  real early exit at --threshold: top-1/top-5, exit share, average GFLOPs, images/s
  3 | report      what a released checkpoint stores (flop, anytime and budgeted results) + the curve

--backend onnxruntime EXPORT_DIR runs the folder export_onnx.py wrote instead of a checkpoint (modes
0-2; mode 3 prints its manifest).

Every result lands in --output-dir (default: a new folder under ./output/dynamic_inference/).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import utils.common.startup  # noqa: F401  (first, before torch and timm: HF_HUB_OFFLINE, stop signals)

import torch

from datasets import collate_skipping, eval_transform, open_image_folder
from datasets.folder import find_image_folder
import models
from utils.common.atomic import NAME_MAX, save_atomic, write_json_atomic
from utils.common.checkpoint import load_checkpoint_file
from utils.common.checkpoint_schema import architecture_from_checkpoint
from utils.common.entry import run_entry_point
from utils.common.errors import BadInputError
from utils.common.flags import (
    default_device, default_workers, device_name, float_in, grid_side, int_at_least, positive_int, usable_device,
    worker_count,
)
from utils.common.logs import setup_logging
from utils.common.model_builder import build_from_checkpoint
from utils.common.precision import (
    AMP_CHOICES, check_amp_dtype, describe_float32, resolve_amp_dtype, set_tf32, tf32_state,
)
from utils.common.run_folder import new_run_folder, prepare_output_dir, refuse_overwriting_inputs
from utils.common.signals import quiet_worker_signals
from utils.inference.cpu import bf16_pays, cast_weights_for_autocast, has_mallopt, keep_freed_memory
from utils.inference.early_exit import DEFAULT_THRESHOLDS, sweep_from_predictions
from utils.inference.flops import stage_gflops
from utils.inference.predict import StagePredictions, model_device, predict_stages, timed_early_exit
from utils.vis.plots import plot_budgeted_curve

_logger = logging.getLogger('dynamic_inference')

MODES = {'0': 0, 'anytime': 0, '1': 1, 'budgeted': 1, '2': 2, 'throughput': 2, '3': 3, 'report': 3}
MODE_NAMES = {0: 'anytime', 1: 'budgeted', 2: 'throughput', 3: 'report'}
#: Files a run may write into --output-dir (besides CHECKPOINT_with_results.pth).
OUTPUT_NAMES = ('anytime.json', 'budgeted.json', 'throughput.json', 'checkpoint_results.json', 'export_manifest.json',
                'budgeted_batch_classification.png')
#: Mode 2's threshold when --threshold is not given (the release required the flag).
DEFAULT_MODE2_THRESHOLD = 0.5


def eval_mode(value: str) -> int:
    try:
        return MODES[str(value).lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f'unknown eval mode {value!r}: use 0-3 or {", ".join(MODE_NAMES.values())}')


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('CF-ViT dynamic inference', add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    p.add_argument('--eval-mode', '--eval_mode', type=eval_mode, default=1,
                   help='0|anytime, 1|budgeted, 2|throughput, 3|report (default 1)')
    p.add_argument('--data-url', '--data_url', '--data-path', '--data_path', dest='data_url', default=None,
                   help='dataset root holding val/<class>/<image> (ImageFolder layout), or such a class-folder '
                        'tree itself (modes 0-2; default: the built-in synthetic shapes set)')
    p.add_argument('--batch-size', '--batch_size', type=positive_int, default=64)
    p.add_argument('--model', default=None, choices=models.MODEL_NAMES,
                   help="the model (default: the one a training checkpoint records, else cf_deit_small)")
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra timm.create_model arguments (KEY=VALUE ... or one JSON object); a training '
                        "checkpoint's own size overrides are used by default")
    p.add_argument('--checkpoint-path', '--checkpoint_path', dest='checkpoint_path', default=None)
    p.add_argument('--checkpoint-key', default=None,
                   help="checkpoint entry holding the weights (default: 'model', else the whole file); "
                        "e.g. model_ema")
    p.add_argument('--coarse-stage-size', '--coarse_stage_size', type=grid_side, default=None,
                   help='coarse grid side g: inputs of 16g and 32g pixels at patch 16 (7 or 9 for the released '
                        'models; default: what a training checkpoint records, else 7)')
    p.add_argument('--threshold', type=float_in(0, 1), default=None,
                   help=f'early-exit threshold of mode 2, in [0, 1] (default: {DEFAULT_MODE2_THRESHOLD}, said in the log)')
    p.add_argument('--device', type=device_name, default=default_device())
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the two stages (model.compile_stages()): faster at small batches after a '
                        'compilation of a few minutes; needs a C++ compiler on CPU')
    p.add_argument('--num-workers', '--num_workers', type=worker_count, default=default_workers(4),
                   help='loader processes (default: 4, capped by the cores)')
    p.add_argument('--output-dir', '--output_dir', default=None)
    p.add_argument('--write-checkpoint', action='store_true',
                   help='mode 1: also write the checkpoint with the results added, as a NEW file in --output-dir')
    p.add_argument('--amp-dtype', choices=AMP_CHOICES, default='none',
                   help='autocast dtype for the forward passes (default none: float32, as the released numbers); '
                        'auto: bfloat16 on a CPU where it is native and measured faster (else float32), float16 on '
                        'CUDA. The layers autocast casts get their weights cast once (same outputs, less work)')
    p.add_argument('--allocator', choices=('keep-freed', 'system'), default='keep-freed',
                   help='CPU only: keep-freed (default) keeps freed memory in the heap for the next batch instead '
                        'of page-faulting large activations in again (the process keeps its peak memory, for its '
                        'lifetime); '
                        'system leaves the C library as it is')
    p.add_argument('--tf32', action=argparse.BooleanOptionalAction, default=None,
                   help='CUDA float32: --tf32 runs matmuls and cuDNN convolutions in TF32 (as the release\'s PyTorch '
                        '1.10 did on Ampere and newer: compare float32 throughput with the paper this way), --no-tf32 '
                        'in IEEE float32; default: PyTorch\'s (matmuls IEEE, convolutions TF32). The log says which')
    p.add_argument('--warmup-batches', type=int_at_least(0), default=2, help='mode 2: batches run before timing starts')
    p.add_argument('--unsafe-load', action='store_true',
                   help='allow checkpoints that hold arbitrary Python objects (runs code from the file: trusted files only)')
    p.add_argument('--backend', choices=('torch', 'onnxruntime'), default='torch',
                   help='torch (default): the checkpoint in PyTorch; onnxruntime: the folder export_onnx.py wrote '
                        '(EXPORT_DIR), run in onnxruntime')
    p.add_argument('export_dir', nargs='?', default=None, metavar='EXPORT_DIR',
                   help='with --backend onnxruntime: the export folder')
    return p


# ---------------------------------------------------------------------------------------- setup
def run_name(args: argparse.Namespace, checkpoint: Dict[str, Any]) -> str:
    """``<model>_g<g>`` of the default output folder: the flags, else what the checkpoint records (or the
    export folder's manifest, which sets ``args.model``), else the released defaults (cf_deit_small, 7),
    as :func:`utils.common.model_builder.build_from_checkpoint` builds it."""
    recorded = architecture_from_checkpoint(checkpoint) if checkpoint else {}
    model = args.model or recorded.get('model', 'cf_deit_small')
    g = args.coarse_stage_size or recorded.get('coarse_stage_size', 7)
    return f'{model}_g{g}'


def output_dir(args: argparse.Namespace, checkpoint: Optional[Dict[str, Any]] = None) -> Path:
    if args.output_dir:
        out = Path(args.output_dir)
    else:
        out = new_run_folder('dynamic_inference', f'{run_name(args, checkpoint or {})}_{MODE_NAMES[args.eval_mode]}')
    prepare_output_dir(out, [args.data_url], '--output-dir', unwritable='output folder {path} is not writable')
    return out


def val_loader(args: argparse.Namespace, model: torch.nn.Module, num_classes: int):
    if not args.data_url:
        from datasets.synthetic import make_synthetic_dataset
        args.data_url = str(make_synthetic_dataset())
        _logger.info('no --data_url given: using the built-in synthetic shapes dataset in %s', args.data_url)
    root = Path(args.data_url)
    if not root.is_dir():
        raise BadInputError(f'dataset folder not found: {root}')
    # a dataset root holding val/<class>/<image>, or an ImageFolder itself (<class>/<image>), as visualize.py reads
    valdir = find_image_folder(root)
    dataset = open_image_folder(valdir, eval_transform(model))
    if len(dataset.classes) != num_classes:
        raise BadInputError(f'{valdir} has {len(dataset.classes)} classes but the checkpoint head has {num_classes}')
    if args.batch_size < 1:
        raise BadInputError(f'--batch-size must be positive, got {args.batch_size}')
    _logger.info('validation set: %d images of %d classes in %s', len(dataset), num_classes, valdir)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
        pin_memory=args.device.startswith('cuda'), collate_fn=collate_skipping, worker_init_fn=quiet_worker_signals)


def fmt(values: Sequence[float], digits: int = 3) -> str:
    return '[' + ', '.join(f'{v:.{digits}g}' if digits > 2 else f'{v:.{digits}f}' for v in values) + ']'


def format_stored(key: str, value: Any) -> str:
    """A result stored in a checkpoint, printed as modes 0 and 1 print it: GFLOPs to 4 significant digits,
    top-1 in percent to 2 decimals (the JSON file keeps the stored values)."""
    value = _jsonable(value)
    numbers = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
    if key == 'flop' and numbers:
        return fmt([float(v) for v in value], 4)
    if key == 'anytime_classification' and numbers:
        return fmt([float(v) for v in value], 2)
    if key == 'budgeted_batch_classification' and isinstance(value, (list, tuple)) and len(value) == 2:
        return f'[{abbreviate(value[0])}, {abbreviate(value[1], digits=2)}]'
    return abbreviate(value)


def abbreviate(value: Any, keep: int = 3, digits: Optional[int] = None) -> str:
    """A stored result for the log: lists longer than ``2 * keep + 1`` show their ends and length (the
    JSON file holds every value); the budgeted curve is a pair of such lists."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        return '[' + ', '.join(abbreviate(v, keep) for v in value) + ']'
    if isinstance(value, (list, tuple)) and len(value) > 2 * keep + 1:
        ends = [f'{float(v):.{digits}f}' if digits is not None else f'{float(v):.4g}'
                for v in (*value[:keep], *value[-keep:])]
        return f'[{", ".join(ends[:keep])}, ... ({len(value)} values) ..., {", ".join(ends[keep:])}]'
    if digits is not None and isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return fmt([float(v) for v in value], digits)
    return str(value)


# ---------------------------------------------------------------------------------------- modes
def results_checkpoint_name(checkpoint_path: str) -> str:
    """``<stem>_with_results.pth``, the stem cut so that the name stays a legal file name (:data:`NAME_MAX`
    bytes): a long checkpoint name never makes the run fail when it saves, after the whole evaluation."""
    suffix = '_with_results.pth'
    return os.fsdecode(os.fsencode(Path(checkpoint_path).stem)[:NAME_MAX - len(suffix)]) + suffix


def report_checkpoint(args: argparse.Namespace, checkpoint: Dict[str, Any], out: Path) -> Dict[str, Any]:
    """Mode 3: print the released results stored in a checkpoint and plot its curve."""
    keys = ('flop', 'anytime_classification', 'budgeted_batch_classification')
    missing = [k for k in keys if k not in checkpoint]
    if len(missing) == len(keys):
        raise BadInputError(f'{args.checkpoint_path} stores no evaluation results ({", ".join(keys)}): mode 3 reads a '
                            f'released checkpoint, or the {results_checkpoint_name(args.checkpoint_path)} that '
                            '--eval-mode 1 ... --write-checkpoint writes into its output folder')
    result = {k: checkpoint.get(k) for k in keys}
    for k in keys:
        _logger.info('%s : %s', k, format_stored(k, result[k]))
    budget = result['budgeted_batch_classification']
    if budget is not None:
        gflops, acc = [float(v) for v in budget[0]], [float(v) for v in budget[1]]
        stage_points = None
        if result['flop'] is not None and result['anytime_classification'] is not None:
            stage_points = list(zip([float(v) for v in result['flop']],
                                    [float(v) for v in result['anytime_classification']]))
        plot_budgeted_curve(gflops, acc, out / 'budgeted_batch_classification.png', stage_points,
                            title=f'{Path(args.checkpoint_path).name} (stored results)',
                            thresholds=DEFAULT_THRESHOLDS if len(gflops) == 100 else None)
        _logger.info('curve: %s', out / 'budgeted_batch_classification.png')
    write_json_atomic(_jsonable(result), out / 'checkpoint_results.json')
    _logger.info('every value: %s', out / 'checkpoint_results.json')
    return result


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def check_stored_flops(checkpoint: Dict[str, Any], flops: List[float]) -> None:
    stored = checkpoint.get('flop')
    if stored is None:
        return
    stored = [float(v) for v in stored]
    if len(stored) != 2 or any(abs(a - b) > 0.01 * b for a, b in zip(stored, flops)):
        _logger.warning('the checkpoint stores flop=%s but this model counts %s GFLOPs', stored, fmt(flops, 4))


def onnx_predictor(args: argparse.Namespace):
    """--backend onnxruntime: the export folder as a predictor with the model's early-exit contract
    (``utils.inference.onnx_runtime.OnnxEarlyExit``)."""
    from utils.inference.onnx_runtime import OnnxEarlyExit
    if not args.export_dir:
        raise BadInputError('--backend onnxruntime needs the export folder: dynamic_inference.py --backend onnxruntime DIR')
    unsupported = [flag for flag, given in (('--checkpoint_path', args.checkpoint_path), ('--compile', args.compile),
                                            ('--write-checkpoint', args.write_checkpoint),
                                            ('--amp-dtype', args.amp_dtype not in ('none', 'float32', 'auto')))
                   if given]
    if unsupported:
        raise BadInputError(f'{", ".join(unsupported)} cannot be used with --backend onnxruntime (the export folder '
                            'holds the model)')
    predictor = OnnxEarlyExit(args.export_dir)
    manifest = predictor.manifest
    for flag, key in (('model', 'model'), ('coarse_stage_size', 'coarse_stage_size')):
        given = getattr(args, flag)
        if given is not None and given != manifest[key]:
            raise BadInputError(f'--{flag.replace("_", "-")} {given} but {args.export_dir} holds an export of '
                                f'{manifest[key]}')
        setattr(args, flag, manifest[key])
    args.checkpoint_path = str(args.export_dir)
    return predictor


def report_manifest(manifest: Dict[str, Any], out: Path) -> None:
    """Mode 3 with --backend onnxruntime: print the export's manifest."""
    keys = ('model', 'coarse_stage_size', 'img_size_list', 'num_classes', 'gflops', 'stage_gflops', 'exporter',
            'quantize', 'data_config')
    result = {k: manifest.get(k) for k in keys}
    result['flop'] = result['gflops']
    for k in ('flop',) + keys[:-1]:
        _logger.info('%s : %s', k, fmt(result[k], 4) if k == 'flop' and result[k] else result[k])
    write_json_atomic(result, out / 'export_manifest.json')


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Do the work of :func:`main` in ``--eval_mode``: open the checkpoint (or the ONNX export), prepare the
    device, the model and its precision, then run the mode. Returns the result that is written as JSON."""
    onnx = args.backend == 'onnxruntime'
    predictor, checkpoint, out = open_source(args)
    if onnx and args.eval_mode == 3:
        report_manifest(predictor.manifest, out)
        return predictor.manifest
    _logger.info('output folder: %s', out)
    written = [out / n for n in OUTPUT_NAMES] + [out / f'{Path(args.checkpoint_path).stem}_with_results.pth']
    refuse_overwriting_inputs(written, [args.checkpoint_path], BadInputError)  # the input is never replaced
    if args.eval_mode == 3:
        return report_checkpoint(args, checkpoint, out)

    if args.eval_mode == 2 and args.threshold is None:
        args.threshold = DEFAULT_MODE2_THRESHOLD
        _logger.info('no --threshold given: mode 2 exits at the default threshold %g', args.threshold)
    device = usable_device(args.device)
    model, loader, flops, device = prepare_model(args, predictor, checkpoint, device)
    amp = prepare_precision(args, model, device, onnx)
    result = run_record(args, model, device, amp, flops)
    if args.eval_mode == 2:
        return timed_throughput(args, model, loader, device, amp, flops, out, result)
    preds = anytime_classification(model, loader, device, amp, result)
    if args.eval_mode == 1:
        budgeted_classification(args, preds, flops, checkpoint, out, result)
    write_json_atomic(result, out / f'{MODE_NAMES[args.eval_mode]}.json')
    return result


def open_source(args: argparse.Namespace) -> Tuple[Any, Dict[str, Any], Path]:
    """``(ONNX predictor or None, checkpoint, output folder)``: the export of ``--export_dir`` (``--backend
    onnxruntime``; the checkpoint is then ``{}``) or the checkpoint of ``--checkpoint_path``."""
    if args.backend == 'onnxruntime':
        predictor = onnx_predictor(args)  # sets args.model and args.coarse_stage_size
        return predictor, {}, output_dir(args)
    if args.export_dir:
        raise BadInputError(f'{args.export_dir}: an export folder is read with --backend onnxruntime')
    if not args.checkpoint_path:
        raise BadInputError('--checkpoint_path is required')
    checkpoint = load_checkpoint_file(args.checkpoint_path, unsafe=args.unsafe_load)
    if not isinstance(checkpoint, dict):
        raise BadInputError(f'{args.checkpoint_path} does not hold a dict checkpoint')
    return None, checkpoint, output_dir(args, checkpoint)


def prepare_model(args: argparse.Namespace, predictor: Any, checkpoint: Dict[str, Any],
                  device: torch.device) -> Tuple[Any, Any, List[float], torch.device]:
    """``(model, validation loader, FLOPs of both stages, device)``: the ONNX predictor (its batches stay on the
    CPU), or the checkpoint's model on ``device`` in evaluation mode, its stored FLOPs checked."""
    if predictor is not None:
        if device.type != 'cpu':  # onnxruntime takes host arrays: its execution providers decide where it runs
            _logger.info('--backend onnxruntime: batches stay on the CPU (onnxruntime runs on its execution '
                         'providers %s; --device %s applies to --backend torch only)', predictor.providers,
                         args.device)
            device = torch.device('cpu')
        loader = val_loader(args, predictor, predictor.num_classes)
        _logger.info('onnxruntime: %s', predictor)
        return predictor, loader, predictor.flops, device
    model, args.model, args.coarse_stage_size = build_from_checkpoint(  # the class count read from its head
        checkpoint, args.model, args.coarse_stage_size, args.model_kwargs, args.checkpoint_key)
    loader = val_loader(args, model, model.num_classes)
    model.to(device).eval()
    flops = stage_gflops(model)
    check_stored_flops(checkpoint, flops)
    return model, loader, flops, device


def prepare_precision(args: argparse.Namespace, model: Any, device: torch.device,
                      onnx: bool) -> Optional[torch.dtype]:
    """The autocast dtype of ``--amp-dtype`` (None: float32), TF32 and cuDNN autotuning on CUDA, the weights
    cast once for autocast, ``--allocator`` and ``--compile``."""
    amp = None if onnx else resolve_amp_dtype(args.amp_dtype, device, cpu_bf16_pays=bf16_pays)
    check_amp_dtype(amp, device)  # BadInputError: bfloat16 on a GPU without it
    if device.type == 'cuda':
        set_tf32(args.tf32)
        _logger.info('%s', describe_float32(args.tf32))
        # a training run earlier in this process (the quick start) leaves cuDNN autotuning on; mode 2 would then
        # autotune each new number of rows that go on inside the timed region
        torch.backends.cudnn.benchmark = False
    if args.amp_dtype == 'auto' and not onnx:
        _logger.info('--amp-dtype auto: %s on %s', str(amp).replace('torch.', '') if amp else 'float32 (no autocast)',
                     device.type)
    if amp is not None:
        cast_weights_for_autocast(model, amp)
    if device.type == 'cpu' and args.allocator == 'keep-freed' and not keep_freed_memory():
        _logger.info('--allocator keep-freed: %s; the allocator is left as it is',
                     'the C library refused the thresholds' if has_mallopt() else 'this C library has no mallopt')
    if args.compile:
        # mode 2: the fine stage sees a new number of rows in each batch; dynamic shapes compile it once
        model.compile_stages(**(dict(dynamic=True) if args.eval_mode == 2 else {}))
        _logger.info('the two stages are compiled with torch.compile on first use (this takes a while)%s',
                     ', with dynamic shapes' if args.eval_mode == 2 else '')
    return amp


def run_record(args: argparse.Namespace, model: Any, device: torch.device, amp: Optional[torch.dtype],
               flops: List[float]) -> Dict[str, Any]:
    """The result's description of the run (model, device, precision, backend, FLOPs); logs the FLOPs."""
    result: Dict[str, Any] = {
        'model': args.model, 'coarse_stage_size': args.coarse_stage_size, 'img_size_list': model.img_size_list,
        'checkpoint': str(args.checkpoint_path), 'device': str(device), 'amp_dtype': args.amp_dtype,
        'autocast': str(amp).replace('torch.', '') if amp else None, 'allocator': args.allocator,
        'torch': torch.__version__, 'flop': flops, 'backend': args.backend,
    }
    if device.type == 'cuda':
        result.update(gpu=torch.cuda.get_device_name(device), tf32=tf32_state(), tf32_flag=args.tf32,
                      cudnn_benchmark=torch.backends.cudnn.benchmark)
    if args.backend == 'onnxruntime':
        result.update(export_dir=str(args.export_dir), onnx_providers=model.providers,
                      quantize=model.manifest.get('quantize'))
    _logger.info('flops : %s  (GFLOPs of one image: [coarse, coarse + fine])', fmt(flops, 4))
    return result


def anytime_classification(model: Any, loader: Any, device: torch.device, amp: Optional[torch.dtype],
                           result: Dict[str, Any]) -> StagePredictions:
    """Modes 0 and 1: both stages on every image; their top-1 goes into ``result``."""
    preds = predict_stages(model, loader, device, amp)
    anytime = preds.accuracy()
    result.update(images=int(preds.targets.numel()), skipped_images=preds.skipped,
                  anytime_classification=anytime)
    _logger.info('anytime_classification : %s  (top-1 %% of the coarse and the fine stage, %d images)',
                 fmt(anytime, 2), preds.targets.numel())
    if preds.skipped:
        _logger.warning('%d unreadable images were skipped', preds.skipped)
    return preds


def budgeted_classification(args: argparse.Namespace, preds: StagePredictions, flops: List[float],
                            checkpoint: Dict[str, Any], out: Path, result: Dict[str, Any]) -> None:
    """Mode 1: the accuracy-FLOPs curve over the thresholds (into ``result``, and its figure), and with
    ``--write-checkpoint`` a copy of the checkpoint with the results."""
    anytime = result['anytime_classification']
    gflops, acc = sweep_from_predictions(preds.confidence[0], preds.correct[0], preds.correct[1], flops)
    result['thresholds'] = DEFAULT_THRESHOLDS
    result['budgeted_batch_classification'] = [gflops, acc]
    for t in (0.0, 0.5, 0.7, 0.9, 0.99):
        i = round(t * 100)
        _logger.info('threshold %.2f: %.4f GFLOPs, top-1 %.2f%%', DEFAULT_THRESHOLDS[i], gflops[i], acc[i])
    plot_budgeted_curve(gflops, acc, out / 'budgeted_batch_classification.png',
                        list(zip(flops, anytime)), title=f'{args.model}, {args.coarse_stage_size}x'
                        f'{args.coarse_stage_size} coarse grid, {preds.targets.numel()} images',
                        thresholds=DEFAULT_THRESHOLDS)
    _logger.info('curve: %s', out / 'budgeted_batch_classification.png')
    if args.write_checkpoint:
        new = dict(checkpoint, flop=flops, anytime_classification=anytime,
                   budgeted_batch_classification=[gflops, acc])
        target = out / results_checkpoint_name(args.checkpoint_path)
        save_atomic(new, target)
        result['written_checkpoint'] = str(target)
        _logger.info('checkpoint with results: %s', target)


def timed_throughput(args: argparse.Namespace, model: Any, loader: Any, device: torch.device,
                     amp: Optional[torch.dtype], flops: List[float], out: Path,
                     result: Dict[str, Any]) -> Dict[str, Any]:
    """Mode 2: timed early exit at ``--threshold``: accuracy, exit share, average GFLOPs and throughput,
    written to ``throughput.json``."""
    res = timed_early_exit(model, loader, device, args.threshold, args.warmup_batches, amp)
    result.update(threshold=args.threshold, images=res.images, timed_images=res.timed_images,
                  skipped_images=res.skipped, top1=res.top1, top5=res.top5, exit_share=res.exit_share,
                  average_gflops=res.expected_gflops(flops), seconds=res.seconds, throughput=res.throughput,
                  batch_size=args.batch_size, warmup_batches=res.warmup_batches,
                  warmup_batches_requested=args.warmup_batches,
                  timer='cuda events' if model_device(model, device).type == 'cuda' else 'wall clock (perf_counter)',
                  threads=torch.get_num_threads())
    _logger.info('* Acc@1 %.3f Acc@5 %.3f  exited at the coarse stage: %.1f%%  average GFLOPs: %.4f',
                 res.top1, res.top5, 100 * res.exit_share, res.expected_gflops(flops))
    _logger.info('throughput: %.1f images/s (%d images timed in %.3f s, %s)', res.throughput, res.timed_images,
                 res.seconds, f'{res.warmup_batches} warm-up batches excluded' if res.warmup_batches else 'no warm-up')
    write_json_atomic(result, out / 'throughput.json')
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_logging(stream=sys.stdout, style='plain')  # the log is the printed result
    return run_entry_point(lambda: run(args), 'dynamic_inference.py', writing='cannot write the results')


if __name__ == '__main__':
    sys.exit(main())
