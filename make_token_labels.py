"""Write token-labeling label maps for every training image of an ImageFolder, with a teacher.

The maps are what ``main_lvvit.py --token-label --token-label-data DIR`` reads (SPEC 7): one file
``DIR/<class folder>/<image stem>.pt`` per image, a float32 tensor (2, K, H, W) with the teacher's
top-K per-location logits ``[0]`` and their class indices ``[1]``, on the teacher's H x W grid
over the whole image (resized to the teacher's input size without cropping). The TokenLabeling
release ships such maps for ImageNet only; this makes them for any dataset.

Teachers:

- a project checkpoint of a CF model (``cf_lvvit_*``, ``cf_deit_*``): one prediction per fine
  patch from the fine stage on its inference path with informative selection (the model's dense
  output laid on the fine grid: a non-informative coarse patch's prediction covers its 4 cells;
  ``aux_head`` of CF-LV-ViT, ``head`` of CF-DeiT on the patch tokens), or on every fine patch with
  ``--full-fine-grid``. A training checkpoint names its architecture; a released one needs
  ``--teacher NAME --coarse-stage-size G``.
- any timm model name plus a checkpoint (``--checkpoint``) or timm's own weights
  (``--pretrained``, from the local cache when offline): the model's classifier head applied to
  every location: ViT-style models (token sequences) through ``forward_head`` on each patch token,
  CNNs (NCHW or NHWC feature maps) through ``forward_head`` on each feature-map cell.

Resumable: images whose map exists are skipped (files are written atomically, so an existing file
is complete); ``--num-shards/--shard-index`` split the work over processes or machines.

Example::

    python make_token_labels.py PATH_TO_DATA --teacher cf_lvvit_small --checkpoint cf-lvvit-s-224.pth \\
        --coarse-stage-size 7 --output PATH_TO_TOKENLABEL
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import utils.common.startup  # noqa: F401  (first, before torch and timm: HF_HUB_OFFLINE, stop signals)

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from datasets.folder import DatasetError, collate_skipping, open_image_folder, read_or_skip
from datasets.safe_read import UnsafeFileError, read_structured
from datasets.token_labels.maps import (
    LABEL_MAP_SUFFIX, METADATA_NAME, check_distinct_label_maps, label_map_path,
)
import models  # registers the CF models with timm
from models.token_ops import scatter_to_fine_grid
from utils.common.atomic import save_atomic, sha256_file, write_json_atomic
from utils.common.checkpoint import extract_state_dict, load_checkpoint_file
from utils.common.entry import run_entry_point
from utils.common.errors import EXIT_BAD_INPUT, BadInputError, ModelBuildError, OutputDirError  # noqa: F401 (make_token_labels.EXIT_BAD_INPUT)
from utils.common.flags import (
    default_device, default_workers, device_name, grid_side, int_at_least, positive_int, worker_count,
)
from utils.common.logs import setup_logging
from utils.common.model_builder import build_model_from_name, resolve_architecture
from utils.common.run_folder import RunLock, prepare_output_dir
from utils.common.signals import check_stop, quiet_worker_signals, stop_at_steps

_logger = logging.getLogger('make_token_labels')

#: Classes kept per location in the released ImageNet maps.
DEFAULT_TOPK = 5


# ---------------------------------------------------------------------------------------------- flags
def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Token-labeling label maps from a teacher', add_help=add_help)
    parser.add_argument('data', metavar='DIR', help='dataset root holding train/ (as main_lvvit.py takes it), or the '
                                                    'training ImageFolder itself')
    parser.add_argument('--output', '-o', required=True, metavar='DIR', help='where the label maps go')
    g = parser.add_argument_group('teacher')
    g.add_argument('--teacher', default=None,
                   help='a CF model (cf_lvvit_small, ...) or any timm model name; default: the model named in '
                        "--checkpoint's training arguments")
    g.add_argument('--checkpoint', default=None, help='teacher weights (a project or timm checkpoint)')
    g.add_argument('--use-ema', action='store_true', help="use the checkpoint's model_ema weights")
    g.add_argument('--pretrained', action='store_true', help="timm's pretrained weights (local cache when offline)")
    g.add_argument('--coarse-stage-size', '--coarse_stage_size', type=grid_side, default=None,
                   help='coarse grid of a CF teacher (default: from the checkpoint, else 7)')
    g.add_argument('--embed-dim', type=int_at_least(1), default=None, help='width override of the teacher')
    g.add_argument('--depth', type=int_at_least(1), default=None, help='block count override of the teacher')
    g.add_argument('--num-heads', type=int_at_least(1), default=None, help='head count override of the teacher')
    g.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='more timm.create_model arguments of the teacher, values as Python literals')
    g.add_argument('--full-fine-grid', action='store_true',
                   help='CF teachers: run the fine stage on all fine patches instead of its inference path with '
                        'informative selection (where a non-informative coarse patch labels its 4 fine cells)')
    g.add_argument('--input-size', type=int_at_least(16, 4096), default=None,
                   help='side the whole image is resized to (default: the teacher\'s input size)')
    g.add_argument('--unsafe-load', action='store_true', help='allow full unpickling of a checkpoint you trust')
    g = parser.add_argument_group('maps')
    g.add_argument('--topk', type=int_at_least(1), default=None,
                   help='classes kept per location, K (default: 5, as the released maps, or all if fewer)')
    g.add_argument('--map-size', type=int_at_least(1, 1024), default=None,
                   help='average the logits to this H = W (default: the teacher\'s own grid)')
    g = parser.add_argument_group('run')
    g.add_argument('-b', '--batch-size', type=positive_int, default=64)
    g.add_argument('-j', '--workers', type=worker_count, default=default_workers(4),
                   help='image decoding processes (default: 4, capped by the cores)')
    g.add_argument('--write-threads', type=int_at_least(1), default=4, help='threads writing files')
    g.add_argument('--device', type=device_name, default=default_device())
    g.add_argument('--amp', action='store_true', help='teacher forward under torch.autocast')
    g.add_argument('--num-shards', type=int_at_least(1), default=1, help='split the images into this many shards ...')
    g.add_argument('--shard-index', type=int_at_least(0), default=0, help='... and do this one (0-based)')
    return parser


# ---------------------------------------------------------------------------------------------- teacher
def _classifier_classes(state_dict: Dict[str, torch.Tensor], classifier: Any) -> Optional[int]:
    """Output classes of the checkpoint's classifier (timm's cfg names it), if it can be found."""
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    for name in names:
        weight = state_dict.get(f'{name}.weight') if name else None
        if weight is not None and weight.dim() >= 2:
            return int(weight.shape[0])
    return None


def build_teacher(args: argparse.Namespace, num_classes: int) -> Tuple[nn.Module, str]:
    """The teacher in eval mode and its name.

    Raises:
        ModelBuildError: unknown name, no weights, a class count other than the dataset's.
        CheckpointError: a checkpoint that cannot be read or does not fit.
    """
    checkpoint = load_checkpoint_file(args.checkpoint, unsafe=args.unsafe_load) if args.checkpoint else None
    sizes = {key: getattr(args, key) for key in ('embed_dim', 'depth', 'num_heads') if getattr(args, key) is not None}
    name, grid, kwargs = resolve_architecture(checkpoint, args.teacher, args.coarse_stage_size, args.model_kwargs,
                                              sizes=sizes, default_model=None)
    if not name:
        raise ModelBuildError('name the teacher: --teacher NAME (a timm model or cf_*); the checkpoint does not say')
    if not timm.is_model(name):
        raise ModelBuildError(f'unknown teacher {name!r}: not a timm model name (timm.list_models() lists them)')
    if checkpoint is None and not args.pretrained:
        raise ModelBuildError('a teacher needs trained weights: pass --checkpoint FILE (or --pretrained for timm weights)')
    is_cf = name in models.MODEL_NAMES
    if is_cf:
        kwargs['coarse_stage_size'] = grid
    elif args.coarse_stage_size is not None:
        raise ModelBuildError(f'--coarse-stage-size is for CF teachers, not {name}')
    state_dict = None
    if checkpoint is not None:
        state_dict = extract_state_dict(checkpoint, 'model_ema' if args.use_ema else None)
        classifier = 'head' if is_cf else timm.models.get_pretrained_cfg_value(name, 'classifier') or 'head'
        found = _classifier_classes(state_dict, classifier)
        if found is not None:
            kwargs.setdefault('num_classes', found)
    kwargs.setdefault('num_classes', num_classes)
    try:
        model = build_model_from_name(name, state_dict, pretrained=args.pretrained and checkpoint is None, **kwargs)
    except OSError as e:  # --pretrained weights not in the cache
        raise ModelBuildError(f'cannot build the teacher {name} with {kwargs}: {e}') from e
    classes = getattr(model, 'num_classes', None)
    if classes != num_classes:
        raise ModelBuildError(f'the teacher {name} predicts {classes} classes but the dataset has {num_classes} class '
                           f'folders: label maps must index the training classes (fine-tune the teacher on this '
                           f'dataset first)')
    return model.eval(), name


def teacher_input_size(model: nn.Module, override: Optional[int]) -> int:
    """The side images are resized to: ``--input-size``, else the teacher's own input size. A CF teacher
    takes its fine size only: another ``--input-size`` is one line (:class:`ModelBuildError`)."""
    if hasattr(model, 'img_size_list'):  # CF models: the fine input, fixed by the grid
        fine = int(model.img_size_list[1])
        if override and int(override) != fine:
            raise ModelBuildError(f'--input-size {override}: the CF teacher takes {fine} px images (its fine stage, '
                                  f'{model.fine_grid[0]}x{model.fine_grid[1]} patches); drop --input-size or pass '
                                  f'{fine}')
        return fine
    if override:
        return int(override)
    img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if img_size is not None and not getattr(model, 'dynamic_img_size', False):
        return int(img_size[0])
    return int(resolve_data_config({}, model=model)['input_size'][-1])


@torch.no_grad()
def dense_logits(model: nn.Module, x: torch.Tensor, selection: bool = True) -> torch.Tensor:
    """Per-location logits (B, C, h, w) of a teacher on images (B, 3, S, S).

    Args:
        model: the teacher in eval mode.
        x: normalized images at the teacher's input size.
        selection: CF teachers only: the fine stage with informative selection (its inference
            path; a non-informative coarse token's prediction covers its 4 fine cells), else on
            all fine patches.

    Raises:
        ModelBuildError: a model whose features are neither token sequences nor feature maps.
    """
    if hasattr(model, 'forward_coarse') and hasattr(model, 'fine_grid'):  # CF model: the fine grid
        x_c, x_f = model.split_inputs(x)
        state = model.forward_coarse(x_c)
        fine = model.forward_fine(x_f, state, selection=selection, dense=True)
        h, w = model.fine_grid
        if getattr(model, 'return_dense', False):  # CF-LV-ViT: its own dense output, on the fine grid
            logits = fine.output[1]  # (B, N_f, C)
        else:  # CF-DeiT: the classifier on every patch token
            logits = model.head(fine.tokens[:, 1:])
            if selection:
                logits = scatter_to_fine_grid(logits, fine.important_coarse_index, fine.unimportant_coarse_index,
                                              model.coarse_grid)
        return logits.transpose(1, 2).reshape(x.shape[0], -1, h, w)
    feats = model.forward_features(x)
    if isinstance(feats, (list, tuple)):
        feats = feats[-1]
    B = x.shape[0]
    if feats.dim() == 3:  # (B, prefix + h*w, D) tokens
        prefix = int(getattr(model, 'num_prefix_tokens', 1))
        patches = feats[:, prefix:]  # (B, N, D)
        N, D = patches.shape[1:]
        grid = getattr(getattr(model, 'patch_embed', None), 'dynamic_feat_size', None)
        h, w = grid((x.shape[-2], x.shape[-1])) if callable(grid) else (int(round(N ** 0.5)),) * 2
        if h * w != N:
            raise ModelBuildError(f'cannot lay {N} patch tokens on a grid')
        # each patch token alone, repeated into every prefix slot: token and average pooling both see it
        tokens = patches.reshape(B * N, 1, D).expand(-1, prefix + 1, -1)
        return model.forward_head(tokens).reshape(B, h, w, -1).permute(0, 3, 1, 2)
    if feats.dim() == 4:  # feature maps, NCHW or (Swin-like) NHWC
        nhwc = str(getattr(model, 'output_fmt', 'NCHW')).endswith('NHWC')
        cells = feats if nhwc else feats.permute(0, 2, 3, 1)  # (B, h, w, D)
        _, h, w, D = cells.shape
        cells = cells.reshape(B * h * w, 1, 1, D)  # every cell as a 1x1 map
        if not nhwc:
            cells = cells.permute(0, 3, 1, 2)
        return model.forward_head(cells).reshape(B, h, w, -1).permute(0, 3, 1, 2)
    raise ModelBuildError(f'the teacher returns features of shape {tuple(feats.shape)}: neither tokens (B, N, D) nor '
                       f'feature maps (B, D, h, w)')


def top_k_maps(logits: torch.Tensor, k: int, map_size: Optional[int] = None) -> torch.Tensor:
    """(B, C, h, w) logits -> (B, 2, K, H, W) float32: top-K logits and their class indices."""
    logits = logits.float()
    if map_size:
        logits = F.adaptive_avg_pool2d(logits, map_size)
    values, index = logits.topk(k, dim=1)  # (B, K, H, W) each
    return torch.stack([values, index.float()], dim=1)


# ---------------------------------------------------------------------------------------------- data
class _PendingImages(Dataset):
    """The images still without a map: ``(image, sample index)``, or None for an unreadable file."""

    def __init__(self, samples: Sequence[Tuple[str, int]], indices: Sequence[int], transform: Callable) -> None:
        self.samples, self.indices, self.transform = samples, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Optional[Tuple[torch.Tensor, int]]:
        index = self.indices[i]
        img = read_or_skip(self.samples[index][0])
        return None if img is None else (self.transform(img), index)


LABELS_LOCK = '.cfvit-labels.lock'


#: Entries of token_labels.json that must agree for two runs to write into one folder.
IDENTITY = ('teacher', 'checkpoint_sha256', 'use_ema', 'full_fine_grid', 'input_size', 'topk', 'map_size',
            'pretrained')


def _metadata_lock(out: Path) -> RunLock:
    """A waiting lock on ``out/.cfvit-labels.lock`` (held for milliseconds: shards wait for each other; the
    file stays, as removing it would let two shards lock two files)."""
    return RunLock(out, LABELS_LOCK, wait=True, what='the label-folder lock')


def claim_label_folder(out: Path, identity: Dict[str, Any], classes: List[str]) -> Dict[str, Any]:
    """Write (or check) ``token_labels.json`` before any map, so that maps of two teachers never mix in one
    folder: a folder whose metadata names another teacher, checkpoint or map layout is refused; one with
    maps but no metadata (an older or foreign folder) is refused too. Returns the metadata."""
    path = out / METADATA_NAME
    with _metadata_lock(out):  # the shards of one job check and write it one at a time
        if os.path.lexists(path):
            try:
                meta = read_structured(path, what='the label-map metadata', follow=False)
            except (OSError, UnsafeFileError) as e:
                raise OutputDirError(f'{e}; --output must be a label-map folder of this teacher or a new one') from None
            if not isinstance(meta, dict):
                raise OutputDirError(f'{path} is not label-map metadata: choose another --output')
            differ = [k for k in IDENTITY if k in meta and meta[k] != identity[k]
                      and not (k == 'checkpoint_sha256' and meta[k] is None)]
            if meta.get('classes') not in (None, classes):
                differ.append('classes')
            if differ:
                theirs = ', '.join(f'{k}={meta.get(k)!r}' for k in differ)
                raise OutputDirError(f'{out} holds label maps of another teacher or layout ({theirs}); this run has '
                                     f'{", ".join(f"{k}={identity.get(k, classes)!r}" for k in differ)}: choose '
                                     f'another --output (maps of two teachers must not mix)')
            return {**meta, **identity, 'map_shape': meta.get('map_shape'), 'classes': classes}
        if any(out.glob('*/*' + LABEL_MAP_SUFFIX)):
            raise OutputDirError(f'{out} holds label maps but no {METADATA_NAME} naming their teacher: choose another '
                                 f'--output (maps of two teachers must not mix)')
        meta = {**identity, 'map_shape': None,
                'scores': 'teacher logits; a class outside the top K counts as logit 0', 'classes': classes}
        write_json_atomic(meta, path)
        return meta


def resolve_image_folder(data: str) -> Path:
    """``DATA/train`` if it exists, else ``DATA`` itself."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DatasetError(f'dataset folder not found: {root}')
    return root / 'train' if (root / 'train').is_dir() else root


# ---------------------------------------------------------------------------------------------- run
def _teacher_transform(model: nn.Module, size: int) -> transforms.Compose:
    """The teacher's evaluation transform: a bicubic resize to ``size`` and its normalization."""
    cfg = resolve_data_config({}, model=model)
    return transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(cfg['mean'], cfg['std']),
    ])


