"""Show where a CF-ViT looks and which images need its fine stage.

For every image it runs ``model.forward_details(images, threshold)`` once (early-exit inference:
the coarse stage for all, the fine stage with informative selection for the images below the
threshold) and draws, in an output folder:

- ``coarse_correct.png``: images the coarse stage recognized (exited and right);
- ``fine_only_correct.png``: images only the fine stage recognized (coarse wrong, fine right);
  (without ground truth, ``--img-path``: ``coarse_exit.png`` and ``fine_stage.png``)
- ``confidence_histogram.png``: coarse confidences with the threshold;
- ``summary.json``: counts, exit share, accuracies, the files shown.

The folder: ``--output-dir``, or by default a new one per run, ``output/visualize/MODEL_gG_TIME``.

Each image is shown as a pair: the input, and the same input with the coarse patches that stay
coarse faded and the re-split ones outlined on the fine grid.

Example::

    python visualize.py --model cf_deit_small --resume cf-deit-s-224.pth --data-path /data/imagenet \\
        --output-dir output/vis --batch-size 64
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import utils.common.startup  # noqa: F401  (first, before torch and timm: HF_HUB_OFFLINE, stop signals)

import torch

from datasets.folder import ImageList, collate_skipping, find_image_folder, list_image_folder, list_images
from datasets.transforms import data_config, eval_transform
import models
from utils.common.atomic import write_json_atomic
from utils.common.checkpoint import extract_state_dict, load_checkpoint_file
from utils.common.entry import run_entry_point
from utils.common.errors import EXIT_BAD_INPUT, BadInputError, CheckpointError, UserError  # noqa: F401 (visualize.EXIT_BAD_INPUT)
from utils.common.flags import (
    MAX_SEED, KeyValues, default_device, default_workers, device_name, float_in, grid_side, int_at_least,
    positive_int, usable_device, worker_count,
)
from utils.common.logs import setup_logging, shown_name
from utils.common.model_builder import build_model_from_name, resolve_architecture, without_fixed_kwargs
from utils.common.run_folder import new_run_folder, prepare_output_dir, refuse_overwriting_inputs, same_file
from utils.common.signals import quiet_worker_signals
from utils.vis.figures import (
    FADE, ClassIndex, Details, GridItem, GridLayout, collect_details, draw_confidence_histogram,
    draw_grid, read_class_index, resolve_classes, unnormalize,
)

log = logging.getLogger('visualize')

#: Default early-exit threshold: the one the released visualization used.
DEFAULT_THRESHOLD = 0.7
#: Largest --panel-size: a 16-image grid of 2048 px panels is already about 200 megapixels.
MAX_PANEL_SIZE = 2048
#: Every file a run writes into --output-dir.
OUTPUT_NAMES = ('coarse_correct.png', 'fine_only_correct.png', 'coarse_exit.png', 'fine_stage.png',
                'confidence_histogram.png', 'summary.json')
CHECK, CROSS = '\u2713', '\u2717'
GREEN, RED, GREY, BLACK = '#1b7f3b', '#c1121f', '#6c757d', '#111111'


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command line (the released flags, with dash and underscore spellings)."""
    p = argparse.ArgumentParser('visualize.py', add_help=add_help,
                                description='Draw which images a CF-ViT recognizes at the coarse stage, '
                                            'which need the fine stage, and the patches it re-splits.')
    p.add_argument('--model', default=None, choices=list(models.MODEL_NAMES),
                   help='the model (default: the one a training checkpoint records, else cf_deit_small)')
    p.add_argument('--resume', '--checkpoint-path', '--checkpoint_path', default='', metavar='CKPT',
                   help='model checkpoint (released or training layout); without it the model has random '
                        'weights and a warning says so')
    p.add_argument('--unsafe-load', '--unsafe_load', action='store_true',
                   help='allow full unpickling of a checkpoint you trust (default: weights_only)')
    p.add_argument('--coarse-stage-size', '--coarse_stage_size', type=grid_side, default=None, metavar='G',
                   help='coarse grid side g (7 or 9 for the released models; default: what a training '
                        'checkpoint records, else 7); the fine input is 32*g px at patch 16')
    p.add_argument('--num-classes', '--num_classes', type=int_at_least(1), default=None,
                   help='classes of a model without checkpoint (default: the dataset\'s class folders, '
                        'else 1000); with --resume the checkpoint\'s head decides')
    p.add_argument('--model-kwargs', '--model_kwargs', nargs='*', default={}, action=KeyValues,
                   metavar='KEY=VALUE', help='more timm.create_model arguments, e.g. embed_dim=48 depth=4')
    src = p.add_mutually_exclusive_group(required=False)
    src.add_argument('--data-path', '--data_path', default=None, metavar='PATH',
                     help='dataset root with val/ in ImageFolder layout (or an ImageFolder itself); default: '
                          'the built-in synthetic shapes set')
    src.add_argument('--img-path', '--img_path', default=None, metavar='FILE_OR_DIR',
                     help='one image or a folder of images (no ground truth)')
    p.add_argument('--class-index-file', '--class_index_file', default=None, metavar='FILE',
                   help='class names (and folder -> class index): text, one class a line, or '
                        'tab-separated like imagenette\'s classes.txt, or JSON; a classes.txt at the dataset root '
                        'is used for the names only (folders keep their sorted order as labels, as in training)')
    p.add_argument('--output-dir', '--output_dir', default=None, metavar='DIR',
                   help='where the pictures go (default: a new folder per run, '
                        'output/visualize/MODEL_gG_YYYYmmdd-HHMMSS; a folder given here is used as it is, an '
                        'earlier run\'s pictures in it replaced)')
    p.add_argument('--threshold', type=float_in(0, 1), default=DEFAULT_THRESHOLD,
                   help='early-exit threshold on the coarse max-softmax probability (default: %(default)s, '
                        'as the released visualization)')
    p.add_argument('--num-images', '--num_images', type=int_at_least(1, 1024), default=16,
                   help='images per grid (default: %(default)s), drawn at random with --seed')
    p.add_argument('--max-images', '--max_images', type=int_at_least(1), default=None,
                   help='run the model on at most this many images, a random subset (default: all)')
    p.add_argument('--batch-size', '--batch_size', type=positive_int, default=64)
    p.add_argument('--num-workers', '--num_workers', type=worker_count, default=default_workers(2))
    p.add_argument('--device', type=device_name, default=default_device())
    p.add_argument('--panel-size', '--panel_size', type=int_at_least(64, MAX_PANEL_SIZE), default=None,
                   help='pixel side of each picture in the grids (default: the model\'s input size)')
    p.add_argument('--fade', type=float_in(0, 1), default=FADE,
                   help='how far patches kept coarse fade to white, 0..1 (default: %(default)s)')
    p.add_argument('--seed', type=int_at_least(0, MAX_SEED), default=0)
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def _checkpoint_weights(args: argparse.Namespace) -> Tuple[Optional[Dict[str, torch.Tensor]], Optional[int],
                                                             Optional[Tuple[str, List[str]]]]:
    """The checkpoint's state_dict, its class count (from ``head.weight``) and the class folders of the data it
    was trained on (:func:`_trained_classes`), or Nones."""
    checkpoint = load_checkpoint_file(args.resume, unsafe=args.unsafe_load) if args.resume else None
    args.model, args.coarse_stage_size, args.model_kwargs = resolve_architecture(
        checkpoint, args.model, args.coarse_stage_size, args.model_kwargs)
    if checkpoint is None:
        return None, None, None
    state_dict = extract_state_dict(checkpoint)
    head = state_dict.get('head.weight')
    if head is None or head.dim() != 2:
        raise CheckpointError(f'{args.resume} has no classifier (head.weight): not a CF-ViT checkpoint')
    return state_dict, int(head.shape[0]), _trained_classes(checkpoint)


