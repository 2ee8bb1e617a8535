"""Cost of making a ViT-B coarse-to-fine (``models.convert``): time and memory.

Each repetition runs in a fresh process. It builds ``vit_base_patch16_224`` (random weights, not
timed), then times

- ``convert_vit(vit)``: the in-memory route (a new CF model; the ViT is left as it is), and
- ``convert_state_dict(sd, cf)`` + ``load_state_dict``: the checkpoint route (``--finetune``, timm's
  ``pretrained_filter_fn``) into an already built ``cf_vit_base``-shaped model,

while a thread samples the process's resident memory every millisecond. Wall time depends on the
machine's load; the CPU time of the process (``time.process_time``, all threads) less so. Memory is reported as the
peak growth during the call relative to the model's own size (parameter bytes). The issue's target:
under 2 s and at most twice the model's memory.

    python benchmarks/bench_convert.py [--reps 3] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from common import machine, save

PAGE = os.sysconf('SC_PAGE_SIZE')


def rss() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """Peak resident memory over a ``with`` block, sampled every millisecond by a thread."""

    def __enter__(self) -> 'PeakRss':
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def child(route: str) -> None:
    import gc

    import timm
    import torch

    import models  # noqa: F401
    from models.cf_vit import CFVisionTransformer
    from models.convert import convert_state_dict, convert_vit

    torch.manual_seed(0)
    vit = timm.create_model('vit_base_patch16_224').eval()
    model_bytes = sum(p.numel() * p.element_size() for p in vit.parameters())
    if route == 'in_memory':
        gc.collect()
        with PeakRss() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            cf = convert_vit(vit)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    else:
        state_dict = {k: v.clone() for k, v in vit.state_dict().items()}  # as loaded from a file
        del vit
        cf = CFVisionTransformer(embed_dim=768, depth=12, num_heads=12, coarse_stage_size=7)
        gc.collect()
        with PeakRss() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            cf.load_state_dict(convert_state_dict(state_dict, cf), strict=True)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert cf.fine_grid == (14, 14)
    print(json.dumps({'seconds': seconds, 'cpu_seconds': cpu, 'peak_growth_bytes': mem.peak - mem.start, 'model_bytes': model_bytes,
                      'threads': torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--reps', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s)')
    parser.add_argument('--child', choices=('in_memory', 'state_dict'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        child(args.child)
        return
    results = {}
    for route in ('in_memory', 'state_dict'):
        runs = []
        for _ in range(args.reps):
            cmd = [sys.executable, __file__, '--child', route] + (['--threads', str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env=dict(os.environ, HF_HUB_OFFLINE='1')).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        results[route] = {
            'seconds_median': statistics.median(r['seconds'] for r in runs),
            'seconds_max': max(r['seconds'] for r in runs),
            'cpu_seconds_median': statistics.median(r['cpu_seconds'] for r in runs),
            'peak_growth_over_model_max': max(r['peak_growth_bytes'] / r['model_bytes'] for r in runs),
            'model_mib': runs[0]['model_bytes'] / 2 ** 20,
            'runs': runs,
        }
        print(f"{route}: median {results[route]['seconds_median']:.3f} s (max {results[route]['seconds_max']:.3f} s; "
              f"CPU time {results[route]['cpu_seconds_median']:.3f} s), "
              f"peak memory growth {results[route]['peak_growth_over_model_max']:.2f}x the model "
              f"({results[route]['model_mib']:.0f} MiB)")
    load = os.getloadavg()
    save('convert', {'machine': machine(), 'load_average': load, 'command': ' '.join(sys.argv), **results})
    print(f'load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}')


if __name__ == '__main__':
    main()
