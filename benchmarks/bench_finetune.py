"""Benchmark 8: a pretrained plain DeiT made coarse-to-fine by conversion and a short fine-tuning.

The paper's "general" claim at its geometry (patch 16, 7x7 coarse grid on 112 px, 14x14 fine on
224 px), on imagenette224: train a plain DeiT (benchmark 5's baseline recipe, ``--baseline-epochs``),
convert its weights into CF-DeiT of the same size (``main_deit.py --finetune PLAIN_CHECKPOINT``), fine-tune
for at most a third of the baseline's epochs, and compare: the accuracy-vs-GFLOPs curve, the coarse stage
alone, and the smallest average GFLOPs at which early exit matches the baseline's top-1.

    python benchmarks/bench_finetune.py --data-path DATA/imagenette224 [--baseline-epochs 20 --finetune-epochs 6]

Checkpoints stay in --work-dir (not in git); logs, curve and JSON go to benchmarks/results/. A finished
stage is not trained again (rerunning picks up where a cut run stopped: each training resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from common import RESULTS, ROOT, clean_logs, curve_against_baseline, epoch_seconds, machine, save

MODEL = ['--embed-dim', '96', '--depth', '6', '--num-heads', '3']
#: benchmark 5's recipe (both models there), here the baseline's
BASE_RECIPE = ['--warmup-epochs', '2', '--lr', '1e-3', '--unscale-lr', '--aa', 'none', '--reprob', '0', '--mixup', '0',
               '--cutmix', '0', '--no-repeated-aug', '--no-model-ema', '--drop-path', '0.0', '--crop-scale', '0.35',
               '1', '--batch-size', '64', '--print-freq', '20', '--device', 'cpu', '--seed', '0']


def finetune_recipe(lr: float) -> List[str]:
    """The short fine-tuning recipe: the baseline's augmentation, no warm-up (the weights are trained;
    a warm-up epoch at the released schedule's warm-up lr of 1e-6 would be an epoch lost), a lower peak lr."""
    out = list(BASE_RECIPE)
    out[out.index('--warmup-epochs') + 1] = '0'
    out[out.index('--lr') + 1] = repr(lr)
    return out


def launch(cmd: List[str], log: Path, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE='1', MPLBACKEND='Agg')
    with open(log, 'a') as f:
        subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)


def finished(run_dir: Path, epochs: int) -> bool:
    log = run_dir / 'log.txt'
    return (run_dir / 'checkpoint.pth').exists() and log.exists() and \
        json.loads(log.read_text().splitlines()[-1])['epoch'] >= epochs - 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-path', default=str(ROOT.parent / 'shared' / 'data' / 'imagenette224'))
    p.add_argument('--baseline-epochs', type=int, default=20)
    p.add_argument('--finetune-epochs', type=int, default=6, help='at most a third of --baseline-epochs')
    p.add_argument('--selection-start-epoch', type=int, default=1,
                   help='informative selection from the epoch after this one (0-based; default: after 2 epochs '
                        'that adapt the coarse stage to the 112 px input)')
    p.add_argument('--lr', type=float, default=2.5e-4, help='fine-tuning peak lr (the baseline trained at 1e-3)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--num-workers', type=int, default=1)
    p.add_argument('--work-dir', default='output/ft', help='checkpoints (not in git)')
    p.add_argument('--name', default='finetune_p16_g7', help='result name under benchmarks/results/')
    p.add_argument('--load-note', default='', help='what else ran on the machine (reported)')
    p.add_argument('--cf-run', default='cf_deit_finetuned',
                   help='folder (under --work-dir) of the fine-tuning run: one per recipe, the baseline is shared')
    args = p.parse_args()
    if 3 * args.finetune_epochs > args.baseline_epochs:
        p.error('--finetune-epochs must be at most a third of --baseline-epochs')
    return args