def _trained_classes(checkpoint: Any) -> Optional[Tuple[str, List[str]]]:
    """``(where, class folder names)`` of the ImageFolder a training checkpoint was trained on, when it is still
    there (its ``args.data_path``; none recorded: the built-in shapes), else None. Only folder names are read."""
    recorded = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if recorded is None:
        return None
    get = (lambda k: recorded.get(k)) if isinstance(recorded, dict) else (lambda k: getattr(recorded, k, None))
    if str(get('data_set') or 'IMNET').upper() != 'IMNET':
        return None
    if not get('data_path'):
        from datasets.synthetic import SYNTHETIC_CLASSES
        # the names of its classes.txt, as --data-path shows them ('ring' for the folder 1_ring)
        return 'the built-in synthetic shapes set', [c.split('_', 1)[1] for c in SYNTHETIC_CLASSES]
    for split in ('val', 'train'):
        folder = Path(str(get('data_path'))) / split
        try:
            names = sorted(e.name for e in os.scandir(folder) if e.is_dir())  # torchvision ImageFolder's order
        except OSError:
            continue
        if names:
            return str(folder), _names_of_classes_txt(folder.parent / 'classes.txt', names)
    return None


def _names_of_classes_txt(path: Path, folders: List[str]) -> List[str]:
    """The display names a ``classes.txt`` at the dataset root gives the class folders (as ``--data-path``
    shows them), else the folder names."""
    if not path.is_file():
        return folders
    try:
        index = _display_names_only(read_class_index(path, len(folders)), folders, len(folders), path)
    except (UserError, ValueError, OSError):
        return folders
    if index is None:
        return folders
    return [index.names.get(i, f) for i, f in enumerate(folders)]


