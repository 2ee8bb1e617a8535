"""Benchmark 5: a small-scale reproduction of the paper's claim on real images (imagenette224).

Trains a tiny CF-DeiT and the same-size plain DeiT with the same recipe and epochs (both with
``main_deit.py``; the baseline through ``models.baseline``), then compares the baseline's top-1
and GFLOPs with CF-DeiT's coarse and fine top-1 and its whole accuracy-vs-GFLOPs curve, and
reports the GFLOPs CF-DeiT needs to match the baseline's accuracy.

    python benchmarks/bench_reproduction.py --data-path ../shared/data/imagenette224 [--epochs 30]

Checkpoints stay in --work-dir (not in git); logs, curve and JSON go to benchmarks/results/.
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


from common import RESULTS, ROOT, clean_logs, curve_against_baseline, machine, save

MODEL = ['--embed-dim', '96', '--depth', '6', '--num-heads', '3']
RECIPE = ['--warmup-epochs', '2', '--lr', '1e-3', '--unscale-lr', '--aa', 'none', '--reprob', '0', '--mixup', '0',
          '--cutmix', '0', '--no-repeated-aug', '--no-model-ema', '--drop-path', '0.0', '--crop-scale', '0.35', '1',
          '--batch-size', '64', '--print-freq', '1000', '--device', 'cpu', '--seed', '0']


def run(cmd: List[str], log: Path) -> None:
    with open(log, 'w') as f:
        subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)


def launch(cmd: List[str], log: Path, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, 'w') as f:
        return subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)


def finished(work: Path, name: str, epochs: int) -> bool:
    log = work / name / 'log.txt'
    return (work / name / 'checkpoint.pth').exists() and log.exists() and \
        json.loads(log.read_text().splitlines()[-1])['epoch'] >= epochs - 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--data-path', default=str(ROOT.parent / 'shared' / 'data' / 'imagenette224'))
    p.add_argument('--epochs', type=int, default=30)
    p.add_argument('--coarse-stage-size', type=int, default=6,
                   help='coarse grid g (the coarse stage sees patch*g px, the fine stage and the baseline 2*patch*g)')
    p.add_argument('--patch-size', type=int, default=8, help='patch side in pixels (16: the paper\'s geometry)')
    p.add_argument('--parallel', action='store_true',
                   help='train both models at once, each on --threads threads (both progress if the run is cut)')
    p.add_argument('--threads', type=int, default=1, help='threads per training with --parallel')
    p.add_argument('--selection-start-epoch', type=int, default=None,
                   help='informative selection from the epoch after this one (default: the last third, as the '
                        'released recipe: 200 of 300)')
    p.add_argument('--name', default='reproduction', help='result name under benchmarks/results/')
    p.add_argument('--work-dir', default=None, help='checkpoints (default output/bench_reproduction/g<g>_e<epochs>)')
    p.add_argument('--num-workers', type=int, default=2)
    return p.parse_args()


def train_both(args: argparse.Namespace, work: Path, out: Path, common: List[str], start: int) -> Dict[str, float]:
    """Train CF-DeiT and the DeiT baseline (one after the other, or at once with ``--parallel``), each resumed
    where a cut run left it; returns each one's seconds and copies their ``log.txt`` to ``out``."""
    times = {}
    jobs = {}
    for name, model, extra in (
            ('cf_deit', 'cf_deit_tiny', ['--selection-start-epoch', str(start)]),
            ('deit_baseline', 'deit_tiny_patch16_224', [])):
        t0 = time.time()
        if not finished(work, name, args.epochs):
            resume = ['--resume', str(work / name / 'checkpoint.pth')] if (work / name / 'checkpoint.pth').exists() else []
            cmd = ['main_deit.py', '--model', model, *common, *extra, *resume, '--output', str(work / name)]
            if args.parallel:
                jobs[name] = (launch(cmd, out / f'{name}_train.out', args.threads), t0)
                continue
            run(cmd, out / f'{name}_train.out')
        times[name] = time.time() - t0
    while jobs:  # each run's own time: poll both, so the first to finish is not timed until the second ends
        for name, (proc, t0) in list(jobs.items()):
            if proc.poll() is None:
                continue
            if proc.returncode != 0:
                raise SystemExit(f'{name} training failed: see {out / (name + "_train.out")}')
            times[name] = time.time() - t0
            del jobs[name]
        time.sleep(2)
    for name in ('cf_deit', 'deit_baseline'):
        shutil.copyfile(work / name / 'log.txt', out / f'{name}_log.txt')
    return times


def main() -> None:
    args = parse_args()
    g, PATCH = args.coarse_stage_size, args.patch_size
    size = 2 * g * PATCH
    start = args.selection_start_epoch if args.selection_start_epoch is not None else (2 * args.epochs) // 3 - 1
    default_work = f'output/bench_reproduction/g{g}_e{args.epochs}' + (f'_p{PATCH}' if PATCH != 8 else '')
    work = (ROOT / (args.work_dir or default_work)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = RESULTS / args.name
    out.mkdir(parents=True, exist_ok=True)
    common = [*MODEL, '--model-kwargs', f'patch_size={PATCH}', '--coarse-stage-size', str(g), *RECIPE,
              '--data-path', args.data_path, '--epochs', str(args.epochs), '--num_workers', str(args.num_workers)]
    times = train_both(args, work, out, common, start)

    # CF-DeiT: the four-mode evaluation's sweep on the 1,500 validation images
    run(['dynamic_inference.py', '--eval-mode', '1', '--data_url', args.data_path, '--checkpoint_path',
         str(work / 'cf_deit' / 'checkpoint.pth'), '--batch_size', '128', '--num-workers', str(args.num_workers),
         '--output-dir', str(work / 'cf_eval')], out / 'cf_deit_eval.out')
    cf = json.loads((work / 'cf_eval' / 'budgeted.json').read_text())
    base_log = [json.loads(line) for line in (work / 'deit_baseline' / 'log.txt').read_text().splitlines()]
    base_top1 = base_log[-1].get('test_fine_acc1', base_log[-1].get('fine_acc1'))
    base_gflops, match_gflops = curve_against_baseline(
        cf, base_top1, g, PATCH, out, f'imagenette224 val, tiny CF-DeiT vs DeiT, {args.epochs} epochs', 'DeiT baseline')
    result = {
        'benchmark': 'small-scale reproduction on imagenette224', 'machine': machine(), 'epochs': args.epochs,
        'patch_size': PATCH, 'parallel': args.parallel,
        'model': f'D=96, 6 blocks, 3 heads, patch {PATCH}; CF: {g}x{g} coarse grid on {size // 2} px, '
                 f'{2 * g}x{2 * g} fine on {size} px; baseline: DeiT at {size} px ({2 * g}x{2 * g} tokens)',
        'selection_start_epoch': start, 'coarse_stage_size': g,
        'recipe': ' '.join(RECIPE), 'train_seconds': times,
        'baseline_top1': base_top1, 'baseline_gflops': base_gflops,
        'cf_flop': cf['flop'], 'cf_anytime_classification': cf['anytime_classification'],
        'cf_budgeted_batch_classification': cf['budgeted_batch_classification'],
        'cf_gflops_to_match_baseline': match_gflops,
        'cf_gflops_to_match_baseline_share': match_gflops / base_gflops if match_gflops else None,
    }
    clean_logs(out, [args.data_path])  # committed logs: no machine paths, no progress-bar frames
    save(args.name, result)
    print(json.dumps({k: v for k, v in result.items() if k != 'cf_budgeted_batch_classification'}, indent=1))


if __name__ == '__main__':
    main()
