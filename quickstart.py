"""The whole method in a few minutes on a CPU, on the built-in synthetic shapes set.

    python quickstart.py [--output-dir output/quickstart] [--epochs 12]

1. writes the synthetic shapes set once (``datasets/synthetic.py``: one shape per image on clutter,
   half of them small enough that only the fine stage resolves them; every object's box recorded);
2. trains a tiny CF-DeiT on it with ``main_deit.py`` (patch 8, 4x4 coarse grid on 32 px, 8x8 fine
   grid on 64 px, informative selection switched on half way);
3. runs ``dynamic_inference.py`` in modes 0-3 on the trained checkpoint;
4. draws the visualizations with ``visualize.py``;
5. prints a summary: per-stage top-1 and GFLOPs, points of the accuracy-vs-GFLOPs curve, early-exit
   throughput, and the share of re-split patches that fall on the objects' boxes.

The results land in one output folder (default ``output/quickstart/``); the dataset is written once to
``output/data/synthetic_shapes/`` (``$CFVIT_DATA_DIR`` moves it) and reused by later runs. No argument is
needed and nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import utils.common.startup  # noqa: F401  (first, before torch and timm: HF_HUB_OFFLINE, stop signals)

import torch

from datasets.synthetic import default_synthetic_root, load_boxes, make_synthetic_dataset
from datasets.transforms import eval_transform
import models  # noqa: F401  (registers the CF models with timm)
from utils.common.atomic import write_json_atomic
from utils.common.checkpoint import load_checkpoint_file
from utils.common.entry import run_entry_point
from utils.common.flags import default_workers, device_name, float_in, int_at_least, positive_int
from utils.common.model_builder import build_from_checkpoint
from utils.common.run_folder import prepare_output_dir


ROOT = Path(__file__).resolve().parent

#: Training logs a line every this many steps (and one per epoch): no minute-long silence within an epoch.
PRINT_FREQ = 20
#: The tiny model and recipe of the quick start (patch 8: a 4x4 coarse grid on 32 px images).
MODEL_ARGS = ['--model', 'cf_deit_tiny', '--embed-dim', '96', '--depth', '6', '--num-heads', '3',
              '--model-kwargs', 'patch_size=8', '--coarse-stage-size', '4']
RECIPE_ARGS = ['--warmup-epochs', '0', '--lr', '1e-3', '--unscale-lr', '--aa', 'none', '--reprob', '0',
               '--mixup', '0', '--cutmix', '0', '--no-repeated-aug', '--no-model-ema', '--drop-path', '0.0',
               '--crop-scale', '0.6', '1', '--print-freq', str(PRINT_FREQ)]  # --batch-size: the quick start's own flag


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--output-dir', default='output/quickstart')
    p.add_argument('--data-path', default=None, help='default: the built-in synthetic set (written once)')
    p.add_argument('--epochs', type=positive_int, default=12)
    p.add_argument('--batch-size', type=positive_int, default=64,
                   help='training images per step (default 64; lower it for a --data-path of fewer images)')
    p.add_argument('--device', type=device_name, default='cpu', help='cpu (default) or cuda')
    p.add_argument('--num-workers', type=int_at_least(0), default=default_workers(2))
    p.add_argument('--threshold', type=float_in(0.0, 1.0), default=0.8, help='early-exit threshold of the throughput run')
    return p


def say(line: str) -> None:
    """One line of the quick start's narration on stdout, in order with the output of the scripts it runs."""
    print(line, flush=True)


def run_script(name: str, argv: Sequence[str]) -> int:
    """Run ``python name.py *argv`` (a script beside this one) as its own program, with this interpreter,
    and return its exit status: the script's own flag handling, messages and exit codes apply."""
    return subprocess.run([sys.executable, str(ROOT / f'{name}.py'), *map(str, argv)]).returncode


def _step(title: str) -> None:
    say('')
    say(f'=== {title}')