def _class_index_file(args: argparse.Namespace, folder: Optional[Path]) -> Optional[Path]:
    if args.class_index_file:
        return Path(args.class_index_file)
    if args.data_path is None:
        return None
    candidates = [Path(args.data_path) / 'classes.txt', folder / 'classes.txt']
    if folder.name in ('val', 'train'):  # --data-path pointed at a split: its dataset root
        candidates.append(folder.parent / 'classes.txt')
    for candidate in dict.fromkeys(candidates):
        if candidate.is_file():
            log.info('class names from %s', candidate)
            return candidate
    return None


def _display_names_only(index: ClassIndex, folders: Optional[List[str]], num_classes: int,
                        path: Path) -> Optional[ClassIndex]:
    """A class-index file found by itself (``classes.txt`` at the dataset root) names the classes but never
    maps folders to labels: the model was trained with the folders in their sorted order (ImageFolder), so
    folder ``i`` is class ``i``, whatever order the file lists them in. Only --class-index-file maps folders."""
    if folders is None or len(folders) != num_classes:
        log.info('%s is not used: its classes cannot be matched to the folders (pass --class-index-file to '
                 'map folders to classes)', path)
        return None
    names = {i: index.names[index.folder_index[f]] for i, f in enumerate(folders)
             if f in index.folder_index and index.folder_index[f] in index.names}
    return ClassIndex(names=names) if names else None


def _build_model(args: argparse.Namespace, num_classes: int,
                 state_dict: Optional[Dict[str, torch.Tensor]]) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    fixed = {'num_classes': num_classes, 'coarse_stage_size': args.coarse_stage_size}
    extra = without_fixed_kwargs(args.model_kwargs, fixed, "the checkpoint's head or --num-classes, and "
                                 '--coarse-stage-size', BadInputError)
    try:
        model = build_model_from_name(args.model, state_dict, BadInputError, **fixed, **extra)
    except CheckpointError as e:
        raise CheckpointError(f'{args.resume}: {e}') from e
    if state_dict is not None:
        log.info('weights from %s', args.resume)
    else:
        bar = '*' * 78
        log.warning(bar)
        log.warning('NO CHECKPOINT: --resume not given, so %s has RANDOM weights. Its predictions,', args.model)
        log.warning('confidences and re-split patches show nothing about a trained CF-ViT.')
        log.warning(bar)
    return model


def _pick(mask: torch.Tensor, confidence: torch.Tensor, n: int, seed: int) -> List[int]:
    """Up to ``n`` positions where ``mask`` holds, drawn at random, shown by decreasing confidence."""
    positions = torch.nonzero(mask).flatten().tolist()
    chosen = random.Random(seed).sample(positions, min(n, len(positions)))
    return sorted(chosen, key=lambda i: (-float(confidence[i]), i))


#: Point size of the title lines (``utils.vis.figures.draw_grid`` writes them at 8 pt).
TITLE_POINTS = 8


