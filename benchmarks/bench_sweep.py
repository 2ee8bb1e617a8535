"""Benchmark 2: the vectorized budgeted sweep against the release's per-sample loop.

    python benchmarks/bench_sweep.py [--samples 50000] [--classes 1000]
"""
from __future__ import annotations

import argparse
import time

import torch

from common import machine, save
from utils.inference.early_exit import DEFAULT_THRESHOLDS, budgeted_sweep, dynamic_evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--samples', type=int, default=50_000)
    p.add_argument('--classes', type=int, default=1000)
    p.add_argument('--reps', type=int, default=5)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, args.samples, args.classes, generator=g) * 3
    logits[1] += 1.5 * torch.randn(args.samples, 1, generator=g)
    probs = logits.softmax(-1)
    targets = torch.randint(0, args.classes, (args.samples,), generator=g)
    flops = [1.102, 4.022]

    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        fast = budgeted_sweep(probs, targets, flops)
        times.append(time.perf_counter() - t0)
    fast_s = sorted(times)[len(times) // 2]

    t0 = time.perf_counter()
    loop = [dynamic_evaluate(probs, targets, flops, [t, -1]) for t in DEFAULT_THRESHOLDS]
    loop_s = time.perf_counter() - t0
    identical_acc = [a for a, _ in loop] == fast[1]
    max_rel_gflops = max(abs(f - g) / g for (_, f), g in zip(loop, fast[0]))
    result = {
        'benchmark': 'budgeted sweep: vectorized vs per-sample loop (release semantics)',
        'machine': machine(), 'samples': args.samples, 'classes': args.classes, 'thresholds': 100,
        'loop_seconds': loop_s, 'vectorized_seconds_median': fast_s, 'vectorized_reps': args.reps,
        'speedup': loop_s / fast_s, 'identical_accuracies': identical_acc,
        'max_relative_gflops_difference': max_rel_gflops,
    }
    print(result)
    save('sweep', result)


if __name__ == '__main__':
    main()
