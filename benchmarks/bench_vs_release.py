"""Benchmark 7: early-exit inference, ours against the released code, side by side.

    python benchmarks/bench_vs_release.py --release DIR [--batches 1 16 64] [--exit-shares 100 50 0]
        [--threads 1 2] [--rounds 5] [--programs PROGRAM ...] [--name vs_release]

``DIR`` is a checkout of the released code (``git clone https://github.com/ChenMnZ/CF-ViT``). This
repository holds none of it: the release's worker imports ``DIR/utils.py`` and
``DIR/deit/models_deit.py`` at run time, with the installed timm for the layers they import
(``DropPath``, ``to_2tuple``, ``trunc_normal_``: identities or initializers at inference) and
``Tensor.cuda`` made a no-op, so the released model runs unchanged on the CPU.

Every program runs in its own process (the release's ``utils`` module and ours cannot share one),
and all load the same weights strictly: a random ``cf_deit_small`` (7x7 coarse grid) written in the
released checkpoint layout, its head scaled so that the coarse confidences spread out (random
heads give near-uniform softmaxes, whose confidences nearly tie). The parent asks the workers in
turn to time one configuration, so every program sees the machine in the same state: one untimed
round, then for each round, for each configuration, for each program. A configuration is a batch
size, an exit share and a thread count; its images are the first ``max(--images, batch)`` of one
fixed pool, run in batches of that size. Each program picks its own thresholds from its own coarse
confidences on those images so that the given share exits (100: threshold 0; 0: threshold above
1). Timed: the fine images in, the early-exit logits out, including the coarse image's bilinear
resize, which the release does outside its model and ours inside. Reported: images per second, the
median over the rounds, and each program's ratio to the release's median, with the min-max of the
per-round ratios (the two ran back to back in each round).

Programs:
  release            the released ``forward_early_exit``, float32
  ours               our ``forward_early_exit``, float32, eager
  ours-bf16          the same under bfloat16 autocast with the weights cast once
                     (``utils.inference.cpu.cast_weights_for_autocast``), as ``dynamic_inference.py --amp-dtype
                     bfloat16`` (or ``auto`` on a CPU with native bfloat16) runs it
  ours-bf16-autocast plain bfloat16 autocast on the float32 model (it casts every weight at every call)
  ours-compile       ``compile_stages()`` (minutes of compilation per new shape on a CPU)
  ours-compile-bf16  both
  ours-onnxruntime   ``export_onnx``'s graphs run by ``utils.inference.onnx_runtime.OnnxEarlyExit``
Any of them with ``+keep-freed``: the worker process first calls ``utils.inference.cpu.keep_freed_memory()``
(glibc keeps freed memory for reuse), as ``dynamic_inference.py`` does on a CPU by default; the
ratios of such a program are also given against ``release+keep-freed`` when it runs, which shows
what the model code gains under the same allocator.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PROGRAMS = ('release', 'ours', 'ours-bf16', 'ours-bf16-autocast', 'ours-compile', 'ours-compile-bf16',
            'ours-onnxruntime')
#: What a run without --programs compares.
DEFAULT_PROGRAMS = ('release', 'ours', 'release+keep-freed', 'ours+keep-freed', 'ours-bf16+keep-freed',
                    'ours-onnxruntime')
#: The model both sides build: CF-DeiT-S with a 7x7 coarse grid on 112 px, 14x14 on 224 px.
COARSE_SIDE, FINE_SIDE = 112, 224
#: Program suffix: the worker keeps freed memory in its heap (``utils.inference.cpu.keep_freed_memory``).
KEEP_FREED = 'keep-freed'
#: Factor on the random head's weights, so that the coarse max-softmax spreads over (0, 1).
HEAD_SCALE = 40.0


# ---------------------------------------------------------------------------------------- workers
def load_release_model(release_dir: Path, checkpoint: Path) -> torch.nn.Module:
    """The released ``cf_deit_small`` from a checkout, with the checkpoint loaded strictly."""
    for rel in ('utils.py', 'deit/models_deit.py'):
        if not (release_dir / rel).is_file():
            raise SystemExit(f'error: --release {release_dir} is not a checkout of the released code: no {rel}')
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the release builds index tensors with .cuda()

    def load(name: str, path: Path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    load('utils', release_dir / 'utils.py')  # models_deit does `from utils import batch_index_select, get_index`
    models_deit = load('release_models_deit', release_dir / 'deit' / 'models_deit.py')
    model = models_deit.cf_deit_small(img_size_list=[COARSE_SIDE, FINE_SIDE])
    state = torch.load(checkpoint, map_location='cpu', weights_only=True)['model']
    model.load_state_dict(state, strict=True)
    return model.eval()


@functools.lru_cache(maxsize=None)
def load_inference_module(name: str):
    """``utils/inference/<name>.py`` of this repository (``cpu``, ``early_exit``: they import nothing of ours),
    loaded by path: the release's worker cannot import our ``utils`` package (its own ``utils.py`` takes the name)."""
    path = Path(__file__).resolve().parents[1] / 'utils' / 'inference' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(f'cfvit_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_program(program: str) -> Tuple[str, bool]:
    """``'ours-bf16+keep-freed'`` -> ``('ours-bf16', True)``."""
    base, _, option = program.partition('+')
    if base not in PROGRAMS or option not in ('', KEEP_FREED):
        raise argparse.ArgumentTypeError(
            f'unknown program {program!r}: one of {", ".join(PROGRAMS)}, optionally with +{KEEP_FREED}')
    return base, bool(option)


class Worker:
    """One program: builds its model, then answers the parent's requests on stdin/stdout."""

    def __init__(self, program: str, release_dir: Optional[Path], checkpoint: Path, export_dir: Optional[Path]):
        self.program = program
        base, keep_freed = split_program(program)
        cpu = load_inference_module('cpu')
        if keep_freed and not cpu.keep_freed_memory():
            raise SystemExit(f'error: {program}: ' + ('glibc refused the allocator thresholds' if cpu.has_mallopt()
                                                       else 'this C library has no mallopt (not glibc)'))
        bf16 = base.endswith(('-bf16', '-bf16-autocast'))
        self.autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16)
        self._onnx: Dict[int, Any] = {}
        self.export_dir = export_dir
        if base == 'release':
            self.model = load_release_model(release_dir, checkpoint)
            self.run = self._run_release
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            import timm
            import models  # noqa: F401  (registers the cf_* models)
            model = timm.create_model('cf_deit_small', coarse_stage_size=COARSE_SIDE // 16)
            state = torch.load(checkpoint, map_location='cpu', weights_only=True)['model']
            model.load_state_dict(state, strict=True)
            self.model = model.eval()
            if bf16 and base != 'ours-bf16-autocast':  # as dynamic_inference.py runs bfloat16: the weights cast once
                cpu.cast_weights_for_autocast(self.model, torch.bfloat16)
            if base.startswith('ours-compile'):
                self.model.compile_stages()
            self.run = self._run_onnx if base == 'ours-onnxruntime' else self._run_ours

    def _run_release(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        x_c = F.interpolate(x, (COARSE_SIDE, COARSE_SIDE), mode='bilinear', align_corners=True)
        return self.model.forward_early_exit([x_c, x], threshold)

    def _run_ours(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        with self.autocast:
            return self.model.forward_early_exit(x, threshold)

    def _run_onnx(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        threads = torch.get_num_threads()
        if threads not in self._onnx:
            from utils.inference.onnx_runtime import OnnxEarlyExit
            self._onnx[threads] = OnnxEarlyExit(self.export_dir, threads=threads)
        return self._onnx[threads].forward_early_exit(x, threshold)

    def confidences(self, batches: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each image's coarse max-softmax as this program computes it (the 0-threshold logits
        are the coarse stage's)."""
        return torch.cat([self.run(b, 0.0).float().softmax(-1).max(-1).values for b in batches])

    def serve(self, pool: torch.Tensor) -> None:
        print(json.dumps({'ready': self.program}), flush=True)
        cache: Dict[Any, Any] = {}
        for line in sys.stdin:
            req = json.loads(line)
            if req.get('cmd') == 'quit':
                break
            torch.set_num_threads(int(req['threads']))
            batch, share = int(req['batch']), float(req['share'])
            images = pool[:max(int(req['images']), batch)]
            batches = images.split(batch)
            key = (batch, len(images), torch.get_num_threads())  # confidences as computed at this thread count
            profiler = None
            if req.get('cmd') == 'profile':
                from torch.profiler import ProfilerActivity, profile
                profiler = profile(activities=[ProfilerActivity.CPU])
            with torch.inference_mode():
                if key not in cache:
                    cache[key] = self.confidences(batches)
                    for b in batches:  # warm-up (and, compiled, compile) every shape
                        self.run(b, threshold_for(cache[key], 50.0))
                conf = cache[key]
                threshold = threshold_for(conf, share)
                with profiler or contextlib.nullcontext():
                    t0 = time.perf_counter()
                    for b in batches:
                        self.run(b, threshold)
                    seconds = time.perf_counter() - t0
            exited = int((conf >= threshold).sum())  # this program's own confidences of these batches
            reply = {'seconds': seconds, 'images': len(images), 'exited': exited, 'threshold': threshold}
            if profiler is not None:
                reply['table'] = profiler.key_averages().table(sort_by='self_cpu_time_total', row_limit=15,
                                                               max_name_column_width=48)
            print(json.dumps(reply), flush=True)


def threshold_for(conf: torch.Tensor, share: float) -> float:
    """A threshold at which ``share`` percent of ``conf`` reach it (exit), halfway between neighbours
    (``utils.inference.early_exit.threshold_for_count``, loaded by path as the worker must).

    The count is ``round(share * n / 100)`` as the recorded runs computed it, not ``threshold_for_share``'s
    ``round(share / 100 * n)``: for some percentages given with ``--exit-shares`` (70 % of 45 images) the two
    round a float tie differently, one image apart."""
    return load_inference_module('early_exit').threshold_for_count(conf, int(round(share * conf.numel() / 100.0)))


# ---------------------------------------------------------------------------------------- parent
def program_name(value: str) -> str:
    split_program(value)
    return value


def cpu_record() -> Dict[str, Any]:
    """The CPU's model, the flags that matter for these programs, and what torch makes of it."""
    from utils.inference.cpu import bf16_speedup, cpu_bf16_native, cpu_flags
    wanted = [f for f in cpu_flags() if f.startswith(('avx', 'amx', 'fma', 'f16c')) or f in ('sse4_2',)]
    return {'flags': wanted, 'torch_cpu_capability': torch.backends.cpu.get_cpu_capability(),
            'bf16_native': cpu_bf16_native(), 'bf16_mlp_speedup': round(bf16_speedup(), 2)}


def make_checkpoint(path: Path) -> None:
    """A random cf_deit_small in the released checkpoint layout, the head scaled by HEAD_SCALE."""
    import timm
    import models  # noqa: F401  (registers the cf_* models)
    torch.manual_seed(0)
    model = timm.create_model('cf_deit_small', coarse_stage_size=COARSE_SIDE // 16)
    state = model.state_dict()
    state['head.weight'] = state['head.weight'] * HEAD_SCALE
    torch.save({'model': state}, path)
    return model


RESULTS_NOTE = 'after {0} round(s): {1} holds them'


def start_worker(program: str, args, checkpoint: Path, pool_path: Path, export_dir: Optional[Path],
                 workers: Dict[str, subprocess.Popen]) -> subprocess.Popen:
    """Start a worker, registered in ``workers`` before it is waited for (so that it is always ended)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), '--worker', program, '--checkpoint', str(checkpoint),
           '--pool', str(pool_path)]
    if args.release:
        cmd += ['--release', str(args.release)]
    if export_dir:
        cmd += ['--export-dir', str(export_dir)]
    proc = workers[program] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    reply = proc.stdout.readline()
    if not reply:
        raise SystemExit(f'error: the {program} worker failed to start (its error is above)')
    return proc


def ask(proc: subprocess.Popen, program: str, request: Dict[str, Any]) -> Dict[str, Any]:
    proc.stdin.write(json.dumps(request) + '\n')
    proc.stdin.flush()
    reply = proc.stdout.readline()
    if not reply:
        raise SystemExit(f'error: the {program} worker stopped (its error is above)')
    return json.loads(reply)


def write_profiles(args, workers: Dict[str, subprocess.Popen], configs: List[Dict[str, Any]],
                   record: Dict[str, Any]) -> Path:
    """--profile: each program's operator table (self CPU time) for each configuration, in one text file."""
    from common import RESULTS
    from utils.common.atomic import atomic_file
    parts = [f'# {args.name}: torch.profiler operator tables of bench_vs_release.py --profile',
             f"# machine: {record['cpu']}, torch {record['torch']}, {record['date']}; load: {record.get('load') or '-'}",
             '# command: python benchmarks/bench_vs_release.py ' + shlex.join(sys.argv[1:]), '']
    for cfg in configs:
        for prog, proc in workers.items():
            reply = ask(proc, prog, dict(cfg, cmd='profile'))
            parts += [f"## {prog}: threads {cfg['threads']}, batch {cfg['batch']}, {cfg['share']:.0f}% exit, "
                      f"{reply['images']} images in {reply['seconds']:.3f} s (under the profiler)", reply['table'], '']
    path = RESULTS / f'{args.name}_profile.txt'
    with atomic_file(path, 'w') as f:
        f.write('\n'.join(parts))
    print(f'wrote {path}')
    return path


def plot_ratios(result: Dict[str, Any], path: Path) -> Path:
    """Grouped bars: each program's median speed ratio to the release per configuration, the
    per-round min-max as error bars, lines at 1.0 (parity) and 1.3."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from utils.vis.figures import save_figure

    rows = [r for r in result['rows'] if 'release' in r]
    programs = [p for p in result['programs'] if p != 'release']
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.55 * len(rows) * (1 + len(programs) / 4))), 4.6), dpi=120,
                           layout='constrained')
    width = 0.8 / max(1, len(programs))
    for j, prog in enumerate(programs):
        xs, ys, lo, hi = [], [], [], []
        for i, r in enumerate(rows):
            if prog in r and 'vs_release' in r[prog]:
                v = r[prog]['vs_release']
                xs.append(i + (j - (len(programs) - 1) / 2) * width)
                ys.append(v['median_ratio'])
                lo.append(v['median_ratio'] - v['per_round'][0])
                hi.append(v['per_round'][1] - v['median_ratio'])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=1.5, label=prog, error_kw={'lw': 0.6})
    ax.axhline(1.0, color='black', lw=0.8)
    ax.axhline(1.3, color='tab:red', lw=0.8, ls='--', label='1.3x')
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['threads']}t b{r['batch']}\n{r['exit_share']:.0f}%" for r in rows], fontsize=7)
    ax.set_ylabel('images/s relative to the release (median)')
    ax.set_xlabel('threads, batch size, share of images exiting at the coarse stage')
    ax.set_title(f"CF-DeiT-S 7x7 early exit vs the released code, {result['machine']['cpu']}", fontsize=9)
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.22), ncol=min(4, len(programs) + 1), fontsize=7,
              frameon=False)
    ax.grid(axis='y', alpha=0.3)
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--release', type=Path, default=None, help='a checkout of github.com/ChenMnZ/CF-ViT')
    p.add_argument('--batches', type=int, nargs='+', default=[1, 16, 64])
    p.add_argument('--exit-shares', type=float, nargs='+', default=[100, 50, 0],
                   help='percent of the images that exit at the coarse stage')
    p.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--images', type=int, default=48, help='images per timing (at least one batch)')
    p.add_argument('--pool-size', type=int, default=64)
    p.add_argument('--programs', nargs='+', type=program_name, default=list(DEFAULT_PROGRAMS),
                   help=f'any of {", ".join(PROGRAMS)}, each optionally with +{KEEP_FREED} (see the docstring)')
    p.add_argument('--name', default='vs_release', help='result file name (benchmarks/results/NAME.json)')
    p.add_argument('--profile', action='store_true',
                   help='instead of timing rounds: one torch.profiler run of each configuration and program, '
                        'the operator tables written to benchmarks/results/NAME_profile.txt')
    p.add_argument('--plot-only', action='store_true',
                   help='redraw benchmarks/results/NAME.png from NAME.json without running anything')
    p.add_argument('--load-note', default='', help='what else ran on the machine (recorded with the results)')
    # worker side
    p.add_argument('--worker', type=program_name, help=argparse.SUPPRESS)
    p.add_argument('--checkpoint', type=Path, help=argparse.SUPPRESS)
    p.add_argument('--pool', type=Path, help=argparse.SUPPRESS)
    p.add_argument('--export-dir', type=Path, help=argparse.SUPPRESS)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The parent's flags: refused with ``p.error`` (exit 2) where they cannot run."""
    if len(set(args.programs)) < len(args.programs):
        p.error('--programs names a program twice')
    if any(split_program(prog)[0] == 'release' for prog in args.programs) and args.release is None:
        p.error('--release DIR is needed for the release program (or leave it out of --programs)')
    for name, values in (('--batches', args.batches), ('--threads', args.threads), ('--rounds', [args.rounds]),
                         ('--images', [args.images])):
        if min(values) < 1:
            p.error(f'{name} must be positive')
    if not all(0 <= s <= 100 for s in args.exit_shares):
        p.error('--exit-shares are percentages in [0, 100]')
    if args.pool_size < max(max(args.batches), args.images):
        p.error('--pool-size must hold the largest batch and --images')
    if args.release is not None:
        missing = [rel for rel in ('utils.py', 'deit/models_deit.py') if not (args.release / rel).is_file()]
        if missing:
            p.error(f'--release {args.release} is not a checkout of github.com/ChenMnZ/CF-ViT: no {missing[0]}')


def prepare_inputs(args: argparse.Namespace, work: Path, checkpoint: Path, pool_path: Path) -> Optional[Path]:
    """The random-weight checkpoint and the image pool the workers read; the ONNX export when a program runs
    it (its folder, else None)."""
    model = make_checkpoint(checkpoint)
    torch.save(torch.randn(args.pool_size, 3, FINE_SIDE, FINE_SIDE, generator=torch.Generator().manual_seed(1)),
               pool_path)
    if any(split_program(prog)[0] == 'ours-onnxruntime' for prog in args.programs):
        from utils.inference.onnx_export import export_early_exit
        model.load_state_dict(torch.load(checkpoint, weights_only=True)['model'])
        export_early_exit(model.eval(), work / 'onnx', exporter='torchscript')
        return work / 'onnx'
    return None


def ratio(rs: List[float], ref: List[float]) -> Dict[str, Any]:
    """Median images/s over the reference's, and the range of the per-round ratios."""
    from common import median
    n = min(len(rs), len(ref))
    per_round = [rs[i] / ref[i] for i in range(n)]  # the two ran back to back in each round
    return {'median_ratio': median(rs) / median(ref), 'per_round': [min(per_round), max(per_round)]}


def summary_rows(configs: List[Dict[str, Any]], results: Dict[tuple, Dict[str, List[Dict[str, Any]]]]
                 ) -> List[Dict[str, Any]]:
    """One row per configuration measured so far: each program's median images/s, its runs and its ratios to
    the release (as it runs, and with the same allocator)."""
    from common import median
    rows = []
    for cfg in configs:
        key = (cfg['threads'], cfg['batch'], cfg['share'])
        per = results.get(key)
        if not per:
            continue
        rates = {prog: [r['images'] / r['seconds'] for r in reps] for prog, reps in per.items()}
        row = dict(threads=cfg['threads'], batch=cfg['batch'], exit_share=cfg['share'],
                   rounds=min(len(v) for v in rates.values()))
        for prog, rs in rates.items():
            row[prog] = {'img_per_s': median(rs), 'runs': rs,
                         'exited': per[prog][-1]['exited'], 'images': per[prog][-1]['images']}
            if 'release' in rates and prog != 'release':  # against the release as it runs
                row[prog]['vs_release'] = ratio(rs, rates['release'])
            same = 'release+' + KEEP_FREED
            if prog.endswith('+' + KEEP_FREED) and prog != same and same in rates:  # same allocator
                row[prog]['vs_release_keep_freed'] = ratio(rs, rates[same])
        rows.append(row)
    return rows


def stop_workers(workers: Dict[str, subprocess.Popen]) -> None:
    """Ask every worker to quit; kill one that has not after 30 s."""
    for prog, proc in workers.items():
        if proc.poll() is None:
            try:
                proc.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
                proc.stdin.flush()
            except OSError:
                pass
    for proc in workers.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = get_args_parser()
    args = p.parse_args(argv)
    if args.worker:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it ends the workers
        torch.manual_seed(0)
        pool = torch.load(args.pool, weights_only=True)
        Worker(args.worker, args.release, args.checkpoint, args.export_dir).serve(pool)
        return
    if args.plot_only:
        from common import RESULTS
        source = RESULTS / f'{args.name}.json'
        if not source.is_file():
            p.error(f'--plot-only: no {source}')
        print(f"wrote {plot_ratios(json.loads(source.read_text()), RESULTS / f'{args.name}.png')}")
        return
    check_args(p, args)
    from common import RESULTS, machine, save  # also puts the repository on sys.path
    from tqdm import tqdm
    record = dict(machine(), **cpu_record(), load=args.load_note)
    tmp = tempfile.TemporaryDirectory(prefix='cfvit-vs-release-')  # weights, images, export: removed at the end
    work = Path(tmp.name)
    checkpoint, pool_path = work / 'cf_deit_small_g7.pth', work / 'pool.pth'
    workers: Dict[str, subprocess.Popen] = {}
    configs = [dict(batch=b, share=s, threads=t, images=args.images)
               for t in args.threads for b in args.batches for s in args.exit_shares]
    results: Dict[tuple, Dict[str, List[Dict[str, Any]]]] = {}
    rows: List[Dict[str, Any]] = []
    rounds_done = 0
    try:
        export_dir = prepare_inputs(args, work, checkpoint, pool_path)
        for prog in args.programs:
            start_worker(prog, args, checkpoint, pool_path, export_dir, workers)
        for cfg in tqdm(configs, desc='warm-up round', unit='config'):  # untimed: first calls of each shape
            for prog, proc in workers.items():
                ask(proc, prog, dict(cfg, cmd='time'))
        if args.profile:
            write_profiles(args, workers, configs, record)
            return
        bar = tqdm(total=args.rounds * len(configs) * len(workers), desc='timing', unit='run')
        for _ in range(args.rounds):
            for cfg in configs:
                key = (cfg['threads'], cfg['batch'], cfg['share'])
                for prog, proc in workers.items():
                    reply = ask(proc, prog, dict(cfg, cmd='time'))
                    results.setdefault(key, {}).setdefault(prog, []).append(reply)
                    bar.update()
            rows = summary_rows(configs, results)  # saved after every round: an interrupted run keeps what it measured
            payload = {'benchmark': 'early-exit inference vs the released code, CPU', 'machine': record,
                       'model': 'cf_deit_small, 7x7 coarse grid (112 px), 14x14 fine (224 px), random weights',
                       'command': 'python benchmarks/bench_vs_release.py ' + shlex.join(sys.argv[1:] if argv is None
                                                                                          else argv),
                       'programs': list(args.programs), 'rounds': args.rounds, 'rows': rows}
            save(args.name, payload)
            rounds_done += 1
        bar.close()
        if any('release' in r for r in rows):
            print(f"wrote {plot_ratios(payload, RESULTS / f'{args.name}.png')}")
    except KeyboardInterrupt:
        where = RESULTS_NOTE.format(rounds_done, RESULTS / f'{args.name}.json') if rounds_done else 'before a round was complete: nothing written'
        print(f'interrupted {where}', file=sys.stderr)
        raise SystemExit(130)
    finally:
        stop_workers(workers)
        tmp.cleanup()
    for row in rows:
        cells = [f"{prog} {row[prog]['img_per_s']:.1f}" + (
            f" ({row[prog]['vs_release']['median_ratio']:.2f}x)" if 'vs_release' in row[prog] else '')
            for prog in args.programs if prog in row]
        print(f"threads {row['threads']} batch {row['batch']:>3} exit {row['exit_share']:>5.1f}%: " + ', '.join(cells))


if __name__ == '__main__':
    main()