def _text_px(text: str, dpi: int) -> float:
    """Width in pixels of ``text`` in the title font (matplotlib's default family) at ``dpi``."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath
    return TextPath((0, 0), text, prop=FontProperties(size=TITLE_POINTS)).get_extents().width * dpi / 72


def _fit(options: Sequence[str], width: float, dpi: int) -> str:
    """The first of ``options`` (longest first) no wider than ``width`` px, else the last one cut with an ellipsis."""
    for text in options:
        if _text_px(text, dpi) <= width:
            return text
    text = options[-1]
    while len(text) > 1 and _text_px(text + '\u2026', dpi) > width:
        text = text[:-1]
    return text + '\u2026'


def _title(d: Details, i: int, names: Sequence[str], threshold: float, path: str, width: float = math.inf,
           dpi: int = 100) -> List[Tuple[str, str]]:
    """Four title lines (text, colour) of image position ``i``, each no wider than ``width`` pixels (the space
    above its image pair, so neighbouring titles never run into each other)."""
    conf, exited = float(d.confidence[i]), bool(d.exited[i])
    target = int(d.targets[i])

    def named(prefix: str, name: str, suffix: str = '') -> str:
        """``prefix + name + suffix`` with the name shortened (never the mark) to fit; bytes that are not
        UTF-8 escaped (``\\xNN``), never handed to matplotlib."""
        name = shown_name(name)
        if _text_px(prefix + name + suffix, dpi) <= width:
            return prefix + name + suffix
        while len(name) > 1 and _text_px(prefix + name + '\u2026' + suffix, dpi) > width:
            name = name[:-1]
        return prefix + name + '\u2026' + suffix

    def pred_line(stage: str, pred: int) -> Tuple[str, str]:
        if target < 0:
            return named(f'{stage}: ', names[pred]), BLACK
        right = pred == target
        return named(f'{stage}: ', names[pred], f' {CHECK if right else CROSS}'), GREEN if right else RED

    for digits in range(3, 8):  # enough digits that the printed numbers agree with the decision
        shown = f'{conf:.{digits}f}'
        if (float(shown) >= threshold) == exited:
            break
    op = '>=' if exited else '<'
    route = _fit([f'coarse conf {shown} {op} {threshold:.6g}: ' + ('exited' if exited else 'fine stage'),
                  f'conf {shown} {op} {threshold:.6g}: ' + ('exited' if exited else 'fine'),
                  f'{shown} {op} {threshold:.6g}'], width, dpi)
    fine = int(d.fine_pred[i])
    fine_line = (_fit(['fine: not run (exited)', 'fine: not run'], width, dpi), GREY) if fine < 0 \
        else pred_line('fine', fine)
    last = (named('true: ', names[target]), BLACK) if target >= 0 else (named('file: ', Path(path).name), GREY)
    return [(route, BLACK), pred_line('coarse', int(d.coarse_pred[i])), fine_line, last]


def _percent(hits: torch.Tensor) -> Optional[float]:
    return round(100.0 * float(hits.float().mean()), 3) if hits.numel() else None


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Do the work of :func:`main`; returns the summary that is written to ``summary.json``."""
    device = usable_device(args.device)
    inputs = [args.data_path, args.img_path]
    out_dir = _named_output_dir(args, inputs)
    files, folders, folder, source = _input_files(args)
    state_dict, ckpt_classes, trained_classes = _checkpoint_weights(args)
    if out_dir is None:  # the default: a new folder per run, as dynamic_inference.py
        out_dir = prepare_output_dir(new_run_folder('visualize', f'{args.model}_g{args.coarse_stage_size}'), inputs,
                                     '--output-dir', unwritable='cannot write to the output folder {path}')
        log.info('output folder: %s', out_dir)
    if ckpt_classes is not None:
        if args.num_classes is not None and args.num_classes != ckpt_classes:
            log.warning('--num-classes %d ignored: the checkpoint\'s head has %d classes', args.num_classes,
                        ckpt_classes)
        num_classes = ckpt_classes
    else:
        num_classes = args.num_classes or (len(folders) if folders else 1000)
    index_file = _class_index_file(args, folder)
    refuse_overwriting_inputs([out_dir / n for n in OUTPUT_NAMES], [f for f, _ in files] + [args.resume, index_file],
                              BadInputError)  # e.g. --img-path OUT/confidence_histogram.png
    names, folder_to_target = _class_names(args, num_classes, folders, index_file, trained_classes)
    samples = [(f, -1 if c is None else folder_to_target[c]) for f, c in files]
    if args.max_images is not None and args.max_images < len(samples):
        keep = sorted(random.Random(args.seed).sample(range(len(samples)), args.max_images))
        samples = [samples[i] for i in keep]
    log.info('%d images from %s, %d classes', len(samples), source, num_classes)

    model = _build_model(args, num_classes, state_dict).to(device).eval()
    dataset = ImageList(samples, eval_transform(model), return_index=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
        collate_fn=collate_skipping, pin_memory=device.type == 'cuda', worker_init_fn=quiet_worker_signals)
    details = collect_details(model, loader, args.threshold, device, progress=not args.no_progress)
    bad = [samples[i][0] for i in sorted(details.unreadable)]
    if bad:
        log.warning('%d file(s) could not be read as images and were skipped, e.g. %s', len(bad), bad[0])
    if len(details) == 0:
        raise BadInputError(f'none of the {len(samples)} image files under {source} could be read')

    weights = Path(args.resume).name if args.resume else 'RANDOM WEIGHTS (no --resume)'
    outputs = _draw_categories(args, model, dataset, details, samples, names, out_dir, weights)
    known = bool((details.targets >= 0).all())
    hist = out_dir / 'confidence_histogram.png'
    draw_confidence_histogram(details.confidence, args.threshold, hist,
                              details.coarse_pred == details.targets if known else None,
                              title=f'{args.model} {_grid_text(model)} coarse confidence, {len(details)} images '
                                    f'({weights})')
    log.info('wrote %s', hist)

    summary: Dict[str, Any] = {
        'model': args.model, 'coarse_stage_size': args.coarse_stage_size, 'num_classes': num_classes,
        'checkpoint': args.resume or None, 'random_weights': not args.resume, 'threshold': args.threshold,
        'source': source, 'ground_truth': known, 'class_index_file': str(index_file) if index_file else None,
        **_counts(details, bad), 'outputs': {**outputs, 'histogram': hist.name},
    }
    write_json_atomic(summary, out_dir / 'summary.json')
    n, n_exit, acc = summary['images'], summary['exited'], summary['accuracy_percent']
    log.info('%d images, %d exited at the coarse stage (%.1f%%)%s; results in %s', n, n_exit, 100 * n_exit / n,
             f', top-1 coarse {acc["coarse"]:.2f}% early-exit {acc["early_exit"]:.2f}%' if acc else '', out_dir)
    return summary


