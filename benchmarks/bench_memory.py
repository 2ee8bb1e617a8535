"""Benchmark 4: peak memory of inference at batch 64 on CPU, CF-DeiT-S against DeiT-S.

Each program runs in a fresh process; the reported number is the growth of the process's peak
resident memory (``ru_maxrss``) during one batch-64 forward, after the model was built and a
batch-1 forward had warmed the libraries up. The released CF-ViT kept every block's full N x N
attention maps for the selection; this implementation keeps one class-token row per block.

    python benchmarks/bench_memory.py [--batch 64]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

from common import machine, save

PROGRAMS = {
    'deit_small_patch16_224': "m = timm.create_model('deit_small_patch16_224').eval(); run = lambda x: m(x)",
    'cf_deit_small (both stages)': "m = timm.create_model('cf_deit_small').eval(); m.set_informative_selection(True); run = lambda x: m(x)",
    'cf_deit_small early exit @0.5': "m = timm.create_model('cf_deit_small').eval(); run = lambda x: m.forward_early_exit(x, 0.5)",
}


def child(code: str, batch: int) -> None:
    import timm
    import torch

    import models  # noqa: F401
    namespace = {'timm': timm}
    exec(code, namespace)
    run = namespace['run']
    with torch.no_grad():
        run(torch.randn(1, 3, 224, 224))
        x = torch.randn(batch, 3, 224, 224)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run(x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({'peak_rss_growth_mib': (after - before) / 1024, 'peak_rss_mib': after / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--child', default=None)
    p.add_argument('--reps', type=int, default=3, help='fresh processes per program (interleaved); medians reported')
    args = p.parse_args()
    if args.child:
        child(PROGRAMS[args.child], args.batch)
        return
    runs = {name: [] for name in PROGRAMS}
    for _ in range(args.reps):
        for name in PROGRAMS:
            out = subprocess.run([sys.executable, __file__, '--child', name, '--batch', str(args.batch)],
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for name, rs in runs.items():
        growth = statistics.median(r['peak_rss_growth_mib'] for r in rs)
        peak = statistics.median(r['peak_rss_mib'] for r in rs)
        rows.append({'program': name, 'peak_rss_growth_mib': growth, 'peak_rss_mib': peak, 'runs': rs})
        print(f'{name:32s} +{growth:7.1f} MiB during the batch (peak RSS {peak:.0f} MiB), median of {len(rs)}')
    save('memory', {'benchmark': f'peak memory of inference, batch {args.batch}, CPU, float32',
                    'machine': machine(), 'batch': args.batch, 'reps': args.reps, 'rows': rows})


if __name__ == '__main__':
    main()
