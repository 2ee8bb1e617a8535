"""Benchmark 1: early-exit inference throughput on CPU, DeiT-S against CF-DeiT-S (7x7).

CF-DeiT-S runs ``forward_early_exit`` with thresholds that make 100%, 50% and 0% of the images
exit at the coarse stage; timm's ``deit_small_patch16_224`` runs its plain forward. Programs are
interleaved (round-robin) and the median of the repetitions is reported. Weights are random (the
exit shares are set by choosing thresholds on the measured confidences, so no trained weights are
needed for timing).

    python benchmarks/bench_inference.py [--reps 7] [--batches 64 1] [--dtypes float32 bfloat16]

A reference program, timm's ``deit_small_patch16_224`` at 112 px (the coarse stage's 7x7 tokens
without anything CF adds), shows what a plain ViT of the coarse stage's size achieves: at batch 1
its FLOP efficiency is the ceiling for the 100%-exit row.

``--compile`` runs every program through ``torch.compile`` (the CF model's ``forward_coarse`` and
``forward_fine``; the early-exit control flow stays eager). Compilation needs a C++ compiler on CPU
and takes minutes; it is meant for batch 1, where the shapes are static.

    python benchmarks/bench_inference.py [--reps 7] [--batches 64 1] [--dtypes float32 bfloat16] [--threads N] [--compile]

``--onnxruntime`` adds the deployed programs (float32 only), timed in the same interleaved rounds:
``cf_deit_small`` exported with ``export_onnx``'s code and run by ``utils.inference.onnx_runtime.OnnxEarlyExit``, and
timm's DeiT-S exported the same way (same exporter, same session options), its baseline. Their
rows report the speed-up over DeiT-S in onnxruntime and over eager CF-DeiT at the same exit share.
``--threads 1 2`` runs every configuration at each thread count (torch and onnxruntime alike).

    python benchmarks/bench_inference.py --onnxruntime --dtypes float32 --threads 1 2 --name inference_throughput_onnx
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import timm
import torch

from common import interleaved, machine, median, save
import models  # noqa: E402,F401
from models.token_ops import coarse_from_fine
from utils.inference.flops import count_gflops, stage_gflops


#: The plain ViT at the coarse stage's size (7x7 tokens of a 112 px image).
REFERENCE = 'reference: deit_small_patch16_224 at 112 px'
#: Name prefix of the onnxruntime programs.
ONNX = 'onnxruntime: '


def autocast(dtype: torch.dtype):
    return torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--reps', type=int, default=7)
    p.add_argument('--batches', type=int, nargs='+', default=[64, 1])
    p.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'])
    p.add_argument('--images-batch1', type=int, default=16, help='images per repetition at batch 1')
    p.add_argument('--name', default='inference_throughput', help='result file name (benchmarks/results/NAME.json)')
    p.add_argument('--threads', type=int, nargs='+', default=None,
                   help='intra-op thread counts, each run in turn (default: torch\'s)')
    p.add_argument('--compile', action='store_true', help='torch.compile every program (see the docstring)')
    p.add_argument('--onnxruntime', action='store_true', help='add the onnxruntime programs (see the docstring)')
    p.add_argument('--exporter', default='dynamo', help='ONNX exporter of --onnxruntime (dynamo or torchscript)')
    p.add_argument('--export-dir', default=None, help='where --onnxruntime writes its exports (default: a temp folder)')
    args = p.parse_args()
    torch.manual_seed(0)
    deit = timm.create_model('deit_small_patch16_224').eval()
    deit112 = timm.create_model('deit_small_patch16_224', img_size=112).eval()
    cf = timm.create_model('cf_deit_small', coarse_stage_size=7).eval()
    deit_gflops = count_gflops(deit, torch.zeros(1, 3, 224, 224))
    ref_gflops = count_gflops(deit112, torch.zeros(1, 3, 112, 112))
    cf_flops = stage_gflops(cf)
    deit_fn, ref_fn = deit, deit112
    if args.compile:
        deit_fn, ref_fn = torch.compile(deit), torch.compile(deit112)
        cf.compile_stages()
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(64, 3, 224, 224, generator=g)
    with torch.no_grad():
        conf = cf.forward_details(pool).confidence
    order = conf.sort().values
    # thresholds: all exit; half exit (between the two middle confidences); none exits
    thresholds = {'exit 100%': 0.0, 'exit 50%': float((order[31] + order[32]) / 2), 'exit 0%': 1.01}
    onnx_dirs = export_onnx_programs(cf, deit, args) if args.onnxruntime else None
    rows: List[Dict[str, object]] = []

    def write() -> None:  # after every thread count, so that an interrupted run keeps what it measured
        save(args.name, {
            'benchmark': 'early-exit inference throughput, CPU', 'machine': machine(), 'reps': args.reps,
            'thresholds': thresholds, 'deit_gflops': deit_gflops, 'reference_gflops': ref_gflops,
            'cf_flop': cf_flops, 'mode': 'torch.compile' if args.compile else 'eager', 'rows': rows,
            'onnx': {'exporter': args.exporter, 'runtime': 'utils.inference.onnx_runtime.OnnxEarlyExit'} if onnx_dirs else None,
        })

    for threads in args.threads or [None]:
        if threads:
            torch.set_num_threads(threads)
        onnx = open_onnx_programs(onnx_dirs, torch.get_num_threads()) if onnx_dirs else None
        for dtype_name in args.dtypes:
            rows += run_configuration(args, dtype_name, pool, thresholds, deit_fn, ref_fn, cf, cf_flops, deit_gflops,
                                      ref_gflops, onnx if dtype_name == 'float32' else None)
        write()


def export_onnx_programs(cf, deit, args) -> Dict[str, Path]:
    """Export CF-DeiT-S (both stages, as export_onnx.py does) and DeiT-S (one graph, same exporter)."""
    from utils.inference.onnx_export import export_early_exit, export_graph
    root = Path(args.export_dir or tempfile.mkdtemp(prefix='cfvit-bench-onnx-'))
    cf_dir, deit_path = root / 'cf_deit_small_g7', root / 'deit_small_patch16_224.onnx'
    if not (cf_dir / 'manifest.json').exists():
        export_early_exit(cf, cf_dir, exporter=args.exporter)
    if not deit_path.exists():
        deit_path.write_bytes(export_graph(deit, (torch.zeros(2, 3, 224, 224),), ['x'], ['logits'], args.exporter))
    return {'cf': cf_dir, 'deit': deit_path}


def open_onnx_programs(dirs: Dict[str, Path], threads: int):
    """(OnnxEarlyExit of CF-DeiT-S, a function running DeiT-S), both with ``threads`` intra-op threads."""
    from utils.inference.onnx_runtime import OnnxEarlyExit, make_session
    cf = OnnxEarlyExit(dirs['cf'], threads=threads)
    session = make_session(dirs['deit'], threads)
    return cf, lambda x: session.run(None, {'x': x.contiguous().numpy()})


def run_configuration(args, dtype_name, pool, thresholds, deit_fn, ref_fn, cf, cf_flops, deit_gflops, ref_gflops,
                      onnx: Optional[tuple]) -> List[Dict[str, object]]:
    """Time every program at each batch size of one dtype and thread count; one row per program."""
    rows: List[Dict[str, object]] = []
    dtype = getattr(torch, dtype_name)
    mode = 'torch.compile' if args.compile else 'eager'
    for batch in args.batches:
        if batch == 1:
            chunks = [pool[i:i + 1] for i in range(args.images_batch1)]
        else:
            chunks = [pool[:batch]]
        n_images = sum(c.shape[0] for c in chunks)

        def run_deit(chunks=chunks, dtype=dtype) -> None:
            with torch.no_grad(), autocast(dtype):
                for x in chunks:
                    deit_fn(x)

        small = [coarse_from_fine(c, (112, 112)) for c in chunks]  # inputs made ahead: not timed

        def run_reference(small=small, dtype=dtype) -> None:
            with torch.no_grad(), autocast(dtype):
                for x in small:
                    ref_fn(x)

        def make_cf(t: float, chunks=chunks, dtype=dtype) -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad(), autocast(dtype):
                    for x in chunks:
                        cf.forward_early_exit(x, t)
            return run

        programs = {'deit_small_patch16_224': run_deit, REFERENCE: run_reference}
        programs.update({f'cf_deit_small {k}': make_cf(t) for k, t in thresholds.items()})
        if onnx is not None:
            onnx_cf, onnx_deit = onnx

            def run_onnx_deit(chunks=chunks) -> None:
                for x in chunks:
                    onnx_deit(x)

            def make_onnx_cf(t: float, chunks=chunks) -> Callable[[], None]:
                def run() -> None:
                    for x in chunks:
                        onnx_cf.forward_early_exit(x, t)
                return run

            programs[ONNX + 'deit_small_patch16_224'] = run_onnx_deit
            programs.update({f'{ONNX}cf_deit_small {k}': make_onnx_cf(t) for k, t in thresholds.items()})
        times = interleaved(programs, args.reps)
        for name, ts in times.items():
            in_onnx = name.startswith(ONNX)
            plain = name[len(ONNX):] if in_onnx else name
            base = median(times[(ONNX if in_onnx else '') + 'deit_small_patch16_224'])
            kind = 'cf' if plain.startswith('cf') else 'reference' if plain == REFERENCE else 'baseline'
            if kind == 'cf':
                t = thresholds[plain.split(' ', 1)[1]]
                runner = onnx[0] if in_onnx else cf
                with torch.no_grad():
                    share = float(torch.cat([runner.forward_details(x, t).exited for x in chunks]).float().mean())
                gflops = share * cf_flops[0] + (1 - share) * cf_flops[1]
            else:
                share, gflops = None, ref_gflops if kind == 'reference' else deit_gflops
            speedup = base / median(ts)
            predicted = deit_gflops / gflops
            extra = {}
            if in_onnx and kind == 'cf':  # the deployed early exit against eager PyTorch at the same exit share
                extra['speedup_vs_eager_cf'] = median(times[plain]) / median(ts)
            rows.append({
                'program': plain, 'kind': kind, 'mode': 'onnxruntime' if in_onnx else mode,
                'threads': torch.get_num_threads(),
                'dtype': dtype_name, 'batch': batch, 'images_per_rep': n_images,
                'exit_share': share, 'gflops_per_image': gflops,
                'median_seconds': median(ts), 'images_per_second': n_images / median(ts),
                'speedup_vs_deit': speedup, 'gflops_predicted_speedup': predicted,
                'flop_efficiency': speedup / predicted, 'all_seconds': ts, **extra,
            })
            print(f'{dtype_name:9s} t={torch.get_num_threads()} b={batch:<3d} {name:56s} {n_images / median(ts):8.1f} img/s  '
                  f'speed-up {speedup:5.2f}  predicted {predicted:5.2f}  efficiency {speedup / predicted:5.2f}')
    return rows


if __name__ == '__main__':
    main()