def _named_output_dir(args: argparse.Namespace, inputs: List[Optional[str]]) -> Optional[Path]:
    """``--output-dir`` prepared (None without it: the run gets a new folder once the checkpoint is read)."""
    if args.output_dir is None:
        return None
    out_dir = prepare_output_dir(args.output_dir, inputs, '--output-dir',
                                 unwritable='cannot write to --output-dir {path}')
    if any((out_dir / n).exists() for n in OUTPUT_NAMES):
        log.info('%s holds an earlier run\'s pictures: this run replaces them (without --output-dir every run gets '
                 'a new folder)', out_dir)
    return out_dir


def _input_files(args: argparse.Namespace) -> Tuple[List[Tuple[str, Optional[str]]], Optional[List[str]],
                                                     Optional[Path], str]:
    """``(files, class folders, image folder, source)``: the ``(path, class folder or None)`` of every image of
    ``--img-path`` or of ``--data-path``'s image folder (the built-in synthetic data set without either)."""
    if args.img_path is None and args.data_path is None:
        from datasets.synthetic import make_synthetic_dataset
        args.data_path = str(make_synthetic_dataset())
        log.info('no --data-path or --img-path given: using the built-in synthetic shapes dataset in %s',
                 args.data_path)
    if args.img_path is not None:
        return [(f, None) for f in list_images(args.img_path)], None, None, str(args.img_path)
    folder = find_image_folder(args.data_path)
    folders, listed = list_image_folder(folder)
    return list(listed), folders, folder, str(folder)


def _class_names(args: argparse.Namespace, num_classes: int, folders: Optional[List[str]],
                 index_file: Optional[Path], trained_classes: Optional[Tuple[str, List[str]]]
                 ) -> Tuple[List[str], Dict[str, int]]:
    """``(class names, class folder -> target)``: from the class index file, the class folders or, for
    ``--img-path``, the class folders the checkpoint was trained on; ``#0``.. where nothing names them."""
    class_index: Optional[ClassIndex] = read_class_index(index_file, num_classes) if index_file else None
    if class_index is not None and not args.class_index_file:  # found at the dataset root: names only
        class_index = _display_names_only(class_index, folders, num_classes, index_file)
    names, folder_to_target = resolve_classes(num_classes, folders, class_index)
    if folders is None and class_index is None and names[0] == '#0':  # --img-path: no folders to name the classes
        if trained_classes is not None and len(trained_classes[1]) == num_classes:
            names = trained_classes[1]
            log.info('class names from the class folders of %s (the data the checkpoint was trained on)',
                     trained_classes[0])
        else:
            log.info('class names unknown: shown as #0..#%d; --class-index-file FILE (one name a line) names them',
                     num_classes - 1)
    return names, folder_to_target


def _grid_text(model: torch.nn.Module) -> str:
    """The coarse grid, e.g. ``7x7``."""
    grid = model.coarse_grid
    return f'{grid[0]}x{grid[1]}'