def _identity(args: argparse.Namespace, name: str, size: int) -> Dict[str, Any]:
    """What makes two runs' maps interchangeable; token_labels.json names it from the start."""
    return {
        'teacher': name, 'checkpoint': str(args.checkpoint) if args.checkpoint else None,
        'checkpoint_sha256': sha256_file(args.checkpoint) if args.checkpoint else None,
        'use_ema': args.use_ema, 'full_fine_grid': args.full_fine_grid, 'input_size': size, 'topk': args.topk,
        'map_size': args.map_size, 'pretrained': bool(args.pretrained and not args.checkpoint),
    }


def _write_maps(args: argparse.Namespace, model: nn.Module, loader: DataLoader, targets: List[Path],
                device: torch.device) -> Tuple[int, int, Optional[Tuple[int, ...]]]:
    """Run the teacher over ``loader`` and write each image's map to its target, on ``--write-threads``
    threads. Returns ``(maps written, unreadable images, the maps' shape or None)``."""
    amp_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    written = unreadable = 0
    map_shape: Optional[Tuple[int, ...]] = None
    futures: List[Future] = []
    with stop_at_steps(), ThreadPoolExecutor(max_workers=max(1, args.write_threads)) as pool:
        bar = tqdm(loader, total=len(loader), desc='label maps', unit='batch', dynamic_ncols=True,
                   disable=None)  # no bar when stderr is not a terminal (piped, logged)
        for images, indices, skipped in bar:  # indices: the samples' positions, as collate_skipping's targets
            check_stop()  # a stop signal ends the run at the next step
            unreadable += skipped
            indices = indices.tolist()
            if not indices:
                continue
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                x = images.to(device, non_blocking=True)
                logits = dense_logits(model, x, selection=not args.full_fine_grid)
            maps = top_k_maps(logits, args.topk, args.map_size).cpu()  # (B, 2, K, H, W)
            map_shape = tuple(maps.shape[1:])
            for row, index in enumerate(indices):
                futures.append(pool.submit(save_atomic, maps[row].clone(), targets[index]))
            done = [f for f in futures if f.done()]
            for f in done:
                f.result()  # re-raise a failed write here
            futures = [f for f in futures if not f.done()]
            written += len(indices)
            bar.set_postfix(written=written, refresh=False)
        bar.close()
        for f in futures:
            f.result()
    return written, unreadable, map_shape