@torch.no_grad()
def selection_on_objects(checkpoint_path: Path, data: Path, device: torch.device) -> Dict[str, float]:
    """Share of the re-split coarse patches that overlap the object's box, against chance.

    Chance is the share of all coarse patches that overlap the box (what a random selection of
    the same size would hit on average). Reported separately for small and large objects.
    """
    from datasets.folder import open_image_folder
    model, _, _ = build_from_checkpoint(load_checkpoint_file(checkpoint_path))  # strict, allow-listed kwargs
    model.to(device).eval()
    boxes = load_boxes(data)
    dataset = open_image_folder(data / 'val', eval_transform(model))
    g = model.coarse_grid[0]
    side = model.img_size_list[1]
    stats = {'small': [0.0, 0.0, 0], 'large': [0.0, 0.0, 0]}
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=False, num_workers=0)
    paths = [Path(p).relative_to(data).as_posix() for p, _ in dataset.samples]
    offset = 0
    # the eval transform resizes the short side to S/crop_pct and center-crops S: map boxes alike
    crop_pct = model.pretrained_cfg['crop_pct']
    for images, _ in loader:
        out = model.forward_details(images.to(device))
        for b in range(images.shape[0]):
            info = boxes[paths[offset + b]]
            raw = 64  # the synthetic images' side
            scale = int(side / crop_pct) / raw
            margin = (int(side / crop_pct) - side) / 2
            x0, y0, x1, y1 = [v * scale - margin for v in info['box']]
            cell = side / g
            on_box = torch.zeros(g * g, dtype=torch.bool)
            for r in range(g):
                for c in range(g):
                    on_box[r * g + c] = (c * cell < x1 and (c + 1) * cell > x0 and r * cell < y1 and (r + 1) * cell > y0)
            chosen = out.important_coarse_index[b].cpu()
            key = 'small' if info['small'] else 'large'
            stats[key][0] += float(on_box[chosen].float().mean())
            stats[key][1] += float(on_box.float().mean())
            stats[key][2] += 1
        offset += images.shape[0]
    result = {}
    for key, (hit, chance, n) in stats.items():
        if n:
            result[f'{key}_objects_selected_on_box'] = hit / n
            result[f'{key}_objects_chance'] = chance / n
            result[f'{key}_objects_images'] = n
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: bad input (an output folder that cannot be written, a dataset that cannot be read) is one
    line and exit 2; SIGINT / SIGTERM one line and 130 / 143; a failing step's own exit status otherwise."""
    args = get_args_parser().parse_args(argv)
    return run_entry_point(lambda: run(args), 'quickstart.py', writing='cannot write the quick start outputs',
                           one_line=True)


def _dataset(data_path: Optional[str]) -> Path:
    """The dataset folder: ``--data-path``, or the built-in synthetic set (written once, then reused)."""
    if data_path:
        data, how = Path(data_path), 'given with --data-path'
    else:
        reused = (default_synthetic_root() / 'params.json').is_file()
        data = make_synthetic_dataset()
        how = 'reused: written by an earlier run' if reused else 'written now'
    say(f'dataset: {data} ({how})')
    return data


def _evaluate(args: argparse.Namespace, data: Path, ckpt: Path, eval_dir: Path) -> int:
    """``dynamic_inference.py`` in modes 1, 2, 0 and 3 on the trained checkpoint; the first failing exit status."""
    common = ['--data_url', str(data), '--checkpoint_path', str(ckpt), '--batch_size', '128',
              '--num-workers', str(args.num_workers), '--device', args.device]
    rc = run_script('dynamic_inference', ['--eval-mode', '1', *common, '--output-dir', str(eval_dir / 'budgeted'),
                                          '--write-checkpoint'])
    rc = rc or run_script('dynamic_inference', ['--eval-mode', '2', *common, '--threshold', str(args.threshold),
                                                '--output-dir', str(eval_dir / 'throughput')])
    rc = rc or run_script('dynamic_inference', ['--eval-mode', '0', *common,
                                                '--output-dir', str(eval_dir / 'anytime')])
    rc = rc or run_script('dynamic_inference', [
        '--eval-mode', '3', '--checkpoint_path', str(eval_dir / 'budgeted' / 'checkpoint_with_results.pth'),
        '--output-dir', str(eval_dir / 'report')])
    return rc


def _summary(args: argparse.Namespace, data: Path, eval_dir: Path, on_box: Dict[str, Any],
             seconds: float) -> Dict[str, Any]:
    """What ``summary.json`` records: per-stage top-1 and FLOPs, the curve's points, early exit, selection."""
    budget = json.loads((eval_dir / 'budgeted' / 'budgeted.json').read_text())
    through = json.loads((eval_dir / 'throughput' / 'throughput.json').read_text())
    gflops, acc = budget['budgeted_batch_classification']
    return {
        'dataset': str(data), 'epochs': args.epochs, 'device': args.device,
        'flop': budget['flop'], 'anytime_classification': budget['anytime_classification'],
        'curve': {f'{t:.2f}': {'gflops': gflops[round(t * 100)], 'top1': acc[round(t * 100)]}
                  for t in (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)},
        'early_exit': {k: through[k] for k in ('threshold', 'top1', 'exit_share', 'average_gflops', 'throughput')},
        'selection_on_objects': on_box, 'seconds': seconds,
    }