def train_stages(args: argparse.Namespace, work: Path, out: Path, g: int, patch: int) -> Dict[str, List[float]]:
    """Train the DeiT baseline, then fine-tune its conversion to CF-DeiT (each skipped when finished, resumed
    when cut); returns each run's epoch seconds and copies their ``log.txt`` to ``out``."""
    common = [*MODEL, '--coarse-stage-size', str(g), '--data-path', args.data_path,
              '--num_workers', str(args.num_workers)]
    base_dir, cf_dir = work / 'deit_baseline', work / args.cf_run
    stages = (
        ('deit_baseline', base_dir, args.baseline_epochs,
         ['--model', 'deit_tiny_patch16_224', '--model-kwargs', f'patch_size={patch}', *BASE_RECIPE]),
        (args.cf_run, cf_dir, args.finetune_epochs,
         ['--model', 'cf_deit_tiny', '--model-kwargs', f'patch_size={patch}', 'fine_pos_embed_without_selection=True',
          *finetune_recipe(args.lr), '--selection-start-epoch', str(args.selection_start_epoch),
          '--finetune', str(base_dir / 'checkpoint.pth')]),
    )
    for name, run_dir, epochs, extra in stages:
        if finished(run_dir, epochs):
            continue
        resume = ['--resume', 'auto'] if (run_dir / 'checkpoint.pth').exists() else []
        launch(['main_deit.py', *common, *extra, '--epochs', str(epochs), *resume, '--output', str(run_dir)],
               work / f'{name}_train.out', args.threads)
    times = {('cf_deit_finetuned' if name == args.cf_run else name): epoch_seconds(work / f'{name}_train.out')
             for name, *_ in stages}
    for name, run_dir, *_ in stages:
        shutil.copyfile(run_dir / 'log.txt', out / f"{'cf_deit_finetuned' if name == args.cf_run else name}_log.txt")
    return times


def main() -> None:
    args = parse_args()
    g, patch = 7, 16
    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = RESULTS / args.name
    out.mkdir(parents=True, exist_ok=True)
    times = train_stages(args, work, out, g, patch)
    base_dir, cf_dir = work / 'deit_baseline', work / args.cf_run

    # the fine-tuned CF-DeiT: the four-mode evaluation's sweep on the 1,500 validation images
    eval_dir = work / f'{args.cf_run}_eval'
    launch(['dynamic_inference.py', '--eval-mode', '1', '--data_url', args.data_path, '--checkpoint_path',
            str(cf_dir / 'checkpoint.pth'), '--batch_size', '128', '--num-workers', str(args.num_workers),
            '--output-dir', str(eval_dir)], out / 'cf_eval.out', args.threads)
    cf = json.loads((eval_dir / 'budgeted.json').read_text())
    base_log = [json.loads(line) for line in (base_dir / 'log.txt').read_text().splitlines()]
    cf_log = [json.loads(line) for line in (cf_dir / 'log.txt').read_text().splitlines()]
    base_top1 = base_log[-1]['test_fine_acc1']
    base_gflops, match_gflops = curve_against_baseline(
        cf, base_top1, g, patch, out,
        f'imagenette224 val: DeiT ({args.baseline_epochs} ep) converted to CF-DeiT, +{args.finetune_epochs} ep',
        'plain DeiT')
    result = {
        'benchmark': 'pretrained DeiT converted to CF-DeiT and fine-tuned, imagenette224',
        'machine': machine(), 'load_note': args.load_note,
        'model': f'D=96, 6 blocks, 3 heads, patch {patch}; CF: {g}x{g} coarse grid on {g * patch} px, '
                 f'{2 * g}x{2 * g} fine on {2 * g * patch} px; baseline: DeiT at {2 * g * patch} px',
        'baseline_epochs': args.baseline_epochs, 'finetune_epochs': args.finetune_epochs,
        'selection_start_epoch': args.selection_start_epoch, 'finetune_lr': args.lr,
        'baseline_recipe': ' '.join(BASE_RECIPE), 'finetune_recipe': ' '.join(finetune_recipe(args.lr)),
        'epoch_seconds': times,
        'baseline_top1': base_top1, 'baseline_gflops': base_gflops,
        'baseline_top1_per_epoch': [r['test_fine_acc1'] for r in base_log],
        'cf_top1_per_epoch': [[r['test_coarse_acc1'], r['test_fine_acc1']] for r in cf_log],
        'cf_flop': cf['flop'], 'cf_anytime_classification': cf['anytime_classification'],
        'cf_budgeted_batch_classification': cf['budgeted_batch_classification'],
        'cf_thresholds': cf['thresholds'],
        'cf_gflops_to_match_baseline': match_gflops,
        'cf_gflops_to_match_baseline_share': match_gflops / base_gflops if match_gflops else None,
        'command': 'python benchmarks/bench_finetune.py --data-path DATA/imagenette224 '
                   f'--baseline-epochs {args.baseline_epochs} --finetune-epochs {args.finetune_epochs} '
                   f'--selection-start-epoch {args.selection_start_epoch} --lr {args.lr} '
                   f'--threads {args.threads} --num-workers {args.num_workers}'
                   + (f' --cf-run {args.cf_run} --name {args.name}' if args.cf_run != 'cf_deit_finetuned' else ''),
        'date_finished': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
    }
    clean_logs(out, [args.data_path])  # committed logs: no machine paths, no progress-bar frames
    save(args.name, result)
    print(json.dumps({k: v for k, v in result.items() if k != 'cf_budgeted_batch_classification'}, indent=1))


if __name__ == '__main__':
    main()
