"""Benchmark 9: does coarse-to-fine pay? CF-DeiT against plain DeiTs at 224, 160 and 128 px.

The pre-registered protocol is ``benchmarks/results/tradeoff/PROTOCOL.md`` (committed before any run).
Four models are trained from scratch on imagenette224 with ONE recipe and the same epochs:

    cf        CF-DeiT, D=96, 6 blocks, 3 heads, patch 16, 7x7 coarse on 112 px -> 14x14 fine on 224 px
    plain224  plain DeiT of the same width and depth at 224 px (14x14 patches)
    plain160  the same at 160 px (10x10)
    plain128  the same at 128 px (8x8)

    python benchmarks/bench_tradeoff.py train cf          # one run; resumes (--resume auto) when cut
    python benchmarks/bench_tradeoff.py train plain224    # ... one per run, one torch thread each
    python benchmarks/bench_tradeoff.py evaluate          # per-image outputs of the final checkpoints
    python benchmarks/bench_tradeoff.py report            # budgets, intervals, verdicts, figures, JSON

Checkpoints stay in --work-dir (``output/tradeoff``, not in git); the training logs, per-image outputs,
final weights (weights only), figures and ``tradeoff.json`` go to ``benchmarks/results/tradeoff/``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from common import RESULTS, ROOT

OUT = RESULTS / 'tradeoff'
EPOCHS = 40
#: selection on for the last half: epochs SELECTION_START+1 .. EPOCHS-1 (0-based)
SELECTION_START = 19
MODEL = ['--embed-dim', '96', '--depth', '6', '--num-heads', '3']
#: the one recipe, for all four runs (PROTOCOL.md, "Recipe")
RECIPE = ['--epochs', str(EPOCHS), '--batch-size', '64', '--lr', '1e-3', '--unscale-lr',
          '--sched-step', 'next-epoch', '--warmup-epochs', '2', '--warmup-lr', '1e-4', '--min-lr', '1e-5',
          '--weight-decay', '0.05', '--exempt-pos-embed-from-wd', '--smoothing', '0.1', '--aa', 'none',
          '--reprob', '0', '--mixup', '0', '--cutmix', '0', '--no-repeated-aug', '--no-model-ema',
          '--drop-path', '0.0', '--crop-scale', '0.35', '1', '--device', 'cpu', '--seed', '0', '--print-freq', '20']
#: run -> (model flags, coarse grid side g: the input is 2*g*16 px)
RUNS: Dict[str, List[str]] = {
    'cf': ['--model', 'cf_deit_tiny', '--coarse-stage-size', '7', '--model-kwargs', 'patch_size=16',
           'fine_pos_embed_without_selection=True', '--selection-start-epoch', str(SELECTION_START)],
    'plain224': ['--model', 'deit_tiny_patch16_224', '--coarse-stage-size', '7', '--model-kwargs', 'patch_size=16'],
    'plain160': ['--model', 'deit_tiny_patch16_224', '--coarse-stage-size', '5', '--model-kwargs', 'patch_size=16'],
    'plain128': ['--model', 'deit_tiny_patch16_224', '--coarse-stage-size', '4', '--model-kwargs', 'patch_size=16'],
}
GRID = {'cf': 7, 'plain224': 7, 'plain160': 5, 'plain128': 4}


def default_data() -> str:
    return str(ROOT.parent / 'shared' / 'data' / 'imagenette224')


def train_command(run: str, data: str, work: Path, num_workers: int, extra: List[str]) -> List[str]:
    return [sys.executable, 'main_deit.py', *MODEL, *RUNS[run], *RECIPE, '--data-path', data,
            '--num_workers', str(num_workers), '--resume', 'auto', '--output', str(work / run), *extra]


def cmd_train(args: argparse.Namespace) -> int:
    work = (ROOT / args.work_dir).resolve()
    (work / args.run).mkdir(parents=True, exist_ok=True)
    cmd = train_command(args.run, args.data_path, work, args.num_workers, args.extra)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE='1', MPLBACKEND='Agg')
    print(' '.join(cmd[1:]), flush=True)
    with open(work / f'{args.run}_train.out', 'a') as log:
        return subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    t = sub.add_parser('train', help='train (or resume) one of the four runs')
    t.add_argument('run', choices=sorted(RUNS))
    t.add_argument('--data-path', default=default_data())
    t.add_argument('--work-dir', default='output/tradeoff', help='checkpoints and console logs (not in git)')
    t.add_argument('--threads', type=int, default=1, help='torch threads (OMP_NUM_THREADS)')
    t.add_argument('--num-workers', type=int, default=1)
    argv = sys.argv[1:]
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    args = p.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
    # after --: more main_deit.py flags, for dry runs only (e.g. -- --epochs 1 --subset 640)
    args.extra = extra
    if args.command == 'train':
        sys.exit(cmd_train(args))


if __name__ == '__main__':
    main()