def _categories(details: Details) -> Dict[str, Tuple[torch.Tensor, str]]:
    """The two pictures' images (a mask) and headings: with labels, right at the coarse stage and right only at
    the fine stage; without, exited and continued."""
    if bool((details.targets >= 0).all()):
        coarse_right = details.coarse_pred == details.targets
        fine_right = details.fine_pred == details.targets
        return {
            'coarse_correct': (details.exited & coarse_right,
                               'Recognized at the coarse stage (exited and right)'),
            'fine_only_correct': (~coarse_right & fine_right,
                                  'Recognized only at the fine stage (coarse wrong, fine right)'),
        }
    return {
        'coarse_exit': (details.exited, 'Exited at the coarse stage'),
        'fine_stage': (~details.exited, 'Went on to the fine stage'),
    }


def _draw_categories(args: argparse.Namespace, model: torch.nn.Module, dataset: ImageList, details: Details,
                     samples: List[Tuple[str, int]], names: List[str], out_dir: Path,
                     weights: str) -> Dict[str, Any]:
    """Draw each category's picture (up to ``--num-images`` of its images); returns, for each, its image
    count, its PNG's name (None when no image is in it: an earlier run's picture is removed) and the files shown."""
    cfg = data_config(model)
    layout = GridLayout(panel=args.panel_size or model.img_size_list[1])
    title_width = 2 * layout.panel + layout.inner_gap + layout.pair_gap - 10  # short of the next pair's title
    outputs: Dict[str, Any] = {}
    for key, (mask, heading) in _categories(details).items():
        png = out_dir / f'{key}.png'
        chosen = _pick(mask, details.confidence, args.num_images, args.seed)
        if not chosen:
            log.warning('no image is in "%s" at threshold %.3g: %s not written', heading, args.threshold, png.name)
            if png.exists() and not same_file(png, args.img_path):  # never a file the user named
                png.unlink()  # a picture of an earlier run would contradict summary.json
            outputs[key] = {'count': int(mask.sum()), 'png': None, 'shown': []}
            continue
        items = []
        for i in chosen:
            image, _, _ = dataset[int(details.indices[i])]
            items.append(GridItem(unnormalize(image, cfg['mean'], cfg['std']), details.important[i],
                                  _title(details, i, names, args.threshold, samples[int(details.indices[i])][0],
                                         title_width, layout.dpi)))
        exited_only = key in ('coarse_correct', 'coarse_exit')  # these images never reached the fine stage
        header = [f'{heading}: {len(chosen)} of {int(mask.sum())} shown',
                  f'{args.model} {_grid_text(model)}, threshold {args.threshold:.3g}, {weights}',
                  'Left: input.  Right: what the fine stage would re-split (outlined); it did not run: exited.'
                  if exited_only else
                  'Left: input.  Right: patches kept coarse faded, re-split ones outlined on the fine grid.']
        size = draw_grid(items, model.coarse_grid, png, header, layout, fade=args.fade)
        log.info('wrote %s (%dx%d px)', png, *size)
        outputs[key] = {'count': int(mask.sum()), 'png': png.name,
                        'shown': [samples[int(details.indices[i])][0] for i in chosen]}
    return outputs


def _counts(details: Details, bad: List[str]) -> Dict[str, Any]:
    """The summary's counts: images, unreadable files, exits, and (with labels) the accuracies."""
    n, n_exit = len(details), int(details.exited.sum())
    coarse_right = details.coarse_pred == details.targets
    fine_right = details.fine_pred == details.targets
    final_pred = torch.where(details.exited, details.coarse_pred, details.fine_pred)
    return {
        'images': n, 'unreadable': len(bad), 'unreadable_files': bad[:20],
        'exited': n_exit, 'exit_share': round(n_exit / n, 6),
        'accuracy_percent': None if not bool((details.targets >= 0).all()) else {
            'coarse': _percent(coarse_right),
            'early_exit': _percent(final_pred == details.targets),
            'coarse_on_exited': _percent(coarse_right[details.exited]),
            'fine_on_continued': _percent(fine_right[~details.exited]),
        },
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: 0 on success, :data:`EXIT_BAD_INPUT` (2) with a one-line message on bad input."""
    args = get_args_parser().parse_args(argv)
    setup_logging(style='named', if_unconfigured=True)
    return run_entry_point(lambda: run(args), 'visualize.py', writing='cannot write the pictures', one_line=True)


if __name__ == '__main__':
    sys.exit(main())