def run(args: argparse.Namespace) -> int:
    """Write the missing maps (unreadable images are skipped, counted and logged). Returns 0."""
    if args.topk is not None and args.topk < 1:
        raise BadInputError('--topk must be >= 1')
    if not 0 <= args.shard_index < args.num_shards:
        raise BadInputError(f'--shard-index must be in [0, --num-shards={args.num_shards})')
    folder = resolve_image_folder(args.data)
    dataset = open_image_folder(folder)
    samples, classes = dataset.samples, dataset.classes
    out = prepare_output_dir(args.output, [args.data, folder],  # shards may share the folder: a lock each
                             lock=f'.cfvit-run.shard{args.shard_index}of{args.num_shards}.lock')
    targets = [label_map_path(out, path) for path, _ in samples]
    check_distinct_label_maps(samples, targets)
    if args.topk is None:
        args.topk = min(DEFAULT_TOPK, len(classes))
    if args.topk > len(classes):
        raise BadInputError(f'--topk {args.topk} exceeds the {len(classes)} classes of {folder}')

    device = torch.device(args.device)
    model, name = build_teacher(args, len(classes))
    model.to(device)
    size = teacher_input_size(model, args.input_size)
    meta = claim_label_folder(out, _identity(args, name, size), list(classes))
    shard = [i for i in range(len(samples)) if i % args.num_shards == args.shard_index]
    pending = [i for i in shard if not targets[i].is_file()]
    _logger.info('teacher %s at %dx%d on %s: %d images in %s (%d classes), shard %d/%d: %d to write, %d already done',
                 name, size, size, device, len(samples), folder, len(classes), args.shard_index, args.num_shards,
                 len(pending), len(shard) - len(pending))
    loader = DataLoader(_PendingImages(samples, pending, _teacher_transform(model, size)), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=collate_skipping, pin_memory=device.type == 'cuda',
                        worker_init_fn=quiet_worker_signals)
    started = time.time()
    written, unreadable, map_shape = _write_maps(args, model, loader, targets, device)
    if map_shape is not None:
        with _metadata_lock(out):
            write_json_atomic({**meta, 'map_shape': list(map_shape)}, out / METADATA_NAME)
    if written:
        _logger.info('wrote %d label maps of shape %s to %s in %.1f s', written, map_shape, out, time.time() - started)
    else:
        _logger.info('nothing to write: every image of this shard has its label map in %s', out)
    if unreadable:
        _logger.warning('%d images could not be read (see the warnings above) and have no label map; training '
                        'replaces each by the next readable image of its dataset', unreadable)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser('Token-labeling label maps from a teacher', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    setup_logging()
    kept = '; the maps written so far are complete, run again to continue'
    return run_entry_point(lambda: run(args), writing='cannot write the label maps', kept=kept,
                           interrupted='interrupted' + kept)


if __name__ == '__main__':
    sys.exit(main())
