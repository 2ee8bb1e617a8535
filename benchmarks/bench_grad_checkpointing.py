"""Benchmark 6: one training step of cf_deit_small (batch 32, float32, CPU) with and without grad
checkpointing (``model.set_grad_checkpointing()``, ``--grad-checkpointing`` of the training scripts).

Each configuration runs in fresh processes; a process builds the model, runs one warm-up step at
batch 2, then times ``--steps`` steps (forward of both stages, loss of both, backward) and reports
the growth of its peak resident memory (``ru_maxrss``) over the warm-up. Memory is the number to
read; on a shared machine the time ratio is indicative only.

    python benchmarks/bench_grad_checkpointing.py [--batch 32] [--steps 2] [--reps 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from common import machine, save


def child(checkpointing: bool, batch: int, steps: int) -> None:
    import timm
    import torch

    import models  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model('cf_deit_small', num_classes=1000).train()
    model.set_grad_checkpointing(checkpointing)

    def step(x: torch.Tensor) -> None:
        coarse, fine = model(x)
        (coarse.logsumexp(-1).mean() + fine.logsumexp(-1).mean()).backward()
        model.zero_grad(set_to_none=True)

    step(torch.randn(2, 3, 224, 224))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = torch.randn(batch, 3, 224, 224)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({'peak_rss_growth_mib': (after - before) / 1024, 'peak_rss_mib': after / 1024,
                      'step_s': statistics.median(times), 'step_times_s': times}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--reps', type=int, default=1, help='fresh processes per configuration (interleaved)')
    p.add_argument('--child', choices=['plain', 'checkpointing'], default=None)
    args = p.parse_args()
    if args.child:
        child(args.child == 'checkpointing', args.batch, args.steps)
        return
    runs = {'plain': [], 'checkpointing': []}
    for _ in range(args.reps):
        for name in runs:
            out = subprocess.run([sys.executable, __file__, '--child', name, '--batch', str(args.batch),
                                  '--steps', str(args.steps)], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for name, rs in runs.items():
        row = {'configuration': name,
               'peak_rss_growth_mib': statistics.median(r['peak_rss_growth_mib'] for r in rs),
               'peak_rss_mib': statistics.median(r['peak_rss_mib'] for r in rs),
               'step_s': statistics.median(r['step_s'] for r in rs), 'runs': rs}
        rows.append(row)
        print(f"{name:14s} +{row['peak_rss_growth_mib']:7.1f} MiB (peak RSS {row['peak_rss_mib']:.0f} MiB), "
              f"{row['step_s']:.2f} s per step")
    save('grad_checkpointing', {'benchmark': f'cf_deit_small training step, batch {args.batch}, CPU, float32',
                                'machine': machine(), 'batch': args.batch, 'steps': args.steps,
                                'reps': args.reps, 'rows': rows})


if __name__ == '__main__':
    main()
