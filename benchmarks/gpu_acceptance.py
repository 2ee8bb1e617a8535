"""GPU acceptance run: what our users do on one NVIDIA GPU, checked in at most 8 minutes.

    python benchmarks/gpu_acceptance.py              # on a machine with one GPU, from the repository root
    python benchmarks/gpu_acceptance.py --dry-run    # the same steps, tiny, on the CPU (gloo, small batches)

Steps (each in its own process, with a time limit; the whole run stops at --time-limit):

1. ``tier``: the CUDA test tier, ``pytest -m cuda tests`` (on the CPU: its collection, every case skipped,
   and ``cpu-cases``: the device-independent cases of tests/test_cuda.py that run on the CPU);
2. ``data``: a small synthetic shapes set (datasets/synthetic.py);
3. ``train-deit`` / ``train-lvvit``: main_deit.py and main_lvvit.py under ``torchrun --nproc_per_node=1``
   (NCCL on the GPU, gloo on the CPU), float16 autocast with a gradient scaler, one epoch, then ``--resume
   auto`` for the second (informative selection on);
4. ``modes``: dynamic_inference.py modes 1, 2, 0 and 3 on the CF-DeiT checkpoint just trained;
5. ``throughput``: early exit at batch 1024 of ``cf_deit_small`` (7x7), random weights with the head scaled
   so that confidences spread, beside timm's ``deit_small_patch16_224`` on the same GPU: float32, TF32 and
   float16 autocast, eager and compiled (``compile_stages(dynamic=True)``, as dynamic_inference --compile in
   mode 2), at 100 / 50 / 0 % exits, each threshold chosen from the model's own confidences in that precision
   (as benchmark 7). Timed with CUDA events on the model's device: the median of ``--reps`` batches after
   ``--warmup`` untimed ones. Goal: at 50 % exits in float16, at least 1.6x DeiT-S's images/s.

One summary line at the end; everything in ``benchmarks/results/gpu_acceptance.json`` (``--dry-run``:
``gpu_acceptance_dry_run.json``), the runs' folders under ``--output-dir``. Exit status 0 when every step
passed (the throughput goal is reported, not enforced), 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import utils.common.startup  # noqa: E402, F401  (first, before torch: HF_HUB_OFFLINE)

import torch  # noqa: E402

from benchmarks.common import RESULTS, machine  # noqa: E402
from utils.common.atomic import write_json_atomic  # noqa: E402
from utils.inference.early_exit import threshold_for_share  # noqa: E402

#: The goal of issue 25: images/s of early exit at 50 % exits over DeiT-S's, batch 1024, float16.
GOAL_SPEEDUP = 1.6
#: The released head scale of benchmark 7: a random model's confidences spread over (0, 1).
HEAD_SCALE = 40.0
SHARES = (100, 50, 0)

# (name, autocast dtype, TF32, compiled): float16 first, the goal's configuration
PRECISIONS = [('float16', torch.float16, False, False), ('float16', torch.float16, False, True),
              ('float32', None, False, False), ('tf32', None, True, False),
              ('float32', None, False, True), ('tf32', None, True, True)]


def launcher_free_env() -> Dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1', MPLBACKEND='Agg')
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    return env


class Run:
    """The steps, their records and the time limit."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.perf_counter()
        self.steps: Dict[str, Dict[str, Any]] = {}
        self.out = Path(args.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.args.time_limit - (time.perf_counter() - self.started)

    def command(self, name: str, cmd: Sequence[str], cap: float, expect: Sequence[str] = (),
                env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """Run ``cmd`` from the repository root within min(cap, time left); passed when it exits 0 and its
        output holds every ``expect`` string."""
        limit = min(cap * self.args.cap_scale, self.left())
        record: Dict[str, Any] = {'command': ' '.join(str(c) for c in cmd)}
        if limit < 5:
            record.update(status='not run (time limit)')
            self.steps[name] = record
            return record
        print(f'[{name}] {record["command"]}', flush=True)
        t0 = time.perf_counter()
        log = self.out / f'{name}.log'
        try:
            proc = subprocess.run(list(cmd), cwd=ROOT, env=env or launcher_free_env(), capture_output=True,
                                  text=True, timeout=limit)
            text = proc.stdout + proc.stderr
            rc: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b'').decode(errors='replace') + (e.stderr or b'').decode(errors='replace')
            rc = None
        log.write_text(text)
        missing = [s for s in expect if s not in text]
        record.update(seconds=round(time.perf_counter() - t0, 1), rc=rc, log=str(log), missing=missing,
                      status='passed' if rc == 0 and not missing else
                      ('timed out' if rc is None else f'failed (exit {rc})' if rc else 'failed (output)'))
        record['tail'] = text.strip().splitlines()[-3:]
        self.steps[name] = record
        print(f'[{name}] {record["status"]} in {record["seconds"]} s'
              + (f'; missing from its output: {missing}' if missing else ''), flush=True)
        return record

    def inline(self, name: str, fn: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        """Run ``fn`` in this process (the data set, the throughput measurement)."""
        print(f'[{name}] ...', flush=True)
        t0 = time.perf_counter()
        record: Dict[str, Any]
        try:
            record = dict({'status': 'passed'}, **fn())
        except Exception as e:  # recorded: the run goes on and the summary says which step failed
            record = {'status': f'failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'}
        record['seconds'] = round(time.perf_counter() - t0, 1)
        self.steps[name] = record
        print(f'[{name}] {record["status"]} in {record["seconds"]} s', flush=True)
        return record


# ---------------------------------------------------------------------------------------------- steps
def pytest_summary(record: Dict[str, Any]) -> str:
    text = Path(record['log']).read_text() if record.get('log') else ''
    lines = [line for line in text.splitlines() if re.search(r'\d+ (passed|skipped|failed|deselected)', line)]
    return lines[-1].strip('= ') if lines else ''


def train_steps(run: Run, data: Path, device: str, dry: bool) -> None:
    backend = 'gloo' if device == 'cpu' else 'nccl'
    recipe = ['--warmup-epochs', '0', '--lr', '1e-3', '--unscale-lr', '--aa', 'none', '--reprob', '0', '--mixup', '0',
              '--cutmix', '0', '--no-repeated-aug', '--no-model-ema', '--drop-path', '0.0', '--print-freq', '1000',
              '--selection-start-epoch', '0', '--epochs', '2', '--device', device, '--amp', '--amp-dtype', 'float16',
              '--batch-size', str(run.args.train_batch), '--num_workers', str(run.args.workers)]
    sizes = {'cf_deit': (['--model', 'cf_deit_tiny', '--embed-dim', '48', '--depth', '2', '--num-heads', '3',
                          '--coarse-stage-size', '2'] if dry else ['--model', 'cf_deit_small']),
             'cf_lvvit': (['--model', 'cf_lvvit_tiny', '--embed-dim', '48', '--depth', '2', '--num-heads', '3',
                           '--coarse-stage-size', '2'] if dry else ['--model', 'cf_lvvit_small'])}
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1']
    for name, script, model in (('train-deit', 'main_deit.py', sizes['cf_deit']),
                                ('train-lvvit', 'main_lvvit.py', sizes['cf_lvvit'])):
        out = run.out / name
        argv = [*launch, script, *model, *recipe, '--data-path', str(data), '--output', str(out)]
        first = run.command(f'{name}-epoch0', [*argv, '--stop-at-epoch', '1'], 120,
                            expect=[f'distributed: 1 processes, {backend} backend',
                                    'precision: autocast float16 with a gradient scaler'])
        if first.get('status') == 'passed':
            run.command(f'{name}-resume', [*argv, '--resume', 'auto'], 120,
                        expect=['continuing at epoch 1', f'distributed: 1 processes, {backend} backend'])


def mode_steps(run: Run, data: Path, device: str) -> None:
    ckpt = run.out / 'train-deit' / 'checkpoint.pth'
    common = [sys.executable, 'dynamic_inference.py', '--data_url', str(data), '--checkpoint_path', str(ckpt),
              '--batch_size', str(run.args.eval_batch), '--num-workers', str(run.args.workers), '--device', device]
    evals = run.out / 'eval'
    run.command('mode1', [*common, '--eval-mode', '1', '--output-dir', str(evals / 'budgeted'), '--write-checkpoint'],
                90, expect=['anytime_classification'])
    run.command('mode2', [*common, '--eval-mode', '2', '--threshold', '0.5', '--output-dir', str(evals / 'throughput')]
                + (['--amp-dtype', 'float16'] if device != 'cpu' else []), 90,
                expect=['throughput:'] + (['float32 on CUDA:'] if device != 'cpu' else []))
    run.command('mode0', [*common, '--eval-mode', '0', '--output-dir', str(evals / 'anytime')], 90,
                expect=['anytime_classification'])
    run.command('mode3', [sys.executable, 'dynamic_inference.py', '--eval-mode', '3', '--checkpoint_path',
                          str(evals / 'budgeted' / 'checkpoint_with_results.pth'), '--output-dir',
                          str(evals / 'report')], 60, expect=['flop'])


def timed_calls(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> List[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == 'cuda':
            with torch.cuda.device(device):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record(torch.cuda.current_stream(device))
                fn()
                end.record(torch.cuda.current_stream(device))
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def precision_row(run: Run, device: torch.device, cf_run: Any, deit_run: Any, x: torch.Tensor,
                  flops_cf: List[float], prec: str, dtype: Optional[torch.dtype], compiled: bool) -> Dict[str, Any]:
    """One precision's row: DeiT's images/s, and CF-DeiT's at each exit share of :data:`SHARES` (thresholds
    from this precision's own confidences), with its speed-up over DeiT and expected GFLOPs."""
    from utils.common.precision import autocast_context, tf32_state
    args = run.args

    def ctx():
        return autocast_context(device, dtype)
    t0 = time.perf_counter()
    with torch.no_grad(), ctx():
        conf = cf_run.forward_details(x).confidence.float().cpu()  # this precision's own confidences
        deit_run(x)  # compiles the baseline (and warms it)
    row: Dict[str, Any] = {'precision': prec, 'compiled': compiled, 'tf32': tf32_state(),
                           'first_call_seconds': round(time.perf_counter() - t0, 1), 'batch': args.batch}
    with torch.no_grad(), ctx():
        deit_times = timed_calls(lambda: deit_run(x), device, args.warmup, args.reps)
    row['deit'] = {'img_per_s': args.batch / statistics.median(deit_times), 'seconds': deit_times}
    for share in SHARES:
        threshold = threshold_for_share(conf, share / 100)  # SHARES: 0, 50, 100 % (exact at every batch)
        with torch.no_grad(), ctx():
            times = timed_calls(lambda: cf_run.forward_details(x, threshold), device, args.warmup, args.reps)
            exited = int(cf_run.forward_details(x, threshold).exited.sum())
        ips = args.batch / statistics.median(times)
        row[f'cf_{share}'] = {'threshold': threshold, 'exited': exited, 'img_per_s': ips, 'seconds': times,
                              'speedup_vs_deit': ips / row['deit']['img_per_s'],
                              'expected_gflops': (exited * flops_cf[0]
                                                  + (args.batch - exited) * flops_cf[1]) / args.batch}
    return row


def throughput(run: Run, device: torch.device, dry: bool) -> Dict[str, Any]:
    """Images/s of CF-DeiT early exit and of timm's DeiT at the same batch, per precision and exit share."""
    import timm

    import models  # noqa: F401  (registers the cf_* models)
    from utils.common.precision import set_tf32, tf32_state
    args = run.args
    cf_name, deit_name = (('cf_deit_tiny', 'deit_tiny_patch16_224') if dry
                          else ('cf_deit_small', 'deit_small_patch16_224'))
    grid = 2 if dry else 7  # the dry run: 64 px images (2x2 coarse grid), the GPU run the 7x7 of the paper
    torch.manual_seed(0)
    cf = timm.create_model(cf_name, coarse_stage_size=grid).eval()
    with torch.no_grad():
        cf.head.weight.mul_(HEAD_SCALE)
    side = cf.img_size_list[1]
    deit = timm.create_model(deit_name, pretrained=False, img_size=side).eval()
    cf.to(device)
    deit.to(device)
    from utils.inference.flops import count_gflops, stage_gflops
    flops_cf = stage_gflops(cf)
    with torch.no_grad():
        flops_deit = count_gflops(deit, torch.zeros(1, 3, side, side, device=device))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, side, side, generator=g).to(device)
    saved_tf32 = tf32_state()
    saved_bench = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False

    rows: List[Dict[str, Any]] = []
    compile_kwargs: Dict[str, Any] = dict(dynamic=True)
    if dry:
        compile_kwargs['backend'] = 'eager'  # no C++ build on the CPU: dynamo's graphs only
    try:
        for prec, dtype, tf32, compiled in PRECISIONS:
            if dry and dtype is torch.float16:  # float16 is emulated (very slow) on CPUs: their autocast dtype
                prec, dtype = 'bfloat16', torch.bfloat16
            if run.left() < args.reserve * (3 if compiled else 1):  # compiling takes a minute or more
                rows.append({'precision': prec, 'compiled': compiled, 'status': 'not run (time limit)'})
                continue
            set_tf32(tf32)
            torch._dynamo.reset()
            cf_run = timm.create_model(cf_name, coarse_stage_size=grid).eval().to(device)
            cf_run.load_state_dict(cf.state_dict())
            deit_run = deit
            if compiled:
                cf_run.compile_stages(**compile_kwargs)
                deit_run = torch.compile(deit, **{k: v for k, v in compile_kwargs.items() if k != 'dynamic'})
            row = precision_row(run, device, cf_run, deit_run, x, flops_cf, prec, dtype, compiled)
            rows.append(row)
            print(f'  {prec:8s} {"compiled" if compiled else "eager   "}: DeiT {row["deit"]["img_per_s"]:9.1f} img/s; '
                  + ', '.join(f'{s}% exit {row[f"cf_{s}"]["img_per_s"]:9.1f} ({row[f"cf_{s}"]["speedup_vs_deit"]:.2f}x)'
                              for s in SHARES), flush=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32['matmul']
        torch.backends.cudnn.allow_tf32 = saved_tf32['cudnn_conv']
        torch.backends.cudnn.benchmark = saved_bench
    half = ('float16', 'bfloat16')
    goal_row = next((r for r in rows if r['precision'] in half and 'cf_50' in r and not r['compiled']), None)
    best = max((r['cf_50']['speedup_vs_deit'] for r in rows if r['precision'] in half and 'cf_50' in r),
               default=None)
    not_run = [f'{r["precision"]} {"compiled" if r["compiled"] else "eager"}' for r in rows if 'status' in r]
    return {'not_run': not_run, 'input_size': side, **({'status': f'incomplete: {len(not_run)} of {len(rows)} configurations not run '
                                              f'(time limit)'} if not_run else {}),
            'models': [cf_name, deit_name], 'head_scale': HEAD_SCALE, 'gflops_cf': flops_cf, 'gflops_deit': flops_deit,
            'compile_kwargs': {k: str(v) for k, v in compile_kwargs.items()}, 'rows': rows,
            'goal': {'speedup_at_50_float16_eager': goal_row['cf_50']['speedup_vs_deit'] if goal_row else None,
                     'best_speedup_at_50_float16': best, 'target': GOAL_SPEEDUP,
                     'met': best is not None and best >= GOAL_SPEEDUP}}


# ---------------------------------------------------------------------------------------------- main
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dry-run', action='store_true',
                   help='the same steps tiny on the CPU (gloo, small batches, compiled with the eager backend); '
                        'automatic when no GPU is visible')
    p.add_argument('--output-dir', default='output/gpu_acceptance')
    p.add_argument('--time-limit', type=float, default=None,
                   help='seconds for the whole run (default 480: 8 min; the dry run 1800, on a CPU)')
    p.add_argument('--batch', type=int, default=None, help='throughput batch (default 1024; dry run 4)')
    p.add_argument('--reps', type=int, default=None, help='timed batches per configuration (default 5; dry run 1)')
    p.add_argument('--warmup', type=int, default=None, help='untimed batches first (default 2; dry run 1)')
    p.add_argument('--reserve', type=float, default=30.0,
                   help='seconds left that an eager throughput configuration needs to start (compiled: 3x)')
    p.add_argument('--skip', nargs='*', default=[], choices=('tier', 'train', 'modes', 'throughput'),
                   help='steps to leave out')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print('no GPU visible: running the dry run on the CPU (--dry-run)', flush=True)
        args.dry_run = True
    dry = args.dry_run
    device = torch.device('cpu') if dry else torch.device('cuda', torch.cuda.current_device())
    args.time_limit = args.time_limit or (1800.0 if dry else 480.0)
    args.cap_scale = 4.0 if dry else 1.0  # a step's own limit: CPUs train and compile slowly
    args.batch = args.batch or (4 if dry else 1024)
    args.reps = args.reps or (1 if dry else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 2)
    args.train_batch = 8 if dry else 64
    args.eval_batch = 16 if dry else 128
    args.workers = 0 if dry else 4
    run = Run(args)
    dev_name = 'cpu' if dry else 'cuda'

    if 'tier' not in args.skip:
        rec = run.command('tier', [sys.executable, '-m', 'pytest', '-q', '-rs', '-m', 'cuda', 'tests'], 200)
        rec['summary'] = pytest_summary(rec) if rec.get('log') else ''
        if dry:
            rec = run.command('cpu-cases', [sys.executable, '-m', 'pytest', '-q', 'tests/test_cuda.py',
                                            'tests/test_amp_precision.py'], 150)
            rec['summary'] = pytest_summary(rec) if rec.get('log') else ''

    data = run.out / 'data'
    if {'train', 'modes'} - set(args.skip):
        from datasets.synthetic import make_synthetic_dataset
        n_train, n_val = (48, 24) if dry else (256, 128)
        run.inline('data', lambda: {'path': str(make_synthetic_dataset(data, n_train=n_train, n_val=n_val))})
    if 'train' not in args.skip:
        train_steps(run, data, dev_name, dry)
    if 'modes' not in args.skip:
        mode_steps(run, data, dev_name)
    if 'throughput' not in args.skip:
        run.inline('throughput', lambda: throughput(run, device, dry))

    total = time.perf_counter() - run.started
    failed = [name for name, r in run.steps.items() if r.get('status') != 'passed']
    result = {'dry_run': dry, 'machine': machine(), 'device': str(device),
              'gpu': None if dry else torch.cuda.get_device_name(device), 'torch': torch.__version__,
              'cuda': torch.version.cuda, 'seconds': round(total, 1), 'time_limit': args.time_limit,
              'steps': run.steps, 'failed': failed}
    path = RESULTS / ('gpu_acceptance_dry_run.json' if dry else 'gpu_acceptance.json')
    write_json_atomic(result, path)

    where = 'CPU dry run' if dry else f'GPU acceptance on {result["gpu"]}'
    goal = run.steps.get('throughput', {}).get('goal') or {}
    if goal.get('best_speedup_at_50_float16') is not None:
        verdict = 'CPU figures, not the goal' if dry else ('met' if goal['met'] else 'NOT met')
        speed = (f'{"bfloat16" if dry else "float16"} 50% exits {goal["best_speedup_at_50_float16"]:.2f}x DeiT '
                 f'(goal {GOAL_SPEEDUP}x: {verdict})')
    else:
        speed = 'throughput not measured'
    steps = f'all {len(run.steps)} steps passed' if not failed else 'FAILED: ' + ', '.join(failed)
    tier = run.steps.get('tier', {}).get('summary') or 'not run'
    print(f'SUMMARY {where}: {steps}; tier: {tier}; {speed}; {total:.0f} s of {args.time_limit:.0f} s; {path}',
          flush=True)
    return 0 if not failed else 1


if __name__ == '__main__':
    sys.exit(main())