def _summary_lines(summary: Dict[str, Any], device: str, out: Path, data: Path, eval_dir: Path,
                   vis_dir: Path) -> List[str]:
    """The closing summary the quick start prints."""
    c, f = summary['flop']
    a_c, a_f = summary['anytime_classification']
    through, on_box = summary['early_exit'], summary['selection_on_objects']
    return [
        '',
        f'Summary ({summary["seconds"]:.0f} s; results in {out}/, the dataset in {data}/)',
        f'  coarse stage : top-1 {a_c:6.2f}%  at {c * 1000:.2f} MFLOPs per image',
        f'  fine stage   : top-1 {a_f:6.2f}%  at {f * 1000:.2f} MFLOPs per image (both stages)',
        '  early exit, budgeted sweep (threshold: MFLOPs, top-1):',
        *[f'    {t}: {v["gflops"] * 1000:6.2f} MFLOPs  {v["top1"]:6.2f}%' for t, v in summary['curve'].items()],
        f'  early exit at {through["threshold"]}: top-1 {through["top1"]:.2f}%, {100 * through["exit_share"]:.1f}% '
        f'exited at the coarse stage, {through["average_gflops"] * 1000:.2f} MFLOPs, '
        f'{through["throughput"]:.0f} images/s on {device}',
        '  re-split patches on the object (vs. chance):' if on_box else
        '  re-split patches on the object: not measured (the dataset records no object boxes)',
        *[f'    {k} objects: {100 * on_box[f"{k}_objects_selected_on_box"]:.1f}% '
          f'(chance {100 * on_box[f"{k}_objects_chance"]:.1f}%, {on_box[f"{k}_objects_images"]} images)'
          for k in ('small', 'large') if f'{k}_objects_images' in on_box],
        f'  curve: {eval_dir / "budgeted" / "budgeted_batch_classification.png"}',
        f'  pictures: {vis_dir}/',
    ]


def run(args: argparse.Namespace) -> int:
    """The five steps; returns 0, or the exit status of the script that failed."""
    out = prepare_output_dir(args.output_dir, [args.data_path], '--output-dir')  # a read-only mount, a file: one line
    t_start = time.time()
    device = torch.device(args.device)

    if (out / 'summary.json').is_file():
        say(f'{out} holds an earlier quick start: this run replaces its results (--output-dir DIR keeps both)')
    _step('1/5 data')
    data = _dataset(args.data_path)

    _step(f'2/5 training a tiny CF-DeiT for {args.epochs} epochs (selection from epoch {args.epochs // 2 + 1}); '
          f'a line every {PRINT_FREQ} steps and an evaluation line per epoch')
    train_dir = out / 'train'
    train_argv = MODEL_ARGS + RECIPE_ARGS + [
        '--data-path', str(data), '--epochs', str(args.epochs),
        '--selection-start-epoch', str(args.epochs // 2 - 1), '--num_workers', str(args.num_workers),
        '--device', args.device, '--output', str(train_dir), '--batch-size', str(args.batch_size)]
    rc = run_script('main_deit', train_argv)
    if rc != 0:
        say(f'training failed (exit {rc}); see above')
        return rc
    ckpt = train_dir / 'checkpoint.pth'

    _step('3/5 evaluation, modes 0-3 (dynamic_inference.py)')
    eval_dir = out / 'eval'
    rc = _evaluate(args, data, ckpt, eval_dir)
    if rc != 0:
        say(f'evaluation failed (exit {rc})')
        return rc

    _step('4/5 visualization (visualize.py)')
    vis_dir = out / 'visualize'
    rc = run_script('visualize', ['--resume', str(ckpt), '--data-path', str(data), '--output-dir', str(vis_dir),
                                  '--threshold', str(args.threshold), '--num-images', '12', '--no-progress',
                                  '--device', args.device, '--num-workers', '0', '--panel-size', '128'])
    if rc != 0:
        say(f'visualization failed (exit {rc})')
        return rc

    _step('5/5 where the re-split patches fall')
    if (data / 'boxes.json').is_file():
        on_box = selection_on_objects(ckpt, data, device)
    else:  # --data-path of another dataset: no object boxes to compare with
        on_box = {}
        say(f'{data} records no object boxes (boxes.json, written for the synthetic set): step skipped')

    summary = _summary(args, data, eval_dir, on_box, time.time() - t_start)
    write_json_atomic(summary, out / 'summary.json')
    for line in _summary_lines(summary, args.device, out, data, eval_dir, vis_dir):
        say(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
